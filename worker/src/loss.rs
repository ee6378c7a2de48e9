//! The AC-RF training losses (spec §4, §5): every term per sample, the four loss modes, and the Min-SNR
//! weighted batch mean.
//!
//! Everything is composed from candle ops that have a backward pass (matmul, elementwise ops, reductions,
//! narrow, cat): the fused softmax and norm kernels drop gradients without an error. Inputs are latents
//! `[B, C, H, W]` and σ `[B]`; a term is one value per sample, `[B]`, every mean running over that sample's
//! elements.

mod axis;

use acrf_common::config::{LossConfig, LossMode};
use acrf_common::snr::min_snr_weight;
use candle_core::{DType, Result, Tensor, bail};

use crate::batch::MicroBatch;
use crate::flow;
use axis::{AxisMap, AxisMaps};

/// ε² of the Charbonnier term: `√(d² + ε²) − ε` is smooth at d = 0 and zero there.
const CHARBONNIER_EPS2: f64 = 1e-6;
/// torch's `cosine_similarity` default: each norm is clamped below at this value.
const COSINE_EPS: f64 = 1e-8;
const SSIM_C1: f64 = 1e-4;
const SSIM_C2: f64 = 9e-4;
/// Floor under the squared DFT modulus. `√m` has an infinite slope at m = 0, which is reached where
/// v_pred = v; below the floor the modulus is under 10⁻¹⁵, far beneath anything the term can resolve.
const MODULUS_FLOOR: f64 = 1e-30;
/// The light term reads channel 0; the colour term channels 1, 2 and 3.
const COLOR_CHANNELS: usize = 3;

/// One term of spec §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Term {
    Char,
    Mse,
    Cos,
    Fft,
    Hf,
    Lf,
    Ssim,
    Light,
    Color,
    Tex,
}

impl Term {
    pub const ALL: [Term; 10] = [
        Term::Char,
        Term::Mse,
        Term::Cos,
        Term::Fft,
        Term::Hf,
        Term::Lf,
        Term::Ssim,
        Term::Light,
        Term::Color,
        Term::Tex,
    ];

    /// The spec's name, also used in metrics and fixtures.
    pub fn name(self) -> &'static str {
        match self {
            Term::Char => "char",
            Term::Mse => "mse",
            Term::Cos => "cos",
            Term::Fft => "fft",
            Term::Hf => "hf",
            Term::Lf => "lf",
            Term::Ssim => "ssim",
            Term::Light => "light",
            Term::Color => "color",
            Term::Tex => "tex",
        }
    }
}

impl std::str::FromStr for Term {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Term::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| format!("unknown loss term `{s}`"))
    }
}

/// The per-sample loss of `mode` as a weighted sum of terms (spec §5), terms of zero weight left out so that
/// they are never computed. Unified is half of frequency plus half of style, merged term by term.
pub fn mode_weights(cfg: &LossConfig, mode: LossMode) -> Vec<(Term, f64)> {
    let standard = [
        (Term::Char, cfg.lambda_char),
        (Term::Mse, cfg.lambda_mse),
        (Term::Cos, cfg.lambda_cos),
        (Term::Fft, cfg.lambda_fft),
    ];
    let frequency = [(Term::Mse, 1.0), (Term::Hf, cfg.alpha_hf), (Term::Lf, cfg.beta_lf)];
    let style = [
        (Term::Mse, 1.0),
        (Term::Ssim, cfg.lambda_struct),
        (Term::Light, cfg.lambda_light),
        (Term::Color, cfg.lambda_color),
        (Term::Tex, cfg.lambda_tex),
    ];
    let parts: &[(&[(Term, f64)], f64)] = match mode {
        LossMode::Standard => &[(&standard, 1.0)],
        LossMode::Frequency => &[(&frequency, 1.0)],
        LossMode::Style => &[(&style, 1.0)],
        LossMode::Unified => &[(&frequency, 0.5), (&style, 0.5)],
    };
    let mut weights = [0.0; Term::ALL.len()];
    for &(terms, scale) in parts {
        for &(term, w) in terms {
            weights[term as usize] += scale * w;
        }
    }
    Term::ALL.into_iter().zip(weights).filter(|&(_, w)| w != 0.0).collect()
}

/// Per-sample values `[B]` of the terms that were computed, for the loss and for metrics. They stay attached
/// to the graph; detach them before keeping them beyond the step.
#[derive(Debug, Clone, Default)]
pub struct LossTerms {
    values: [Option<Tensor>; Term::ALL.len()],
}

impl LossTerms {
    pub fn get(&self, term: Term) -> Option<&Tensor> {
        self.values[term as usize].as_ref()
    }

    /// The values without their graph: kept past the backward, attached terms would keep the whole graph of
    /// the model's head alive with them.
    pub fn detach(&self) -> LossTerms {
        LossTerms { values: self.values.clone().map(|v| v.map(|t| t.detach())) }
    }

    /// The computed terms, in [`Term::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Term, &Tensor)> {
        Term::ALL.into_iter().filter_map(|t| self.get(t).map(|v| (t, v)))
    }

    /// `Σ w·term` per sample; every weighted term must have been computed.
    pub fn weighted_sum(&self, weights: &[(Term, f64)]) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for &(term, w) in weights {
            let Some(value) = self.get(term) else {
                bail!("loss term `{}` is weighted but was not computed", term.name());
            };
            let weighted = value.affine(w, 0.0)?;
            sum = Some(match sum {
                Some(s) => (s + weighted)?,
                None => weighted,
            });
        }
        match sum {
            Some(s) => Ok(s),
            None => bail!("the loss has no term with a nonzero weight"),
        }
    }

    fn set(&mut self, term: Term, value: Tensor) {
        self.values[term as usize] = Some(value);
    }
}

/// The per-sample loss of a training step and the terms it was made of.
#[derive(Debug, Clone)]
pub struct SampleLoss {
    /// `[B]`, before the Min-SNR weighting of [`batch_loss`].
    pub loss: Tensor,
    pub terms: LossTerms,
}

/// One micro-batch's part of an optimizer step's loss, and what the step reports of it.
pub struct StepLoss {
    /// Σᵢ wᵢ·lossᵢ / N over the micro-batch's samples, N the step's slots over every rank: the value to
    /// backpropagate, because the sum of it over every micro-batch of every rank is then the loss — and its
    /// gradient the gradient — of the whole step, as one process would compute it.
    pub loss: Tensor,
    /// Each computed term per sample, detached.
    pub terms: LossTerms,
    /// The unweighted loss of each sample.
    pub per_sample: Vec<f32>,
}

/// The loss of one [`LossConfig`]. It keeps the DFT, low-band and blur matrices of every latent size it has
/// seen, so build it once and reuse it across steps.
#[derive(Debug)]
pub struct LossFn {
    cfg: LossConfig,
    maps: AxisMaps,
}

impl LossFn {
    pub fn new(cfg: LossConfig) -> Self {
        LossFn { cfg, maps: AxisMaps::default() }
    }

    pub fn config(&self) -> &LossConfig {
        &self.cfg
    }

    /// The per-sample loss `[B]` of the configured mode, computing only the terms it weights.
    ///
    /// `v_pred` is the predicted velocity (the negated model output, [`flow::velocity_from_model`]); `x0`
    /// the clean latents, `noise` the ε that noised them, `sigma` the `[B]` noise fractions.
    pub fn per_sample_loss(&self, v_pred: &Tensor, x0: &Tensor, noise: &Tensor, sigma: &Tensor) -> Result<SampleLoss> {
        let weights = mode_weights(&self.cfg, self.cfg.loss_mode);
        let wanted: Vec<Term> = weights.iter().map(|&(t, _)| t).collect();
        let terms = self.terms(&wanted, v_pred, x0, noise, sigma)?;
        Ok(SampleLoss { loss: terms.weighted_sum(&weights)?, terms })
    }

    /// The loss of micro-batch `mb` from the transformer's `outputs` (one `[C, 1, H, W]` per sample), as its
    /// part of a step of `n_global` slots (see [`StepLoss::loss`]).
    pub fn step_loss(&self, outputs: &[Tensor], mb: &MicroBatch, n_global: usize) -> Result<StepLoss> {
        let outputs = outputs.iter().map(|o| o.squeeze(1)?.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?;
        let v_pred = flow::velocity_from_model(&Tensor::stack(&outputs, 0)?)?;
        let per_sample = self.per_sample_loss(&v_pred, &mb.x0, &mb.noise, &mb.sigma)?;
        let loss = ((&per_sample.loss * &mb.weight)?.sum_all()? / n_global as f64)?;
        Ok(StepLoss { loss, terms: per_sample.terms.detach(), per_sample: per_sample.loss.to_vec1()? })
    }

    /// The `wanted` terms, each `[B]` and differentiable w.r.t. `v_pred`; arguments as for
    /// [`LossFn::per_sample_loss`].
    pub fn terms(
        &self,
        wanted: &[Term],
        v_pred: &Tensor,
        x0: &Tensor,
        noise: &Tensor,
        sigma: &Tensor,
    ) -> Result<LossTerms> {
        check_inputs(v_pred, x0, noise, sigma)?;
        let wants = |t: Term| wanted.contains(&t);
        let mut terms = LossTerms::default();
        let d = velocity_error(v_pred, x0, noise)?;
        if wants(Term::Char) {
            let charbonnier = ((d.sqr()? + CHARBONNIER_EPS2)?.sqrt()? - CHARBONNIER_EPS2.sqrt())?;
            terms.set(Term::Char, mean_per_sample(&charbonnier)?);
        }
        if wants(Term::Mse) {
            terms.set(Term::Mse, mean_per_sample(&d.sqr()?)?);
        }
        if wants(Term::Cos) {
            terms.set(Term::Cos, cosine_distance(v_pred, &flow::velocity_target(x0, noise)?, &d)?);
        }
        if wants(Term::Fft) {
            terms.set(Term::Fft, self.fft_distance(&d)?);
        }
        if [Term::Hf, Term::Lf, Term::Ssim, Term::Light, Term::Color, Term::Tex].into_iter().any(wants) {
            self.x0_terms(&wants, &flow::x0_error(&d, sigma)?, x0, &mut terms)?;
        }
        Ok(terms)
    }

    /// The terms that compare the reconstruction x̂0 with x0, given `err = x̂0 − x0`.
    fn x0_terms(&self, wants: &impl Fn(Term) -> bool, err: &Tensor, x0: &Tensor, terms: &mut LossTerms) -> Result<()> {
        let x0_hat = (x0 + err)?;
        if wants(Term::Hf) || wants(Term::Tex) {
            // high(x̂0) − high(x0) = high(err): the band split is linear and per channel, so the texture term
            // (channel 0) is a slice of the high-frequency one, and needs only channel 0 on its own.
            let channels = if wants(Term::Hf) { err.dim(1)? } else { 1 };
            let err = err.narrow(1, 0, channels)?;
            let high = (&err - self.low_pass(&err)?)?.abs()?;
            if wants(Term::Hf) {
                terms.set(Term::Hf, mean_per_sample(&high)?);
            }
            if wants(Term::Tex) {
                terms.set(Term::Tex, mean_per_sample(&high.narrow(1, 0, 1)?)?);
            }
        }
        if wants(Term::Lf) {
            let b = x0.dim(0)?;
            let low = self.low_pass(&Tensor::cat(&[x0, err], 0)?)?;
            let (low_x0, low_err) = (low.narrow(0, 0, b)?, low.narrow(0, b, b)?);
            terms.set(Term::Lf, cosine_distance(&(&low_x0 + &low_err)?, &low_x0, &low_err)?);
        }
        if wants(Term::Ssim) {
            terms.set(Term::Ssim, self.ssim_distance(&x0.narrow(1, 0, 1)?, &err.narrow(1, 0, 1)?)?);
        }
        if wants(Term::Light) || wants(Term::Color) {
            let channels = if wants(Term::Color) { 1 + COLOR_CHANNELS } else { 1 };
            if x0.dim(1)? < channels {
                bail!(
                    "the colour loss term reads latent channels 1..={COLOR_CHANNELS}, but the latents have {} channels",
                    x0.dim(1)?
                );
            }
            let gaps = moment_gaps(&x0_hat, x0, err, channels)?;
            if wants(Term::Light) {
                terms.set(Term::Light, gaps.narrow(1, 0, 1)?.squeeze(1)?);
            }
            if wants(Term::Color) {
                terms.set(Term::Color, gaps.narrow(1, 1, COLOR_CHANNELS)?.mean(1)?);
            }
        }
        Ok(())
    }

    /// `low(x)`: the adaptive average pool to (⌊H/p⌋, ⌊W/p⌋), upsampled back bilinearly.
    fn low_pass(&self, x: &Tensor) -> Result<Tensor> {
        self.maps.apply(AxisMap::LowPass { pool: self.cfg.pool }, x)
    }

    /// `mean |F(d)|` with F the orthonormal 2-D DFT per channel; F is linear, so F(v_pred) − F(v) = F(d).
    fn fft_distance(&self, d: &Tensor) -> Result<Tensor> {
        let (re, im) = self.maps.dft2(d)?;
        let modulus = (re.sqr()? + im.sqr()?)?.maximum(MODULUS_FLOOR)?.sqrt()?;
        mean_per_sample(&modulus)
    }

    /// `1 − mean SSIM(x̂0, x0)` over the map, for single-channel `[B, 1, H, W]` images given x0 and
    /// `err = x̂0 − x0`.
    ///
    /// SSIM is `A·B/(C·D)` with `A = 2μ_x̂μ_x + C1` over `C = μ_x̂² + μ_x² + C1` and `B = 2σ_x̂x + C2` over
    /// `D = σ_x̂² + σ_x² + C2` (local moments under the Gaussian window). Since `C − A = μ_e²` and
    /// `D − B = σ_e²`, the local mean and variance of err, `1 − SSIM = (C·σ_e² + D·μ_e² − μ_e²·σ_e²)/(C·D)`.
    /// Computed this way from err it keeps its digits as x̂0 → x0 at low noise, where `1 − A·B/(C·D)` would
    /// round away in f32. The five blurred moments go through the blur in one pass.
    fn ssim_distance(&self, x0: &Tensor, err: &Tensor) -> Result<Tensor> {
        let x0_hat = (x0 + err)?;
        let moments = Tensor::cat(&[x0, err, &x0.sqr()?, &x0_hat.sqr()?, &err.sqr()?], 1)?;
        let blurred = self.maps.apply(AxisMap::Gaussian, &moments)?;
        let m = |i: usize| blurred.narrow(1, i, 1);
        let (mu_x0, mu_err) = (m(0)?, m(1)?);
        let mu_hat = (&mu_x0 + &mu_err)?;
        let (mu_x0_sq, mu_hat_sq, mu_err_sq) = (mu_x0.sqr()?, mu_hat.sqr()?, mu_err.sqr()?);
        let var_err = (m(4)? - &mu_err_sq)?;
        let c = ((&mu_x0_sq + &mu_hat_sq)? + SSIM_C1)?;
        let d = (((m(2)? - mu_x0_sq)? + (m(3)? - mu_hat_sq)?)? + SSIM_C2)?;
        let numerator = (((&c * &var_err)? + (&d * &mu_err_sq)?)? - (&mu_err_sq * &var_err)?)?;
        mean_per_sample(&(numerator / (c * d)?)?)
    }
}

/// Fails with the shapes named unless `v_pred`, `x0` and `noise` share one `[B, C, H, W]` shape and `sigma` is
/// `[B]`.
fn check_inputs(v_pred: &Tensor, x0: &Tensor, noise: &Tensor, sigma: &Tensor) -> Result<()> {
    let (b, _, _, _) = x0.dims4()?;
    if v_pred.shape() != x0.shape() || noise.shape() != x0.shape() {
        bail!(
            "loss inputs: v_pred {:?}, x0 {:?} and noise {:?} must share one [B, C, H, W] shape",
            v_pred.dims(),
            x0.dims(),
            noise.dims()
        );
    }
    if sigma.dims() != [b] {
        bail!("loss inputs: sigma has shape {:?}, expected [{b}] (one σ per sample)", sigma.dims());
    }
    Ok(())
}

/// `d = v_pred − v`, rounded once from f64 intermediates.
///
/// In f32, forming `v = ε − x0` and then `v_pred − v` rounds twice at the scale of the latents (~10⁻⁷), while
/// the Charbonnier gradient `d/√(d² + ε²)` turns with slope 1/ε = 1000 near d = 0: the rounding would show as
/// gradient noise of ~10⁻⁴ relative. The x̂0 terms read d too, through `x̂0 − x0 = −σ·d`.
fn velocity_error(v_pred: &Tensor, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    let wide = |t: &Tensor| t.to_dtype(DType::F64);
    (wide(v_pred)? - flow::velocity_target(&wide(x0)?, &wide(noise)?)?)?.to_dtype(v_pred.dtype())
}

/// The mean over everything but the batch axis: `[B, ...]` → `[B]`.
fn mean_per_sample(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// `1 − cos(flat(a), flat(b))` per sample, given `diff = a − b`, with torch's `cosine_similarity`
/// semantics: each norm clamped below at 10⁻⁸.
///
/// Where the loss matters most, a ≈ b and cos ≈ 1; `1 − a·b/(‖a‖‖b‖)` would then cancel in f32 and lose
/// most of its digits. The form used, `‖a‖‖b‖ − a·b = (‖diff‖² − (‖a‖ − ‖b‖)²)/2` with
/// `‖a‖ − ‖b‖ = diff·(a + b)/(‖a‖ + ‖b‖)`, is computed from the difference itself and keeps them.
fn cosine_distance(a: &Tensor, b: &Tensor, diff: &Tensor) -> Result<Tensor> {
    let (a, b, diff) = (a.flatten_from(1)?, b.flatten_from(1)?, diff.flatten_from(1)?);
    let squared_norm = |t: &Tensor| t.sqr()?.sum(1);
    let (norm_a, norm_b) = (squared_norm(&a)?.sqrt()?, squared_norm(&b)?.sqrt()?);
    let norm_gap = ((&diff * (&a + &b)?)?.sum(1)? / (&norm_a + &norm_b)?)?;
    let gap = ((squared_norm(&diff)? - norm_gap.sqr()?)? * 0.5)?;
    let clamped = (norm_a.maximum(COSINE_EPS)? * norm_b.maximum(COSINE_EPS)?)?;
    // Zero unless a norm is below the clamp, where torch divides a·b by the clamped product.
    let clamp_excess = (&clamped - (norm_a * norm_b)?)?;
    (clamp_excess + gap)? / clamped
}

/// `|μ(x̂0) − μ(x0)| + |s(x̂0) − s(x0)|` for each of the first `channels` channels, `[B, channels]`, with μ
/// and the unbiased std s over (H, W).
///
/// Both gaps are formed from `err = x̂0 − x0` rather than by subtracting two nearly equal moments:
/// `μ(x̂0) − μ(x0) = μ(err)` and `s(x̂0) − s(x0) = Σ err_c·(x̂0_c + x0_c) / ((n − 1)(s(x̂0) + s(x0)))`, with
/// `_c` the centred values.
fn moment_gaps(x0_hat: &Tensor, x0: &Tensor, err: &Tensor, channels: usize) -> Result<Tensor> {
    let plane = |t: &Tensor| t.narrow(1, 0, channels)?.flatten_from(2);
    let centred = |t: &Tensor| {
        let p = plane(t)?;
        p.broadcast_sub(&p.mean_keepdim(2)?)
    };
    let (x0_hat_c, x0_c, err_c) = (centred(x0_hat)?, centred(x0)?, centred(err)?);
    let dof = (x0_c.dim(2)? - 1) as f64;
    let std = |c: &Tensor| (c.sqr()?.sum(2)? / dof)?.sqrt();
    let std_gap = ((err_c * (&x0_hat_c + &x0_c)?)?.sum(2)? / dof)?.div(&(std(&x0_hat_c)? + std(&x0_c)?)?)?;
    let mean_gap = plane(err)?.mean(2)?;
    mean_gap.abs()? + std_gap.abs()?
}

/// The Min-SNR weight of each sample (spec §3); `snr_gamma == 0` gives all ones.
pub fn min_snr_weights(sigma: &Tensor, snr_gamma: f64) -> Result<Vec<f64>> {
    let sigma = sigma.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(sigma.into_iter().map(|s| min_snr_weight(s, snr_gamma)).collect())
}

/// The scalar the optimizer sees for one batch: the mean over samples of `w_i·loss_i`, w the Min-SNR weight
/// of σ_i. The weights are computed on the host from σ so that the formula lives only in
/// [`acrf_common::snr`].
pub fn batch_loss(per_sample: &Tensor, sigma: &Tensor, snr_gamma: f64) -> Result<Tensor> {
    let weights = Tensor::from_vec(min_snr_weights(sigma, snr_gamma)?, per_sample.shape(), per_sample.device())?
        .to_dtype(per_sample.dtype())?;
    (per_sample * weights)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Irregular [B, C, H, W] test latents on a grid of 1/64, so that their differences are exact in f32.
    fn latent(shape: (usize, usize, usize, usize), phase: f64) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let data: Vec<f32> = (0..n).map(|i| ((i as f64 * 0.7371 + phase).sin() * 83.0).round() as f32 / 64.0).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    #[test]
    fn unified_is_half_frequency_plus_half_style() {
        let cfg = LossConfig::default();
        let unified = mode_weights(&cfg, LossMode::Unified);
        let weight = |w: &[(Term, f64)], t: Term| w.iter().find(|(u, _)| *u == t).map_or(0.0, |&(_, w)| w);
        let (freq, style) = (mode_weights(&cfg, LossMode::Frequency), mode_weights(&cfg, LossMode::Style));
        for t in Term::ALL {
            assert_eq!(weight(&unified, t), 0.5 * (weight(&freq, t) + weight(&style, t)), "{}", t.name());
        }
        // λ_mse defaults to 0, so standard mode never computes the MSE.
        assert!(mode_weights(&cfg, LossMode::Standard).iter().all(|&(t, _)| t != Term::Mse));
    }

    #[test]
    fn ssim_distance_is_one_minus_textbook_ssim() -> Result<()> {
        let loss = LossFn::new(LossConfig::default());
        let x = latent((2, 1, 13, 9), 0.3)?.to_dtype(DType::F64)?;
        let zero = x.zeros_like()?;
        let same = loss.ssim_distance(&x, &zero)?.to_vec1::<f64>()?;
        assert!(same.iter().all(|l| l.abs() < 1e-15), "identical images: {same:?}");

        let y = latent((2, 1, 13, 9), 1.7)?.to_dtype(DType::F64)?;
        let blur = |t: &Tensor| loss.maps.apply(AxisMap::Gaussian, t);
        let (mu_x, mu_y) = (blur(&x)?, blur(&y)?);
        let var_x = (blur(&x.sqr()?)? - mu_x.sqr()?)?;
        let var_y = (blur(&y.sqr()?)? - mu_y.sqr()?)?;
        let cov = (blur(&(&x * &y)?)? - (&mu_x * &mu_y)?)?;
        let numerator = ((&mu_x * &mu_y)?.affine(2.0, SSIM_C1)? * cov.affine(2.0, SSIM_C2)?)?;
        let denominator = (((mu_x.sqr()? + mu_y.sqr()?)? + SSIM_C1)? * ((var_x + var_y)? + SSIM_C2)?)?;
        let ssim = (numerator / denominator)?;
        let textbook = mean_per_sample(&ssim)?.affine(-1.0, 1.0)?.to_vec1::<f64>()?;
        let got = loss.ssim_distance(&y, &(&x - &y)?)?.to_vec1::<f64>()?;
        for (g, t) in got.iter().zip(&textbook) {
            assert!((g - t).abs() < 1e-12 && *t > 0.1, "{got:?} vs {textbook:?}");
        }
        Ok(())
    }

    #[test]
    fn gradients_are_finite_at_zero_error() -> Result<()> {
        let shape = (2, 4, 12, 8);
        let (x0, noise) = (latent(shape, 0.1)?, latent(shape, 2.0)?);
        let sigma = Tensor::new(&[0.3f32, 0.8], &Device::Cpu)?;
        let v_pred = Var::from_tensor(&flow::velocity_target(&x0, &noise)?)?;
        let terms = LossFn::new(LossConfig::default()).terms(&Term::ALL, v_pred.as_tensor(), &x0, &noise, &sigma)?;
        let all: Vec<(Term, f64)> = Term::ALL.into_iter().map(|t| (t, 1.0)).collect();
        let total = terms.weighted_sum(&all)?;
        for (term, value) in terms.iter() {
            let value = value.to_vec1::<f32>()?;
            assert!(value.iter().all(|v| v.abs() < 1e-6), "{}: {value:?}", term.name());
        }
        let grads = total.sum_all()?.backward()?;
        let grad = grads.get(v_pred.as_tensor()).expect("v_pred has a gradient");
        let grad = grad.flatten_all()?.to_vec1::<f32>()?;
        assert!(grad.iter().all(|g| g.is_finite()), "non-finite gradient at d = 0");
        Ok(())
    }

    #[test]
    fn colour_needs_four_channels() -> Result<()> {
        let shape = (1, 3, 8, 8);
        let (x0, noise) = (latent(shape, 0.1)?, latent(shape, 2.0)?);
        let sigma = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let loss = LossFn::new(LossConfig::default());
        let err = loss.terms(&[Term::Color], &x0, &x0, &noise, &sigma).unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("3 channels"), "{err}");
        assert!(loss.terms(&[Term::Light], &x0, &x0, &noise, &sigma).is_ok());
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_named() -> Result<()> {
        let x0 = latent((2, 4, 8, 8), 0.1)?;
        let sigma = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let err = LossFn::new(LossConfig::default()).per_sample_loss(&x0, &x0, &x0, &sigma).unwrap_err();
        assert!(err.to_string().contains("sigma has shape [1], expected [2]"), "{err}");
        Ok(())
    }
}
