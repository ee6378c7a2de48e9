//! `acrf sample`: one image from the base model and a LoRA, rendered exactly as the training samples are, so
//! a LoRA can be checked without another tool.

use acrf_common::config::ModelDtype;
use acrf_worker::adapters::Merged;
use acrf_worker::device;
use acrf_worker::lora::{Lora, LoraView};
use acrf_worker::model::{ModelSource, ZImageTransformer};
use acrf_worker::sample::{self, SampleSettings, Sampler};
use acrf_worker::train::compute_dtype;
use anyhow::{Context, Result, bail};

use crate::args::SampleArgs;

pub fn run(args: &SampleArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let device = device::open(&args.device)?;
    let dtype = compute_dtype(ModelDtype::Auto, device.is_cuda());
    let source = ModelSource::locate(&args.model, None)?;
    let adapters = Merged::load(&args.adapters, &source.config, &device)?;
    let model = ZImageTransformer::load_merged(&source, dtype, &device, adapters.deltas()?)?;
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
