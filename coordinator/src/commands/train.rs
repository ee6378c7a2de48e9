//! `acrf train`: a job in this process, or with `--workers N` under a coordinator here with N local worker
//! processes.

use acrf_worker::device;
use anyhow::Result;

use crate::args::TrainArgs;
use crate::console::stop_on_signals;
use crate::estimate;
use crate::exit::{Exit, refused};
use crate::job;
use crate::launch::local::train_with_local_workers;
use crate::observe::progress_bar;

pub fn run(args: TrainArgs) -> Result<Exit> {
    let TrainArgs { config, sets, resume, print_config, device: dev, device_memory, workers, devices } = args;
    let cfg = job::load_config(&config, &sets)?;
    if print_config {
        print!("{}", cfg.to_toml_string()?);
        return Ok(Exit::Finished);
    }
    let device = device::open(&dev)?;
    let limit = estimate::memory_limit(&cfg, device_memory, Some(&device))?;
    if limit.is_some() {
        estimate::check(&estimate::job_workload(&cfg, device.is_cuda(), None, None)?, limit).map_err(refused)?;
    }
    let req = resume.request()?;
    let stop = stop_on_signals()?;
    let (outcome, again) = match workers {
        Some(n) => (
            train_with_local_workers(&cfg, n, &devices, req, stop, progress_bar())?,
            format!("acrf train {} --workers {n}", config.display()),
        ),
        None => (job::train_here(&cfg, &device, req, stop)?.outcome, format!("acrf train {}", config.display())),
    };
    outcome.print(&again);
    Ok(Exit::of_run(outcome.stopped_early))
}
