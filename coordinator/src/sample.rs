//! `acrf sample`: one image from the base model and a LoRA, rendered exactly as the training samples are, so
//! a LoRA can be checked without another tool.

use std::path::PathBuf;

use acrf_common::config::ModelDtype;
use acrf_worker::lora::{Lora, LoraView};
use acrf_worker::model::{ModelSource, ZImageTransformer};
use acrf_worker::sample::{self, SampleSettings, Sampler};
use acrf_worker::train::compute_dtype;
use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args)]
pub struct SampleArgs {
    /// A diffusers Z-Image pipeline folder (transformer/, vae/, text_encoder/, tokenizer/).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA .safetensors (ComfyUI/diffusers, peft or kohya layout); without it, the base model alone.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Turbo sampler steps.
    #[arg(long, default_value_t = 9)]
    pub steps: usize,
    /// Seeds the initial noise; the same seed gives the same PNG.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Scales the LoRA's update.
    #[arg(long, default_value_t = 1.0)]
    pub strength: f64,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Caption tokens the transformer sees.
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the PNG.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: &SampleArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = crate::cli::device(&args.device)?;
    let dtype = compute_dtype(ModelDtype::Auto, device.is_cuda());
    let model = ZImageTransformer::load(&ModelSource::locate(&args.model, None)?, dtype, &device)?;
    let lora = match &args.lora {
        Some(file) => {
            let lora = Lora::load(file, &device)?;
            lora.check_against(model.config(), &file.display().to_string())?;
            lora.view(false, args.strength)
        }
        None => LoraView::none(),
    };
    let settings = SampleSettings { steps: args.steps, seed: args.seed, width: args.width, height: args.height };
    let sampler = Sampler::new(
        &args.model,
        std::slice::from_ref(&args.prompt),
        args.max_sequence_length,
        settings,
        dtype,
        &device,
    )?;
    let png = sample::png(&sampler.render(&model, &lora, 0)?)?;
    std::fs::write(&args.out, png).with_context(|| args.out.display().to_string())?;
    Ok(())
}
