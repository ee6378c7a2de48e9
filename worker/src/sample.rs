//! Turbo sampling as diffusers' `ZImagePipeline` does it without CFG: FlowMatchEuler over
//! s_k(linspace(1, 1/N, N)) plus a final 0, model time 1 − σ, the model's output negated into a velocity,
//! and Euler steps x ← x + (σ_next − σ)·v. The AC-RF anchors are these sigmas, which is why a LoRA trained
//! on them is judged with this sampler.

use candle_core::{DType, Result, Tensor};

use crate::flow;
use crate::lora::LoraView;
use crate::model::ZImageTransformer;

/// Denoises `noise` [C, H, W] under `caption` [L, cap_dim] in `steps` Euler steps; returns the latent.
pub fn sample_latent(
    model: &ZImageTransformer,
    noise: &Tensor,
    caption: &Tensor,
    steps: usize,
    shift: f64,
    lora: &LoraView,
) -> Result<Tensor> {
    let sigmas = pipeline_sigmas(steps, shift);
    let mut x = noise.to_dtype(DType::F32)?;
    for w in sigmas.windows(2) {
        let (sigma, next) = (w[0], w[1]);
        // The pipeline passes timesteps σ·1000 and divides (1000 − t)/1000 in f32; reproduce that rounding.
        let t_model = (1000f32 - sigma * 1000f32) / 1000f32;
        let t = Tensor::new(&[t_model], x.device())?;
        let out = model.forward(&[x.unsqueeze(1)?], &t, std::slice::from_ref(caption), lora)?;
        let v = flow::velocity_from_model(&out[0].squeeze(1)?.to_dtype(DType::F32)?)?;
        x = (x + (v * (next - sigma) as f64)?)?;
    }
    Ok(x)
}

/// The pipeline's sigmas as it computes them: the linspace in f64, then the shift in f32 arithmetic, plus the
/// final 0. Matching its rounding matters because the model sees 1000·(1 − σ) inside a sinusoid.
pub fn pipeline_sigmas(steps: usize, shift: f64) -> Vec<f32> {
    let n = steps.max(1);
    let k = shift as f32;
    let step = if n > 1 { (1.0 / n as f64 - 1.0) / (n - 1) as f64 } else { 0.0 };
    let mut sigmas: Vec<f32> = (0..n)
        .map(|i| {
            let u = (1.0 + i as f64 * step) as f32;
            k * u / (1.0 + (k - 1.0) * u)
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}
