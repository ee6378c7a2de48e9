//! A micro-batch: the slots the plan assigned (σ, noise seed) joined with the items the epoch plan assigned
//! (clean latent, caption), noised by the conventions of spec §1.
//!
//! Every value here is a pure function of (seed, step, slot, item), so the same micro-batch is built
//! bit for bit by whichever rank, on whichever run, trains it.

use acrf_common::plan::Slot;
use acrf_common::rng;
use acrf_common::snr::min_snr_weight;
use candle_core::{DType, Device, Result, Tensor};

use crate::data::Item;
use crate::flow;

pub struct MicroBatch {
    /// Clean latents [b, C, H, W].
    pub x0: Tensor,
    /// ε [b, C, H, W].
    pub noise: Tensor,
    /// σ [b] (f32).
    pub sigma: Tensor,
    /// Min-SNR weight of each sample [b] (f32).
    pub weight: Tensor,
    /// Noised latents, one [C, 1, H, W] per sample, as the transformer takes them.
    pub x_t: Vec<Tensor>,
    /// Model time 1 − σ [b].
    pub t: Tensor,
    pub captions: Vec<Tensor>,
    pub sigmas: Vec<f64>,
}

impl MicroBatch {
    /// Builds the micro-batch of `slots` and `items` (same length, one bucket) on `device`, the latents in
    /// f32 (the loss is computed in f32) and the captions cast to `dtype`.
    pub fn new(slots: &[Slot], items: &[Item], snr_gamma: f64, dtype: DType, device: &Device) -> Result<MicroBatch> {
        if slots.len() != items.len() || slots.is_empty() {
            candle_core::bail!("{} slots for {} items", slots.len(), items.len());
        }
        let shape = items[0].latent.dims().to_vec();
        if let Some(odd) = items.iter().find(|i| i.latent.dims() != shape.as_slice()) {
            candle_core::bail!(
                "item {} has latent {:?}, the micro-batch's bucket is {:?}",
                odd.id,
                odd.latent.dims(),
                shape
            );
        }
        let n: usize = shape.iter().product();
        let mut noise = Vec::with_capacity(n * slots.len());
        for s in slots {
            let mut eps = vec![0f32; n];
            rng::fill_normal_f32(s.noise_key(), &mut eps);
            noise.extend(eps);
        }
        let b = slots.len();
        let dims: Vec<usize> = std::iter::once(b).chain(shape.iter().copied()).collect();
        let noise = Tensor::from_vec(noise, dims, device)?;
        let x0 = Tensor::stack(&items.iter().map(|i| i.latent.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?, 0)?
            .to_device(device)?;
        let sigmas: Vec<f64> = slots.iter().map(|s| s.sigma).collect();
        let sigma = Tensor::from_vec(sigmas.iter().map(|&s| s as f32).collect::<Vec<_>>(), b, device)?;
        let weight = Tensor::from_vec(
            sigmas.iter().map(|&s| min_snr_weight(s, snr_gamma) as f32).collect::<Vec<_>>(),
            b,
            device,
        )?;
        let noised = flow::noised(&x0, &noise, &sigma)?;
        let x_t = (0..b).map(|i| noised.get(i)?.unsqueeze(1)).collect::<Result<Vec<_>>>()?;
        let captions =
            items.iter().map(|i| i.caption.to_device(device)?.to_dtype(dtype)).collect::<Result<Vec<_>>>()?;
        Ok(MicroBatch { t: flow::model_time(&sigma)?, x0, noise, sigma, weight, x_t, captions, sigmas })
    }

    /// The same noisy inputs, σ and captions trained toward the velocity `v` [b, C, H, W] instead of the
    /// clean latents, each sample's weight scaled by `scale`: the clean latent becomes x_t − σ·v and the
    /// noise x0 + v, which keeps x_t = σ·ε + (1 − σ)·x0 and makes ε − x0 = v, so every loss term (velocity
    /// and x̂0 alike) compares the prediction with `v`.
    pub fn toward(self, v: &Tensor, scale: f64) -> Result<MicroBatch> {
        let x_t = Tensor::stack(
            &self.x_t.iter().map(|x| x.squeeze(1)?.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let x0 = flow::x0_estimate(&x_t, v, &self.sigma)?;
        let noise = (&x0 + v)?;
        Ok(MicroBatch { x0, noise, weight: (self.weight * scale)?, ..self })
    }

    pub fn len(&self) -> usize {
        self.sigmas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sigmas.is_empty()
    }
}
