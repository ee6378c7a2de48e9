//! The fixed evaluation loss of `[eval]`: the velocity MSE of held-out items at the clamped anchors of one σ
//! grid, each (item, anchor) pair with its own fixed noise.
//!
//! The training loss of a step cannot compare two jobs: its value depends on which σ the job sampled (the loss
//! scale falls steeply with σ), on its Min-SNR weights and on its loss mode. This one is the same function of
//! the weights for every job that shares `eval.seed`, the grid and the dataset, whatever its sampling, seed,
//! γ or mode, and it is taken on items the job never trained on.
//!
//! The pairs are shared over the ranks (pair p goes to rank p mod W) and each pair's loss travels in its own
//! slot of an f64 buffer, zero on every other rank, so the all-reduced buffer holds every loss exactly and the
//! mean taken from it in pair order has the same bits at any world size.

use acrf_common::config::{AcrfConfig, EvalConfig};
use acrf_common::rng::{self, Key, domain};
use acrf_common::schedule;
use candle_core::{DType, Result, Tensor};

use crate::collective::Collective;
use crate::data::Item;
use crate::flow;
use crate::lora::Lora;
use crate::model::ZImageTransformer;

/// The held-out items and the grid they are scored on.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluator {
    held_out: Vec<usize>,
    sigmas: Vec<f64>,
    seed: u64,
    every: u64,
}

/// `count` of `n_items` item indices, ascending: the first `count` of a shuffle keyed by `seed` alone, so every
/// job with that seed holds out the same items.
pub fn held_out_items(n_items: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_items).collect();
    rng::shuffle(Key::new(seed, domain::EVAL_SPLIT, 0, 0), &mut order);
    let mut held = order[..count.min(n_items)].to_vec();
    held.sort_unstable();
    held
}

impl Evaluator {
    /// The evaluation of a dataset of `n_items` items, or `None` when `eval.holdout` holds none out.
    pub fn new(eval: &EvalConfig, acrf: &AcrfConfig, n_items: usize) -> Option<Evaluator> {
        let count = eval.holdout_count(n_items);
        if count == 0 {
            return None;
        }
        let k = if eval.turbo_steps > 0 { eval.turbo_steps } else { acrf.turbo_steps };
        let shift = if eval.shift > 0.0 { eval.shift } else { acrf.shift };
        Some(Evaluator {
            held_out: held_out_items(n_items, count, eval.seed),
            sigmas: schedule::anchors(k, shift).into_iter().map(schedule::clamp_sigma).collect(),
            seed: eval.seed,
            every: eval.every_n_steps,
        })
    }

    /// The items kept out of training, ascending.
    pub fn held_out(&self) -> &[usize] {
        &self.held_out
    }

    /// Whether to evaluate after `done` of `total` steps.
    pub fn due(&self, done: u64, total: u64) -> bool {
        done == total || (self.every > 0 && done.is_multiple_of(self.every))
    }

    fn pairs(&self) -> usize {
        self.held_out.len() * self.sigmas.len()
    }

    /// The evaluation loss of `lora` over every rank of `collective`; all ranks must call it together.
    pub fn evaluate(
        &self,
        model: &ZImageTransformer,
        lora: &Lora,
        collective: &mut dyn Collective,
        mut item: impl FnMut(usize) -> Result<Item>,
    ) -> Result<f64> {
        let (rank, world, k) = (collective.rank(), collective.world_size(), self.sigmas.len());
        let mut losses = vec![0f64; self.pairs()];
        for p in (rank..self.pairs()).step_by(world) {
            let (index, anchor) = (self.held_out[p / k], p % k);
            let noise = Key::new(self.seed, domain::EVAL_NOISE, index as u64, anchor as u64);
            losses[p] = velocity_mse(model, lora, &item(index)?, self.sigmas[anchor], noise)?;
        }
        let device = model.device();
        let all = collective.all_reduce_sum(&Tensor::new(losses.as_slice(), device)?)?.to_vec1::<f64>()?;
        Ok(all.iter().sum::<f64>() / all.len() as f64)
    }
}

/// mean((v_pred − v)²) of `item` noised to `sigma` with the noise of `noise`.
fn velocity_mse(model: &ZImageTransformer, lora: &Lora, item: &Item, sigma: f64, noise: Key) -> Result<f64> {
    let device = model.device();
    let x0 = item.latent.to_dtype(DType::F32)?.to_device(device)?.unsqueeze(0)?;
    let mut eps = vec![0f32; x0.elem_count()];
    rng::fill_normal_f32(noise, &mut eps);
    let eps = Tensor::from_vec(eps, x0.dims(), device)?;
    let sigma = Tensor::new(&[sigma as f32], device)?;
    let x_t = flow::noised(&x0, &eps, &sigma)?;
    let caption = item.caption.to_device(device)?.to_dtype(model.dtype())?;
    let out =
        model.forward(&[x_t.get(0)?.unsqueeze(1)?], &flow::model_time(&sigma)?, &[caption], &lora.view(false, 1.0))?;
    let v_pred = flow::velocity_from_model(&out[0].squeeze(1)?.to_dtype(DType::F32)?)?;
    let err = (v_pred - flow::velocity_target(&x0.get(0)?, &eps.get(0)?)?)?;
    Ok(f64::from(err.sqr()?.mean_all()?.to_scalar::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_a_function_of_the_seed_and_the_grid_of_the_config() {
        let held = held_out_items(32, 8, 3);
        assert_eq!(held.len(), 8);
        assert!(held.windows(2).all(|w| w[0] < w[1]) && held[7] < 32, "{held:?}");
        assert_eq!(held, held_out_items(32, 8, 3));
        assert_ne!(held, held_out_items(32, 8, 4), "another seed, other items");

        let acrf = AcrfConfig { turbo_steps: 4, ..AcrfConfig::default() };
        let none = EvalConfig::default();
        assert!(Evaluator::new(&none, &acrf, 32).is_none(), "nothing held out, nothing to evaluate");
        let quarter = EvalConfig { holdout: 0.25, every_n_steps: 5, ..EvalConfig::default() };
        let e = Evaluator::new(&quarter, &acrf, 32).unwrap();
        assert_eq!(e.held_out(), held_out_items(32, 8, 0));
        assert_eq!(e.sigmas.len(), 4, "the job's K when eval.turbo_steps is 0");
        assert_eq!(e.sigmas[0], schedule::clamp_sigma(1.0), "the anchors are clamped as training clamps them");
        let fixed = EvalConfig { holdout: 3.0, turbo_steps: 10, ..quarter };
        let e = Evaluator::new(&fixed, &acrf, 32).unwrap();
        assert_eq!((e.held_out().len(), e.sigmas.len()), (3, 10), "a count, and a grid of its own");
        assert!(e.due(5, 12) && e.due(12, 12) && !e.due(6, 12));
    }
}
