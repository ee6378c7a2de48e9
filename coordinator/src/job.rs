//! A training job: its config (the file and `--set` overrides), its output, and the single-process run with a
//! progress bar, metrics and a clean stop on SIGINT/SIGTERM (the step in flight finishes and is checkpointed).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::{Config, Resume};
use acrf_common::store::BlockingStore;
use acrf_worker::checkpoint as ckpt;
use acrf_worker::collective::Local;
use acrf_worker::run::{self, Output, RunOutcome};
use acrf_worker::train::Trainer;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use tracing::info;

use crate::console::{Console, hostname};
use crate::observe::progress_bar;

/// Which checkpoint to continue from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// `checkpoint.resume` decides: the newest valid one under "auto", none under "never".
    Config,
    /// `--resume STEP`.
    Step(u64),
}

/// Reads a job file and applies `key=value` overrides.
pub fn load_config(path: &Path, sets: &[String]) -> Result<Config> {
    let mut cfg = Config::load(path)?;
    apply_sets(&mut cfg, sets)?;
    Ok(cfg)
}

/// Applies `key=value` overrides in order.
pub fn apply_sets(cfg: &mut Config, sets: &[String]) -> Result<()> {
    for set in sets {
        let (key, value) = set.split_once('=').with_context(|| format!("--set {set}: expected key=value"))?;
        cfg.set_dotted(key.trim(), value.trim())?;
    }
    Ok(())
}

/// The job's `output`, opened with its `[storage]` settings.
pub fn output_store(cfg: &Config) -> Result<BlockingStore> {
    BlockingStore::for_job(&cfg.output, &cfg.storage).with_context(|| format!("output {}", cfg.output))
}

/// A name for this process in checkpoint manifests and blob paths.
pub fn writer_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("p{}-{nanos:08x}", std::process::id())
}

/// Finds the checkpoint to resume from and checks that it was trained with the same settings.
pub fn find_resume(
    cfg: &Config,
    checkpoints: &Checkpoints,
    from: ResumeFrom,
    device: &Device,
) -> Result<Option<ckpt::Restored>> {
    let found = match (from, cfg.checkpoint.resume) {
        (ResumeFrom::Step(step), _) => {
            let newer: Vec<String> =
                checkpoints.committed_steps()?.into_iter().filter(|&s| s > step).map(|s| s.to_string()).collect();
            if !newer.is_empty() {
                bail!(
                    "run `{}` has checkpoints newer than step {step} (steps {}); continuing from {step} would \
                     rewrite them: delete them from {} first, or resume into another run_name",
                    cfg.run_name,
                    newer.join(", "),
                    checkpoints.root().url()
                );
            }
            Some(checkpoints.load(step)?)
        }
        (ResumeFrom::Config, Resume::Auto) => checkpoints.latest_valid()?,
        (ResumeFrom::Config, Resume::Never) => {
            if let Some(step) = checkpoints.committed_steps()?.last() {
                bail!(
                    "run `{}` at {} already has checkpoints (up to step {step}) and checkpoint.resume = \"never\": \
                     choose another run_name or output, or resume",
                    cfg.run_name,
                    checkpoints.root().url()
                );
            }
            None
        }
    };
    let Some((manifest, blobs)) = found else { return Ok(None) };
    let origin = checkpoints.root().url_of(&format!("ckpt/{:010}", manifest.step));
    let restored = ckpt::read(&blobs, &origin, device)?;
    let differing = restored.config.diff_training(cfg);
    if !differing.is_empty() {
        bail!(
            "the checkpoint at {origin} was trained with different settings: {}. Restore them, or start a new \
             run (another run_name or output)",
            differing.join(", ")
        );
    }
    Ok(Some(restored))
}

pub struct Finished {
    pub outcome: RunOutcome,
    pub losses: Vec<f64>,
    pub run_url: String,
}

/// Trains `cfg` as a single rank in this process on `device`.
pub fn train_here(cfg: &Config, device: &Device, from: ResumeFrom, stop: Arc<AtomicBool>) -> Result<Finished> {
    let output = output_store(cfg)?;
    let checkpoints = Checkpoints::new(&output, &cfg.run_name, &writer_id())?;
    let restored = find_resume(cfg, &checkpoints, from, device)?;
    let micro_batches = restored.as_ref().map_or(cfg.training.gradient_accumulation, |r| r.state.micro_batches);
    let run_url = checkpoints.root().url().to_string();
    let mut console = Console::new(cfg, checkpoints.root().clone(), progress_bar(), stop)?;
    console.board.set_ranks([(hostname(), acrf_worker::device::name(device))]);
    let out = Output { checkpoints, exports: output, run_name: cfg.run_name.clone() };
    let outcome = train_rank(cfg, device, restored, micro_batches, &out, &mut console);
    console.finish(outcome.is_ok());
    let outcome = outcome?;
    Ok(Finished { outcome, losses: console.losses(), run_url })
}

/// Runs `cfg` as the only rank: builds the trainer, restores `restored`, and trains, writing to `output`.
fn train_rank(
    cfg: &Config,
    device: &Device,
    restored: Option<ckpt::Restored>,
    micro_batches: usize,
    output: &Output,
    console: &mut Console,
) -> Result<RunOutcome> {
    let mut trainer = Trainer::new(cfg, Box::new(Local), device, micro_batches)?;
    if let Some(r) = &restored {
        trainer.restore(&r.lora, &r.optimizer, r.state)?;
        info!(step = r.state.step, "resumed from the checkpoint of step {}", r.state.step);
    }
    console.start(trainer.state().step, trainer.total_steps())?;
    Ok(run::run(&mut trainer, Some(output), console)?)
}
