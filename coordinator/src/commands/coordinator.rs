//! `acrf coordinator`: coordinates a job whose workers are started elsewhere, and hands out their token.

use acrf_common::config::{Collective, Config, ModelDtype};
use acrf_worker::checkpoint::{Checkpointer, Start};
use anyhow::Result;

use crate::args::CoordinatorArgs;
use crate::console::{Outcome, stop_on_signals};
use crate::control;
use crate::job::{self, writer_id};
use crate::launch::cluster::{TOKEN_VAR, write_token_file};
use crate::observe::progress_bar;

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let CoordinatorArgs { config, listen, advertise, identity, token_file, sets, resume } = args;
    let cfg = job::load_config(&config, &sets)?;
    let again = format!("acrf coordinator {}", config.display());
    let _run = job::lock_run(&cfg)?;
    // Decided before anything listens, so that a refused resume or a finished run needs no worker to say so.
    let start = Checkpointer::new(&cfg, &writer_id())?.start(resume.request()?)?;
    if let Start::Finished { step, lora_url } = start {
        Outcome::finished_before(step, lora_url).print(&again);
        return Ok(());
    }
    let l = control::listen(&cfg, listen, advertise, identity.as_deref())?;
    println!("coordinator listening on {}", l.endpoint.local_addr()?);
    let token = l.token.encode();
    match &token_file {
        Some(path) => {
            write_token_file(path, &token)?;
            println!("join token written to {}", path.display());
        }
        None => println!("join with: {TOKEN_VAR}={token} acrf worker --device {}", worker_device(&cfg)),
    }
    let stop = stop_on_signals()?;
    let done = control::serve(&cfg, l, start, stop, progress_bar())?;
    done.print(&again);
    Ok(())
}

/// The `--device` the join hint suggests: `cpu` for a job written for CPUs — f32 weights (CPUs have no fast
/// bf16) and no NCCL — and the first GPU otherwise. The job has no device of its own; each worker names its.
fn worker_device(cfg: &Config) -> &'static str {
    if cfg.model.dtype == ModelDtype::F32 && cfg.distributed.collective != Collective::Nccl { "cpu" } else { "cuda:0" }
}
