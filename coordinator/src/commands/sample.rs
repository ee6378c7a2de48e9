//! `acrf sample`: one image from the base model and a LoRA, rendered exactly as the training samples are, so
//! a LoRA can be checked without another tool.

use acrf_common::config::ModelDtype;
use acrf_worker::adapters::Merged;
use acrf_worker::device;
use acrf_worker::lora::{Lora, LoraView};
use acrf_worker::model::{ModelSource, ZImageTransformer};
use acrf_worker::sample::{self, SampleSettings, Sampler};
use acrf_worker::train::compute_dtype;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

use crate::args::SampleArgs;
use crate::exit::refused;

/// How far `--strength` may scale a LoRA: beyond it the update swamps the base weights and the image is noise
/// (and NaN or infinity make it black).
const MAX_STRENGTH: f64 = 10.0;

pub fn run(args: &SampleArgs) -> Result<()> {
    check(args).map_err(refused)?;
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
    let started = Instant::now();
    let image = sampler.render(&model, &lora, 0, &mut |done, steps| {
        eprintln!("sampling: step {done}/{steps}, {:.1} s", started.elapsed().as_secs_f64());
    })?;
    std::fs::write(&args.out, sample::png(&image)?).with_context(|| args.out.display().to_string())?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// What can be refused before anything is loaded: the flags' ranges and where the PNG goes.
fn check(args: &SampleArgs) -> Result<()> {
    if args.steps == 0 {
        return Err(anyhow!("--steps must be at least 1"));
    }
    if !(args.strength.is_finite() && args.strength.abs() <= MAX_STRENGTH) {
        return Err(anyhow!(
            "--strength {}: must be a finite number in [-{MAX_STRENGTH}, {MAX_STRENGTH}] (1 is the LoRA as trained, 0 the \
             base model)",
            args.strength
        ));
    }
    let folder = args.out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(folder) = folder.filter(|f| !f.is_dir()) {
        return Err(anyhow!("--out {}: the folder {} does not exist", args.out.display(), folder.display()));
    }
    Ok(())
}
