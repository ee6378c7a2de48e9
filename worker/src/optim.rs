//! The optimizer side of a training step: the learning-rate schedule, global gradient clipping and AdamW.
//!
//! Each follows PyTorch and diffusers formula for formula, so that a run can be compared step by step with the
//! reference trainer. AdamW is our own because candle's keeps its moments private: a resumed run must continue
//! from the saved moments, not from zero.

use std::collections::{HashMap, HashSet};
use std::f64::consts::PI;

use acrf_common::config::{LrScheduler, TrainingConfig};
use candle_core::{DType, Shape, Tensor, Var};

/// The learning rate of every optimizer step.
///
/// `lr(s)` is the rate of the s-th update (0-based), i.e. diffusers' `get_scheduler` `LambdaLR` factor at s
/// times the base rate. With w warmup steps, T total steps and p = clamp((s − w) / max(1, T − w), 0, 1):
///
/// | scheduler | s < w | s ≥ w: factor f |
/// |---|---|---|
/// | `constant` | (no warmup) | 1 |
/// | `constant_with_warmup` | s / w | 1 |
/// | `linear` | s / w | max(0, (T − s) / max(1, T − w)) |
/// | `cosine` | s / w | ½·(1 + cos(π·p)) |
/// | `cosine_with_restarts` | s / w | 0 if p = 1, else ½·(1 + cos(π·((cycles·p) mod 1))) |
///
/// Warmup starts at 0, so with warmup the first update has rate 0, as in diffusers; `constant` ignores the warmup,
/// as diffusers' `get_constant_schedule` does. One departure: after warmup the decaying schedules (the last three)
/// give `lr_min + (lr − lr_min)·f`, so they end at the floor `lr_min` rather than 0, where the adapter would stop
/// learning for the last steps of a cycle; the constant schedules ignore `lr_min`. Clamping p keeps `cosine` at its
/// floor past T, where diffusers' curve would rise again.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    scheduler: LrScheduler,
    lr: f64,
    lr_min: f64,
    warmup: u64,
    total: u64,
    cycles: u32,
}

impl LrSchedule {
    /// `total_steps`: the run's length in optimizer steps, [`TrainingConfig::total_steps`].
    pub fn new(training: &TrainingConfig, total_steps: u64) -> LrSchedule {
        LrSchedule {
            scheduler: training.scheduler,
            lr: training.learning_rate,
            lr_min: training.lr_min,
            warmup: training.lr_warmup_steps,
            total: total_steps,
            cycles: training.lr_num_cycles,
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        if self.scheduler != LrScheduler::Constant && step < self.warmup {
            return self.lr * step as f64 / self.warmup as f64;
        }
        match self.decay(step) {
            Some(factor) => self.lr_min + (self.lr - self.lr_min) * factor,
            None => self.lr,
        }
    }

    /// The factor f after warmup, or `None` for the constant schedules.
    fn decay(&self, step: u64) -> Option<f64> {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let span = (t - w).max(1.0);
        let progress = ((s - w) / span).clamp(0.0, 1.0);
        match self.scheduler {
            LrScheduler::Constant | LrScheduler::ConstantWithWarmup => None,
            LrScheduler::Linear => Some(((t - s) / span).max(0.0)),
            LrScheduler::Cosine => Some(0.5 * (1.0 + (PI * progress).cos())),
            LrScheduler::CosineWithRestarts if progress >= 1.0 => Some(0.0),
            LrScheduler::CosineWithRestarts => Some(0.5 * (1.0 + (PI * ((self.cycles as f64 * progress) % 1.0)).cos())),
        }
    }
}

/// A step's gradient norm before clipping, and the squared norm of each gradient tensor (in the order given),
/// so a report can say which modules the gradient goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct GradNorm {
    pub norm: f64,
    pub squares: Vec<f64>,
}

/// torch's `clip_grad_norm_` over all gradients at once: every gradient is multiplied by
/// c = max_norm / (norm + 1e-6) of the global L2 norm when c < 1, i.e. when the norm exceeds `max_norm`. Returns the
/// norm before clipping, for the log.
///
/// The squares are summed in f64 because a LoRA has tens of millions of gradient elements, over which an f32 sum
/// loses digits. `max_norm` ≤ 0 only measures. A non-finite norm is returned without touching the gradients:
/// scaling by 0 would turn infinities into NaN and hide which step went wrong, and the caller skips such a step
/// anyway.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<GradNorm> {
    if grads.is_empty() {
        return Ok(GradNorm { norm: 0.0, squares: Vec::new() });
    }
    let squares =
        grads.iter().map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && norm.is_finite() && coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    let squares = squares.iter().map(Tensor::to_scalar::<f64>).collect::<candle_core::Result<_>>()?;
    Ok(GradNorm { norm, squares })
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("two parameters are named `{0}`: optimizer state is saved by name")]
    DuplicateName(String),
    #[error("{expected} parameters but {got} gradients")]
    GradCount { expected: usize, got: usize },
    #[error("the gradient of `{name}` has shape {got:?}, the parameter {expected:?}")]
    GradShape { name: String, expected: Shape, got: Shape },
    #[error("optimizer state lacks `{0}`")]
    MissingState(String),
    #[error("optimizer state has `{0}`, which belongs to no parameter")]
    UnexpectedState(String),
    #[error("optimizer state `{name}` has shape {got:?}, the parameter {expected:?}")]
    StateShape { name: String, expected: Shape, got: Shape },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// AdamW's hyper-parameters other than the learning rate, which comes from the schedule at every step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&TrainingConfig> for AdamWHyper {
    fn from(t: &TrainingConfig) -> AdamWHyper {
        AdamWHyper { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_epsilon, weight_decay: t.weight_decay }
    }
}

/// What a checkpoint needs to continue AdamW exactly: the step count (for the bias correction) and both moments of
/// every parameter, named `<param>.exp_avg` and `<param>.exp_avg_sq` as in torch's state dict.
#[derive(Debug, Clone)]
pub struct AdamWState {
    pub step: u64,
    pub tensors: Vec<(String, Tensor)>,
}

struct Param {
    name: String,
    var: Var,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// torch's `AdamW` (no amsgrad) over named variables, with its moments in f32 whatever the variables' dtype, so that
/// bf16 adapters still accumulate small updates.
pub struct AdamW {
    hyper: AdamWHyper,
    params: Vec<Param>,
    step: u64,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, hyper: AdamWHyper) -> Result<AdamW, OptimError> {
        let mut seen = HashSet::new();
        let params = params
            .into_iter()
            .map(|(name, var)| {
                if !seen.insert(name.clone()) {
                    return Err(OptimError::DuplicateName(name));
                }
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Ok(Param { name, var, exp_avg: zeros.clone(), exp_avg_sq: zeros })
            })
            .collect::<Result<_, OptimError>>()?;
        Ok(AdamW { hyper, params, step: 0 })
    }

    /// Updates completed so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update; `grads` are in the order the parameters were given. The steps match torch's
    /// `_single_tensor_adam` with decoupled decay: θ ← θ·(1 − lr·wd), then m ← β₁m + (1 − β₁)g,
    /// v ← β₂v + (1 − β₂)g², θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε). Nothing changes when an argument is
    /// wrong.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<(), OptimError> {
        if grads.len() != self.params.len() {
            return Err(OptimError::GradCount { expected: self.params.len(), got: grads.len() });
        }
        for (p, g) in self.params.iter().zip(grads) {
            if g.shape() != p.var.shape() {
                let (expected, got) = (p.var.shape().clone(), g.shape().clone());
                return Err(OptimError::GradShape { name: p.name.clone(), expected, got });
            }
        }
        self.step += 1;
        let AdamWHyper { beta1, beta2, eps, weight_decay } = self.hyper;
        let t = self.step as f64;
        let step_size = lr / (1.0 - beta1.powf(t));
        let inv_bias_correction2_sqrt = 1.0 / (1.0 - beta2.powf(t)).sqrt();
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let theta = p.var.as_detached_tensor().to_dtype(DType::F32)?.affine(1.0 - lr * weight_decay, 0.0)?;
            p.exp_avg = (p.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            p.exp_avg_sq = (p.exp_avg_sq.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = p.exp_avg_sq.sqrt()?.affine(inv_bias_correction2_sqrt, eps)?;
            let theta = (theta - (&p.exp_avg / denom)?.affine(step_size, 0.0)?)?;
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    pub fn state(&self) -> AdamWState {
        let tensors = self
            .params
            .iter()
            .flat_map(|p| {
                [
                    (format!("{}.{EXP_AVG}", p.name), p.exp_avg.clone()),
                    (format!("{}.{EXP_AVG_SQ}", p.name), p.exp_avg_sq.clone()),
                ]
            })
            .collect();
        AdamWState { step: self.step, tensors }
    }

    /// Restores a saved state. Every parameter's moments must be there with its shape, and nothing else may be: a
    /// state that does not fit means the adapter layout changed, and continuing would silently start some moments
    /// from zero. Nothing changes on error.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<(), OptimError> {
        let mut saved: HashMap<&str, &Tensor> = state.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let mut take = |kind: &str| {
                let name = format!("{}.{kind}", p.name);
                let t = saved.remove(name.as_str()).ok_or_else(|| OptimError::MissingState(name.clone()))?;
                if t.shape() != p.var.shape() {
                    let (expected, got) = (p.var.shape().clone(), t.shape().clone());
                    return Err(OptimError::StateShape { name, expected, got });
                }
                Ok(t.to_dtype(DType::F32)?.to_device(p.var.device())?)
            };
            restored.push((take(EXP_AVG)?, take(EXP_AVG_SQ)?));
        }
        if let Some(extra) = saved.keys().min() {
            return Err(OptimError::UnexpectedState(extra.to_string()));
        }
        for (p, (exp_avg, exp_avg_sq)) in self.params.iter_mut().zip(restored) {
            p.exp_avg = exp_avg;
            p.exp_avg_sq = exp_avg_sq;
        }
        self.step = state.step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn schedule(scheduler: LrScheduler, warmup: u64) -> LrSchedule {
        let training = TrainingConfig {
            scheduler,
            learning_rate: 1e-3,
            lr_min: 1e-5,
            lr_warmup_steps: warmup,
            lr_num_cycles: 2,
            ..TrainingConfig::default()
        };
        LrSchedule::new(&training, 110)
    }

    /// The rate for a decay factor f after warmup.
    fn decayed(f: f64) -> f64 {
        1e-5 + (1e-3 - 1e-5) * f
    }

    fn assert_lrs(s: &LrSchedule, expected: &[(u64, f64)]) {
        for &(step, lr) in expected {
            let got = s.lr(step);
            assert!((got - lr).abs() < 1e-15, "{:?} step {step}: {got} != {lr}", s.scheduler);
        }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        for scheduler in
            [LrScheduler::ConstantWithWarmup, LrScheduler::Linear, LrScheduler::Cosine, LrScheduler::CosineWithRestarts]
        {
            assert_lrs(&schedule(scheduler, 10), &[(0, 0.0), (1, 1e-4), (5, 5e-4), (9, 9e-4), (10, 1e-3)]);
        }
    }

    #[test]
    fn constant_schedules_ignore_the_floor() {
        let constant = [(0, 1e-3), (5, 1e-3), (110, 1e-3), (500, 1e-3)];
        assert_lrs(&schedule(LrScheduler::Constant, 10), &constant);
        assert_lrs(&schedule(LrScheduler::ConstantWithWarmup, 10), &[(5, 5e-4), (10, 1e-3), (110, 1e-3), (500, 1e-3)]);
    }

    #[test]
    fn linear_decays_to_the_floor() {
        // span T − w = 100: factor (110 − s) / 100.
        assert_lrs(
            &schedule(LrScheduler::Linear, 10),
            &[
                (10, decayed(1.0)),
                (35, decayed(0.75)),
                (60, decayed(0.5)),
                (109, decayed(0.01)),
                (110, 1e-5),
                (200, 1e-5),
            ],
        );
        // Without warmup: span 110.
        assert_lrs(&schedule(LrScheduler::Linear, 0), &[(0, 1e-3), (55, decayed(0.5)), (110, 1e-5)]);
    }

    #[test]
    fn cosine_follows_half_a_period() {
        let f = |p: f64| 0.5 * (1.0 + (PI * p).cos());
        assert_lrs(
            &schedule(LrScheduler::Cosine, 10),
            &[
                (10, 1e-3),
                (35, decayed(0.5 + 2f64.sqrt() / 4.0)),
                (60, decayed(0.5)),
                (85, decayed(f(0.75))),
                (110, 1e-5),
                (160, 1e-5),
            ],
        );
    }

    #[test]
    fn cosine_with_restarts_restarts_every_cycle() {
        // Two cycles over 100 steps: progress p = (s − 10) / 100, phase (2p) mod 1.
        let f = |phase: f64| 0.5 * (1.0 + (PI * phase).cos());
        assert_lrs(
            &schedule(LrScheduler::CosineWithRestarts, 10),
            &[
                (10, 1e-3),
                (35, decayed(0.5)),
                (59, decayed(f(0.98))),
                (60, 1e-3),
                (85, decayed(0.5)),
                (109, decayed(f(0.98))),
                (110, 1e-5),
                (300, 1e-5),
            ],
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_keeps_the_direction() {
        let dev = Device::Cpu;
        let original = [Tensor::new(&[3f32, 4.0], &dev).unwrap(), Tensor::new(&[[12f32]], &dev).unwrap()];
        let mut grads = original.clone();
        assert_eq!(clip_grad_norm(&mut grads, 1.0).unwrap(), GradNorm { norm: 13.0, squares: vec![25.0, 144.0] });
        let after: Vec<f32> = grads.iter().flat_map(|g| g.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
        let norm = after.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm <= 1.0 && norm > 1.0 - 1e-6, "{norm}");
        for (a, b) in after.iter().zip([3.0, 4.0, 12.0]) {
            assert!((*a as f64 - b / 13.0).abs() < 1e-6, "{a} vs {}", b / 13.0);
        }

        for max_norm in [20.0, 0.0] {
            let mut grads = original.clone();
            assert_eq!(clip_grad_norm(&mut grads, max_norm).unwrap().norm, 13.0);
            assert_eq!(grads[0].to_vec1::<f32>().unwrap(), [3.0, 4.0]);
        }

        let mut bad = vec![Tensor::new(&[f32::INFINITY, 1.0], &dev).unwrap()];
        assert_eq!(clip_grad_norm(&mut bad, 1.0).unwrap().norm, f64::INFINITY);
        assert_eq!(bad[0].to_vec1::<f32>().unwrap(), [f32::INFINITY, 1.0]);
        assert_eq!(clip_grad_norm(&mut [], 1.0).unwrap().norm, 0.0);
    }

    const HYPER: AdamWHyper = AdamWHyper { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };

    /// torch's single-tensor AdamW written out for one scalar, in f64.
    struct ScalarAdamW {
        theta: f64,
        m: f64,
        v: f64,
        t: i32,
    }

    impl ScalarAdamW {
        fn step(&mut self, g: f64, lr: f64) {
            let h = HYPER;
            self.t += 1;
            self.theta *= 1.0 - lr * h.weight_decay;
            self.m = h.beta1 * self.m + (1.0 - h.beta1) * g;
            self.v = h.beta2 * self.v + (1.0 - h.beta2) * g * g;
            let bias_correction1 = 1.0 - h.beta1.powi(self.t);
            let bias_correction2 = 1.0 - h.beta2.powi(self.t);
            let denom = self.v.sqrt() / bias_correction2.sqrt() + h.eps;
            self.theta -= lr / bias_correction1 * self.m / denom;
        }
    }

    /// Deterministic values spread over four decades below `top`, so that some gradients are around eps.
    fn values(n: usize, seed: usize, top: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed * 13) as f32 * 0.37).sin() * top * 10f32.powi(-((i % 4) as i32))).collect()
    }

    fn grads(step: usize, dev: &Device) -> Vec<Tensor> {
        vec![
            Tensor::from_vec(values(6, step + 1, 10.0), (2, 3), dev).unwrap(),
            Tensor::from_vec(values(4, step + 100, 10.0), 4, dev).unwrap(),
        ]
    }

    fn vars(dev: &Device) -> Vec<(String, Var)> {
        vec![
            (
                "a.lora_down".to_string(),
                Var::from_tensor(&Tensor::from_vec(values(6, 0, 1.0), (2, 3), dev).unwrap()).unwrap(),
            ),
            (
                "a.lora_up".to_string(),
                Var::from_tensor(&Tensor::from_vec(values(4, 50, 1.0), 4, dev).unwrap()).unwrap(),
            ),
        ]
    }

    fn flat(var: &Var) -> Vec<f32> {
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    const LRS: [f64; 6] = [0.0, 5e-3, 1e-2, 1e-2, 3e-3, 1e-3];

    #[test]
    fn adamw_matches_torch_formulas() {
        let dev = Device::Cpu;
        let params = vars(&dev);
        let mut reference: Vec<ScalarAdamW> = params
            .iter()
            .flat_map(|(_, v)| flat(v))
            .map(|x| ScalarAdamW { theta: x as f64, m: 0.0, v: 0.0, t: 0 })
            .collect();
        let mut opt = AdamW::new(params.clone(), HYPER).unwrap();
        for (step, lr) in LRS.into_iter().enumerate() {
            let g = grads(step, &dev);
            let g_flat: Vec<f32> = g.iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
            for (r, g) in reference.iter_mut().zip(g_flat) {
                r.step(g as f64, lr);
            }
            opt.step(&g, lr).unwrap();
        }
        assert_eq!(opt.step_count(), LRS.len() as u64);
        let got: Vec<f32> = params.iter().flat_map(|(_, v)| flat(v)).collect();
        for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
            assert!((*g as f64 - r.theta).abs() < 1e-6, "element {i}: {g} vs {}", r.theta);
        }
    }

    #[test]
    fn bf16_parameters_keep_their_dtype_and_f32_moments() {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::ones(4, DType::BF16, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], HYPER).unwrap();
        opt.step(&[Tensor::ones(4, DType::BF16, &dev).unwrap()], 1e-2).unwrap();
        assert_eq!(var.dtype(), DType::BF16);
        assert!(opt.state().tensors.iter().all(|(_, t)| t.dtype() == DType::F32));
        let updated = var.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(updated.iter().all(|&x| (x - 0.989).abs() < 4e-3), "{updated:?}");
    }

    #[test]
    fn save_load_continue_is_bitwise_identical() {
        let dev = Device::Cpu;
        let straight = vars(&dev);
        let mut opt = AdamW::new(straight.clone(), HYPER).unwrap();
        for (step, lr) in LRS.into_iter().enumerate() {
            opt.step(&grads(step, &dev), lr).unwrap();
        }

        let first = vars(&dev);
        let mut before = AdamW::new(first.clone(), HYPER).unwrap();
        for (step, lr) in LRS.into_iter().enumerate().take(3) {
            before.step(&grads(step, &dev), lr).unwrap();
        }
        let state = before.state();
        assert_eq!(state.step, 3);
        let names: Vec<&str> = state.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["a.lora_down.exp_avg", "a.lora_down.exp_avg_sq", "a.lora_up.exp_avg", "a.lora_up.exp_avg_sq"]
        );
        drop(before);

        let resumed: Vec<(String, Var)> =
            first.iter().map(|(n, v)| (n.clone(), Var::from_tensor(&v.as_detached_tensor()).unwrap())).collect();
        let mut after = AdamW::new(resumed.clone(), HYPER).unwrap();
        after.load_state(&state).unwrap();
        for (step, lr) in LRS.into_iter().enumerate().skip(3) {
            after.step(&grads(step, &dev), lr).unwrap();
        }
        assert_eq!(after.step_count(), LRS.len() as u64);
        for ((_, a), (_, b)) in straight.iter().zip(&resumed) {
            let bits = |v: &Var| flat(v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn mismatched_state_is_named_and_changes_nothing() {
        let dev = Device::Cpu;
        let mut opt = AdamW::new(vars(&dev), HYPER).unwrap();
        opt.step(&grads(0, &dev), 1e-2).unwrap();
        let good = opt.state();

        let mut missing = good.clone();
        missing.tensors.retain(|(n, _)| n != "a.lora_up.exp_avg_sq");
        let mut extra = good.clone();
        extra.tensors.push(("b.lora_up.exp_avg".into(), Tensor::zeros(4, DType::F32, &dev).unwrap()));
        let mut reshaped = good.clone();
        reshaped.tensors[2].1 = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();

        let mut fresh = AdamW::new(vars(&dev), HYPER).unwrap();
        for (state, expected) in [
            (missing, "lacks `a.lora_up.exp_avg_sq`"),
            (extra, "has `b.lora_up.exp_avg`"),
            (reshaped, "`a.lora_up.exp_avg` has shape [2, 2], the parameter [4]"),
        ] {
            let err = fresh.load_state(&state).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert_eq!(fresh.step_count(), 0);
        }
        fresh.load_state(&good).unwrap();
        assert_eq!(fresh.step_count(), 1);
    }

    #[test]
    fn wrong_gradients_are_named() {
        let dev = Device::Cpu;
        let mut opt = AdamW::new(vars(&dev), HYPER).unwrap();
        let err = opt.step(&grads(0, &dev)[..1], 1e-2).unwrap_err().to_string();
        assert!(err.contains("2 parameters but 1 gradients"), "{err}");
        let mut g = grads(0, &dev);
        g[1] = Tensor::zeros(5, DType::F32, &dev).unwrap();
        let err = opt.step(&g, 1e-2).unwrap_err().to_string();
        assert!(err.contains("`a.lora_up`"), "{err}");
        assert_eq!(opt.step_count(), 0);

        let twice = vec![vars(&dev).remove(0), vars(&dev).remove(0)];
        assert!(AdamW::new(twice, HYPER).is_err_and(|e| e.to_string().contains("`a.lora_down`")));
    }
}
