//! A training job in this process: config, resume decision, the rank's loop with a progress bar and
//! metrics, and a clean stop on SIGINT/SIGTERM (the step in flight finishes and is checkpointed).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::{Config, Resume};
use acrf_common::store::BlockingStore;
use acrf_worker::checkpoint as ckpt;
use acrf_worker::collective::{Collective, Local};
use acrf_worker::run::{self, Observer, Output, RunOutcome};
use acrf_worker::train::{StepReport, Trainer};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::observe::{MetricsLog, progress_bar};

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

/// Progress bar, metrics file and the stop flag of a run in this process.
pub struct Console {
    pub bar: ProgressBar,
    pub metrics: MetricsLog,
    pub stop: Arc<AtomicBool>,
    last: Instant,
    log_every: u64,
}

impl Console {
    pub fn new(total: u64, start: u64, metrics: MetricsLog, stop: Arc<AtomicBool>, log_every: u64) -> Console {
        Console { bar: progress_bar(total, start), metrics, stop, last: Instant::now(), log_every: log_every.max(1) }
    }

    /// Records a step of a multi-rank group from every rank's report, in rank order.
    pub fn record_ranks(&mut self, reports: &[StepReport]) {
        if let Some(first) = reports.first() {
            self.record_with(first, Some(reports.iter().map(|r| r.rank_sigmas.clone()).collect()));
        }
    }

    /// Records a step whatever rank computed it.
    pub fn record(&mut self, r: &StepReport) {
        self.record_with(r, None);
    }

    fn record_with(&mut self, r: &StepReport, rank_sigmas: Option<Vec<Vec<f64>>>) {
        let elapsed = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let samples_per_s = if elapsed > 0.0 { r.samples as f64 / elapsed } else { 0.0 };
        let ema = match self.metrics.append(r, samples_per_s, rank_sigmas) {
            Ok(ema) => ema,
            Err(e) => {
                warn!("metrics.jsonl: {e:#}");
                f64::NAN
            }
        };
        self.bar.set_position(r.step);
        self.bar.set_message(format!("loss {:.4} ema {:.4} lr {:.2e}", r.loss, ema, r.lr));
        if r.step.is_multiple_of(self.log_every) && self.bar.is_hidden() {
            info!(step = r.step, loss = r.loss, ema, lr = r.lr, grad_norm = r.grad_norm, "step");
        }
    }

    pub fn checkpointed(&mut self) {
        if let Err(e) = self.metrics.sync() {
            warn!("uploading metrics.jsonl: {e:#}");
        }
    }
}

impl Observer for Console {
    fn on_step(&mut self, report: &StepReport) {
        self.record(report);
    }

    fn stop_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn on_checkpoint(&mut self, _step: u64, _lora_url: &str) {
        self.checkpointed();
    }
}

/// Sets the returned flag on SIGINT or SIGTERM, so the run saves before it exits.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

pub struct Finished {
    pub outcome: RunOutcome,
    pub losses: Vec<f64>,
    pub run_url: String,
}

/// Trains `cfg` as a single rank in this process on `device`.
pub fn train_here(cfg: &Config, device: &Device, from: ResumeFrom, stop: Arc<AtomicBool>) -> Result<Finished> {
    let output = BlockingStore::from_url(&cfg.output).with_context(|| format!("output {}", cfg.output))?;
    let checkpoints = Checkpoints::new(&output, &cfg.run_name, &writer_id())?;
    let restored = find_resume(cfg, &checkpoints, from, device)?;
    let micro_batches = restored.as_ref().map_or(cfg.training.gradient_accumulation, |r| r.state.micro_batches);
    let run_url = checkpoints.root().url().to_string();
    let start = restored.as_ref().map_or(0, |r| r.state.step);
    let metrics = MetricsLog::open(checkpoints.root(), start)?;
    let mut console = Console::new(0, start, metrics, stop, cfg.training.log_every_n_steps);
    let out = Output { checkpoints, exports: output, run_name: cfg.run_name.clone() };
    let outcome = train_rank(cfg, Box::new(Local), device, restored, micro_batches, Some(&out), &mut console);
    console.bar.finish_and_clear();
    let outcome = outcome?;
    console.checkpointed();
    Ok(Finished { outcome, losses: console.metrics.losses(), run_url })
}

/// Runs one rank of `cfg`: builds the trainer, restores `restored` (the checkpoint rank 0 read; other ranks
/// get its state through the collective), and trains. Only the rank given `output` writes.
pub fn train_rank(
    cfg: &Config,
    collective: Box<dyn Collective>,
    device: &Device,
    restored: Option<ckpt::Restored>,
    micro_batches: usize,
    output: Option<&Output>,
    observer: &mut dyn TotalAware,
) -> Result<RunOutcome> {
    let mut trainer = Trainer::new(cfg, collective, device, micro_batches)?;
    if let Some(r) = &restored {
        trainer.restore(&r.lora, &r.optimizer, r.state)?;
        info!(step = r.state.step, "resumed from the checkpoint of step {}", r.state.step);
    }
    trainer.sync_from_rank0()?;
    observer.set_total(trainer.total_steps(), trainer.state().step);
    Ok(run::run(&mut trainer, output, observer)?)
}

/// An observer that learns the run's length once the trainer knows it.
pub trait TotalAware: Observer {
    fn set_total(&mut self, total: u64, start: u64);
}

impl TotalAware for Console {
    fn set_total(&mut self, total: u64, start: u64) {
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.bar.reset_eta();
    }
}
