//! `acrf plan`: a job's predicted peak memory per rank and FLOPs per step, from its file or from the
//! synthetic flags, without loading anything.

use std::path::Path;

use acrf_worker::device;
use acrf_worker::estimate::Workload;
use anyhow::Result;

use crate::args::PlanArgs;
use crate::{estimate, job};

pub fn run(args: PlanArgs) -> Result<()> {
    let PlanArgs { config, sets, device, device_memory, resolution, caption_tokens, synthetic } = args;
    let gpu = device::cuda_ordinal(&device)?.is_some();
    let latent = resolution.as_deref().map(estimate::parse_resolution).transpose()?;
    let (cfg, workload) = match config {
        Some(path) => {
            let cfg = job::load_config(&path, &sets)?;
            let workload = estimate::job_workload(&cfg, gpu, latent, caption_tokens)?;
            (cfg, workload)
        }
        None => {
            let mut cfg = synthetic.config(Path::new("."));
            job::apply_sets(&mut cfg, &sets)?;
            let (hw, cap) = synthetic.shapes();
            let shapes = (latent.unwrap_or(hw), caption_tokens.unwrap_or(cap));
            let workload = Workload::new(&cfg, synthetic.model_config(), gpu, shapes.0, shapes.1);
            (cfg, workload)
        }
    };
    print!("{}", estimate::table(&workload, estimate::memory_limit(&cfg, device_memory, None)?));
    Ok(())
}
