//! Turbo drift: whether a LoRA kept the few-step sampling of Z-Image Turbo. Every sample prompt is rendered
//! from the same noise at `sample.steps` (Turbo) and at `sample.reference_steps`; a distilled model that
//! still samples well in few steps lands close to its many-step render, one whose few-step path broke lands
//! far from it and blurrier. The same numbers for the base model without LoRA are the baseline a run is read
//! against.

use acrf_common::protocol::PromptDrift;
use candle_core::{D, DType, Result, Tensor};
use image::RgbImage;

use crate::lora::LoraView;
use crate::model::ZImageTransformer;
use crate::sample::{SampleError, Sampler, to_image};

/// What PSNR reports for identical images, whose PSNR is infinite.
pub const PSNR_CAP: f64 = 100.0;

/// Renders prompt `index` at the sampler's steps and at `reference_steps` and compares them; returns the
/// drift and the Turbo image.
pub fn measure(
    sampler: &Sampler,
    model: &ZImageTransformer,
    lora: &LoraView,
    index: usize,
    reference_steps: usize,
) -> std::result::Result<(PromptDrift, RgbImage), SampleError> {
    let turbo = sampler.latent(model, lora, index, sampler.settings().steps)?;
    let reference = sampler.latent(model, lora, index, reference_steps)?;
    let (turbo_px, reference_px) = (sampler.decode(&turbo)?, sampler.decode(&reference)?);
    let drift = compare(&turbo, &reference, &turbo_px, &reference_px)?;
    Ok((drift, to_image(&turbo_px)?))
}

/// The drift between two final latents [C, h, w] and their pictures [3, H, W] in [-1, 1].
pub fn compare(turbo: &Tensor, reference: &Tensor, turbo_px: &Tensor, reference_px: &Tensor) -> Result<PromptDrift> {
    let latent_mad = (turbo - reference)?.abs()?.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
    let unit = |px: &Tensor| (px.to_dtype(DType::F64)? / 2.0)?.affine(1.0, 0.5)?.clamp(0.0, 1.0);
    let (a, b) = (unit(turbo_px)?, unit(reference_px)?);
    let mse = (&a - &b)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    let psnr = if mse > 0.0 { (10.0 * (1.0 / mse).log10()).min(PSNR_CAP) } else { PSNR_CAP };
    let (ha, hb) = (high_frequency_energy(&a)?, high_frequency_energy(&b)?);
    let sharpness = if hb > 0.0 { ha / hb } else { 1.0 };
    Ok(PromptDrift { latent_mad, psnr, sharpness })
}

/// The mean squared 4-neighbour Laplacian of a picture [3, H, W] over its interior: the energy of its finest
/// detail, which few-step blur removes first.
fn high_frequency_energy(px: &Tensor) -> Result<f64> {
    let (_, h, w) = px.dims3()?;
    if h < 3 || w < 3 {
        return Ok(0.0);
    }
    let inner = |dy: usize, dx: usize| px.narrow(1, dy, h - 2)?.narrow(D::Minus1, dx, w - 2);
    let laplacian = ((((inner(0, 1)? + inner(2, 1)?)? + inner(1, 0)?)? + inner(1, 2)?)? - (inner(1, 1)? * 4.0)?)?;
    laplacian.sqr()?.mean_all()?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identical_renders_have_no_drift_and_blur_lowers_sharpness() {
        let dev = Device::Cpu;
        let latent = Tensor::randn(0f32, 1., (4, 6, 6), &dev).unwrap();
        let px = (Tensor::randn(0f32, 0.5, (3, 16, 16), &dev).unwrap()).clamp(-1f32, 1f32).unwrap();
        let same = compare(&latent, &latent, &px, &px).unwrap();
        assert_eq!(same, PromptDrift { latent_mad: 0.0, psnr: PSNR_CAP, sharpness: 1.0 });
        // A 2×2 box blur keeps the mean and removes the finest detail.
        let blurred = {
            let pooled = px.unsqueeze(0).unwrap().avg_pool2d(2).unwrap();
            pooled.upsample_nearest2d(16, 16).unwrap().squeeze(0).unwrap()
        };
        let drift = compare(&latent, &(&latent + 0.5).unwrap(), &blurred, &px).unwrap();
        assert!((drift.latent_mad - 0.5).abs() < 1e-6, "{drift:?}");
        assert!(drift.sharpness < 0.5, "{drift:?}");
        assert!(drift.psnr > 0.0 && drift.psnr < PSNR_CAP, "{drift:?}");
    }
}
