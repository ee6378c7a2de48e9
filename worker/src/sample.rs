//! Turbo sampling as diffusers' `ZImagePipeline` does it without CFG: FlowMatchEuler over
//! s_k(linspace(1, 1/N, N)) plus a final 0, model time 1 − σ, the model's output negated into a velocity,
//! and Euler steps x ← x + (σ_next − σ)·v. The AC-RF anchors are these sigmas, which is why a LoRA trained
//! on them is judged with this sampler.
//!
//! [`Sampler`] turns prompts into PNGs with it: the prompts are encoded once (the text encoder is dropped
//! right after, since it is larger than the transformer), the initial noise comes from the counter-based rng
//! keyed by the seed and the prompt's index, and the PNG encoding is fixed, so a seed always gives the same
//! bytes.

use std::path::Path;

use acrf_common::config::SampleConfig;
use acrf_common::rng::{self, Key, domain};
use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;

use crate::cache::CacheError;
use crate::cache::encode::{ModelFiles, TextEncoder, VaeDecoder};
use crate::flow;
use crate::lora::LoraView;
use crate::model::ZImageTransformer;

/// Z-Image Turbo's scheduler shift, for pipeline folders without `scheduler/scheduler_config.json`.
const TURBO_SHIFT: f64 = 3.0;

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Boxed: a pipeline error is large and rare, and every sample result would carry its size.
    #[error(transparent)]
    Pipeline(Box<CacheError>),
    #[error("{0}")]
    Options(String),
    #[error("encoding the prompt {prompt:?}: {source}")]
    Prompt { prompt: String, source: candle_core::Error },
    #[error("encoding a PNG: {0}")]
    Png(#[from] image::ImageError),
    #[error(transparent)]
    Store(#[from] acrf_common::store::StoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<CacheError> for SampleError {
    fn from(e: CacheError) -> Self {
        SampleError::Pipeline(Box::new(e))
    }
}

/// What every image of a sampler shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSettings {
    pub steps: usize,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
}

impl From<&SampleConfig> for SampleSettings {
    fn from(c: &SampleConfig) -> Self {
        SampleSettings { steps: c.steps, seed: c.seed, width: c.width, height: c.height }
    }
}

/// Encoded prompts and the VAE decoder of a diffusers Z-Image pipeline folder, ready to render with any
/// transformer and LoRA.
pub struct Sampler {
    settings: SampleSettings,
    shift: f64,
    latent_channels: usize,
    downsample: usize,
    prompts: Vec<Tensor>,
    decoder: VaeDecoder,
}

impl Sampler {
    /// Encodes `prompts` with the pipeline's text encoder in `dtype` (as the pipeline runs it) and loads the VAE
    /// decoder, both on `device`.
    pub fn new(
        pipeline: &Path,
        prompts: &[String],
        max_sequence_length: usize,
        settings: SampleSettings,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Sampler, SampleError> {
        let files = ModelFiles::locate(pipeline)?;
        let align = 2 * files.downsample();
        if settings.width == 0
            || settings.height == 0
            || !settings.width.is_multiple_of(align)
            || !settings.height.is_multiple_of(align)
        {
            return Err(SampleError::Options(format!(
                "a sample of {}x{} cannot be made: width and height must be positive multiples of {align} (the \
                 VAE's {}x downsampling times the transformer's 2x2 patches)",
                settings.width,
                settings.height,
                files.downsample()
            )));
        }
        let text = TextEncoder::load(&files, max_sequence_length, dtype, device)?;
        let prompts = prompts
            .iter()
            .map(|p| {
                text.encode(p).map(|c| c.features).map_err(|source| SampleError::Prompt { prompt: p.clone(), source })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        drop(text);
        Ok(Sampler {
            settings,
            shift: scheduler_shift(pipeline)?,
            latent_channels: files.latent_channels(),
            downsample: files.downsample(),
            prompts,
            decoder: VaeDecoder::load(&files, device)?,
        })
    }

    pub fn prompts(&self) -> usize {
        self.prompts.len()
    }

    /// The image of prompt `index` under `model` with `lora`.
    pub fn render(
        &self,
        model: &ZImageTransformer,
        lora: &LoraView,
        index: usize,
    ) -> std::result::Result<RgbImage, SampleError> {
        let latent = self.latent(model, lora, index, self.settings.steps)?;
        Ok(to_image(&self.decode(&latent)?)?)
    }

    /// The settings every image shares.
    pub fn settings(&self) -> SampleSettings {
        self.settings
    }

    /// The latent of prompt `index` under `model` with `lora` after `steps` sampler steps, from the prompt's
    /// noise (the same for any number of steps).
    pub fn latent(
        &self,
        model: &ZImageTransformer,
        lora: &LoraView,
        index: usize,
        steps: usize,
    ) -> std::result::Result<Tensor, SampleError> {
        if model.config().in_channels != self.latent_channels {
            return Err(SampleError::Options(format!(
                "the transformer takes latents of {} channels, the VAE makes {}",
                model.config().in_channels,
                self.latent_channels
            )));
        }
        let s = self.settings;
        let shape = (self.latent_channels, s.height / self.downsample, s.width / self.downsample);
        let mut noise = vec![0f32; shape.0 * shape.1 * shape.2];
        rng::fill_normal_f32(Key::new(s.seed, domain::SAMPLE_NOISE, 0, index as u64), &mut noise);
        let noise = Tensor::from_vec(noise, shape, model.device())?;
        Ok(sample_latent(model, &noise, &self.prompts[index], steps, self.shift, lora)?)
    }

    /// The picture [3, H, W] in [-1, 1] of a latent.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        self.decoder.decode(latent)
    }
}

/// The shift of the pipeline's FlowMatchEuler scheduler.
fn scheduler_shift(pipeline: &Path) -> std::result::Result<f64, SampleError> {
    let path = pipeline.join("scheduler/scheduler_config.json");
    if !path.is_file() {
        return Ok(TURBO_SHIFT);
    }
    let bad = |message: String| CacheError::Model { file: path.display().to_string(), message };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    match json.get("shift") {
        None => Ok(TURBO_SHIFT),
        Some(v) => {
            Ok(v.as_f64().filter(|k| *k > 0.0).ok_or_else(|| bad(format!("`shift` is {v}, not a positive number")))?)
        }
    }
}

/// A decoded picture [3, H, W] in [-1, 1] as 8-bit RGB, rounded as diffusers' `numpy_to_pil` rounds
/// (`round(255·clamp(x/2 + 1/2, 0, 1))`, ties to even).
pub fn to_image(pixels: &Tensor) -> Result<RgbImage> {
    let (_, h, w) = pixels.dims3()?;
    let unit = ((pixels.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let values: Vec<f32> = unit.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes = values.iter().map(|v| (v * 255.0).round_ties_even() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| candle_core::Error::msg("pixel buffer of the wrong size"))
}

/// The PNG of `image`, with fixed compression and filter settings and no time stamp, so that the same pixels
/// always give the same bytes.
pub fn png(image: &RgbImage) -> std::result::Result<Vec<u8>, SampleError> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive).write_image(
        image.as_raw(),
        image.width(),
        image.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

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
