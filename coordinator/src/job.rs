//! A training job: its config (the file and `--set` overrides), its output, and the single-process run with a
//! progress bar, metrics and a clean stop on SIGINT/SIGTERM (the step in flight finishes and is checkpointed).

use std::fs::TryLockError;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use acrf_common::config::Config;
use acrf_common::store::{BlockingStore, Location};
use acrf_worker::checkpoint::{Checkpointer, ResumeRequest, Start};
use acrf_worker::collective::Local;
use acrf_worker::run::{self, RunOutcome};
use acrf_worker::train::Trainer;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use tracing::info;

use crate::console::{Console, Outcome, hostname};
use crate::observe::progress_bar;

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

/// The run folder, held by the process that trains the run (the single process or the coordinator) until
/// it ends: a second `acrf train` or coordinator of the same run is refused before it writes anything — its
/// metrics lines would interleave with the first's. Only a local output can be locked; on an object store
/// the create-only manifests refuse a second writer at its first checkpoint, and a run that never committed
/// one uploads no metrics (see `Console`).
#[must_use = "the run is locked only while this lives"]
pub struct RunLock {
    /// The locked folder; the lock goes when it is closed.
    _folder: Option<std::fs::File>,
}

/// Locks `cfg`'s run folder (see [`RunLock`]).
pub fn lock_run(cfg: &Config) -> Result<RunLock> {
    let Location::Local(output) = Location::parse(&cfg.output)? else { return Ok(RunLock { _folder: None }) };
    let dir = output.join("runs").join(&cfg.run_name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the run folder {}", dir.display()))?;
    let folder = std::fs::File::open(&dir).with_context(|| format!("opening the run folder {}", dir.display()))?;
    match folder.try_lock() {
        Ok(()) => Ok(RunLock { _folder: Some(folder) }),
        Err(TryLockError::WouldBlock) => bail!(
            "run `{}` in {} is being trained by another acrf process; a run has one writer: wait for that one to \
             end or stop it",
            cfg.run_name,
            dir.display()
        ),
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking the run folder {}", dir.display())),
    }
}

/// A name for this process in checkpoint manifests and blob paths.
pub fn writer_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("p{}-{nanos:08x}", std::process::id())
}

/// What a run in this process did: how it ended, every loss recorded (the steps before a resume
/// included), and its run folder.
pub struct Finished {
    pub outcome: Outcome,
    pub losses: Vec<f64>,
    pub run_url: String,
}

/// Trains `cfg` as the only rank in this process on `device`, continuing as `req` asks.
pub fn train_here(cfg: &Config, device: &Device, req: ResumeRequest, stop: Arc<AtomicBool>) -> Result<Finished> {
    let _run = lock_run(cfg)?;
    let checkpointer = Checkpointer::new(cfg, &writer_id())?;
    let run_url = checkpointer.run_folder().url().to_string();
    let (restore, micro_batches) = match checkpointer.start(req)? {
        Start::Finished { step, lora_url } => {
            return Ok(Finished { outcome: Outcome::finished_before(step, lora_url), losses: vec![], run_url });
        }
        Start::Fresh => (None, cfg.training.gradient_accumulation),
        Start::Resume { step, micro_batches } => (Some(step), micro_batches),
    };
    let mut console = Console::new(cfg, checkpointer.run_folder().clone(), progress_bar(), stop)?;
    console.board.set_ranks([(hostname(), acrf_worker::device::name(device))]);
    let outcome = train_rank(cfg, device, &checkpointer, restore, micro_batches, &mut console);
    console.finish(outcome.is_ok());
    let outcome = outcome?;
    Ok(Finished { outcome: Outcome::trained(outcome), losses: console.losses(), run_url })
}

/// Runs `cfg` as the only rank: builds the trainer for the global batch `micro_batches`, restores the
/// checkpoint of step `restore` if any, and trains.
fn train_rank(
    cfg: &Config,
    device: &Device,
    checkpointer: &Checkpointer,
    restore: Option<u64>,
    micro_batches: usize,
    console: &mut Console,
) -> Result<RunOutcome> {
    let mut trainer = Trainer::new(cfg, Box::new(Local), device, micro_batches)?;
    if let Some(step) = restore {
        trainer.restore(&checkpointer.load(step, device)?)?;
        info!(step, "resumed from the checkpoint of step {step}");
    }
    console.start(trainer.state().step, trainer.total_steps())?;
    Ok(run::run(&mut trainer, Some(checkpointer), console)?)
}
