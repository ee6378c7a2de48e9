//! `acrf train`: a job in this process, or with `--workers N` under a coordinator here with N local worker
//! processes.

use acrf_worker::device;
use anyhow::{Result, bail};

use crate::args::TrainArgs;
use crate::console::stop_on_signals;
use crate::estimate;
use crate::job::{self, ResumeFrom};
use crate::launch::local::train_with_local_workers;
use crate::observe::progress_bar;

pub fn run(args: TrainArgs) -> Result<()> {
    let TrainArgs { config, sets, resume, print_config, device: dev, device_memory, workers, devices } = args;
    let cfg = job::load_config(&config, &sets)?;
    if print_config {
        print!("{}", cfg.to_toml_string()?);
        return Ok(());
    }
    let device = device::open(&dev)?;
    let limit = estimate::memory_limit(&cfg, device_memory, Some(&device))?;
    if limit.is_some() {
        estimate::check(&estimate::job_workload(&cfg, device.is_cuda(), None, None)?, limit)?;
    }
    let from = match resume.as_deref() {
        None | Some("latest") => ResumeFrom::Config,
        Some(step) => {
            ResumeFrom::Step(step.parse().map_err(|_| anyhow::anyhow!("--resume {step}: not a step number"))?)
        }
    };
    let stop = stop_on_signals()?;
    if let Some(n) = workers {
        if from != ResumeFrom::Config {
            bail!("--resume STEP is for single-process runs; a distributed run resumes from its newest checkpoint");
        }
        let done = train_with_local_workers(&cfg, n, &devices, stop, progress_bar())?;
        done.print(&format!("acrf train {} --workers {n}", config.display()));
        return Ok(());
    }
    let done = job::train_here(&cfg, &device, from, stop)?;
    if done.outcome.stopped_early {
        println!("stopped at step {}; continue with: acrf train {}", done.outcome.steps_done, config.display());
    }
    if let Some(url) = &done.outcome.lora_url {
        println!("LoRA: {url}");
    }
    Ok(())
}
