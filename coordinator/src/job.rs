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
use acrf_worker::collective::Local;
use acrf_worker::run::{self, Observer, Output, RunOutcome};
use acrf_worker::train::{StepReport, Trainer};
use anyhow::{Context, Result, bail};
use candle_core::{Device, DeviceLocation};
use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::observe::{MetricsLog, progress_bar};
use crate::status::{Board, StatusServer};

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

/// What a run in this process shows: progress bar, metrics file, live status page, and the stop flag.
pub struct Console {
    pub bar: ProgressBar,
    pub stop: Arc<AtomicBool>,
    pub board: Board,
    run: BlockingStore,
    /// Opened when training (re)starts, since only then is it known which lines are being redone.
    metrics: Option<MetricsLog>,
    _server: Option<StatusServer>,
    last: Instant,
    log_every: u64,
}

impl Console {
    /// The console of `cfg`'s run folder `run`, with its status page started (and its address printed) when
    /// `status.listen` asks for one.
    pub fn new(cfg: &Config, run: BlockingStore, bar: ProgressBar, stop: Arc<AtomicBool>) -> Result<Console> {
        let board = Board::new(&cfg.run_name);
        let server = match cfg.status.address()? {
            Some(addr) => {
                let server = StatusServer::start(addr, board.clone())
                    .with_context(|| format!("serving the status page on status.listen = {addr}"))?;
                println!("status of {}: {}", cfg.run_name, server.url());
                Some(server)
            }
            None => None,
        };
        Ok(Console {
            bar,
            stop,
            board,
            run,
            metrics: None,
            _server: server,
            last: Instant::now(),
            log_every: cfg.training.log_every_n_steps.max(1),
        })
    }

    /// Training (re)starts at `start` of `total` steps: metrics of later steps are dropped (that work is being
    /// redone), and the bar and the status page continue from there.
    pub fn start(&mut self, start: u64, total: u64) -> Result<()> {
        let metrics = MetricsLog::open(&self.run, start)?;
        self.board.start(start, total, metrics.points());
        self.metrics = Some(metrics);
        self.bar.set_length(total);
        self.bar.set_position(start);
        self.bar.reset_eta();
        self.last = Instant::now();
        Ok(())
    }

    /// Records a step from every rank's report, in rank order.
    pub fn record(&mut self, reports: &[StepReport]) {
        let Some(r) = reports.first() else { return };
        let elapsed = self.last.elapsed().as_secs_f64();
        self.last = Instant::now();
        let samples_per_s = if elapsed > 0.0 { r.samples as f64 / elapsed } else { 0.0 };
        let rank_sigmas = reports.iter().map(|r| r.rank_sigmas.clone()).collect();
        let ema = match self.metrics.as_mut().map(|m| m.append(r, samples_per_s, rank_sigmas)) {
            Some(Ok(ema)) => ema,
            Some(Err(e)) => {
                warn!("metrics.jsonl: {e:#}");
                f64::NAN
            }
            None => {
                warn!("step {} reported before training started: not recorded", r.step);
                return;
            }
        };
        self.board.step(reports, ema);
        self.bar.set_position(r.step);
        self.bar.set_message(format!("loss {:.4} ema {:.4} lr {:.2e}", r.loss, ema, r.lr));
        if r.step.is_multiple_of(self.log_every) && self.bar.is_hidden() {
            info!(step = r.step, loss = r.loss, ema, lr = r.lr, grad_norm = r.grad_norm, "step");
        }
    }

    /// The run ended, well or not: the bar goes, the page says how, and the metrics are uploaded.
    pub fn finish(&self, ok: bool) {
        self.bar.finish_and_clear();
        self.board.set_state(if ok { "finished" } else { "failed" });
        self.sync_metrics();
    }

    /// Uploads the metrics when the output is an object store.
    fn sync_metrics(&self) {
        if let Some(Err(e)) = self.metrics.as_ref().map(MetricsLog::sync) {
            warn!("uploading metrics.jsonl: {e:#}");
        }
    }

    pub fn checkpointed(&mut self, step: u64, lora_url: &str) {
        self.board.checkpoint(step, lora_url);
        self.sync_metrics();
    }

    /// Every loss recorded so far, the steps before a resume included.
    pub fn losses(&self) -> Vec<f64> {
        self.metrics.as_ref().map(MetricsLog::losses).unwrap_or_default()
    }
}

impl Observer for Console {
    fn on_step(&mut self, report: &StepReport) {
        self.record(std::slice::from_ref(report));
    }

    fn stop_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn on_checkpoint(&mut self, step: u64, lora_url: &str) {
        self.checkpointed(step, lora_url);
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
    let output = output_store(cfg)?;
    let checkpoints = Checkpoints::new(&output, &cfg.run_name, &writer_id())?;
    let restored = find_resume(cfg, &checkpoints, from, device)?;
    let micro_batches = restored.as_ref().map_or(cfg.training.gradient_accumulation, |r| r.state.micro_batches);
    let run_url = checkpoints.root().url().to_string();
    let mut console = Console::new(cfg, checkpoints.root().clone(), progress_bar(), stop)?;
    console.board.set_ranks([(hostname(), device_name(device))]);
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

/// This machine's name, for the status page.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// How `--device` names `device`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
