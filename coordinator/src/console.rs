//! What a run in this process shows a person: the progress bar, the metrics file, the live status page, and
//! the stop flag that SIGINT and SIGTERM set.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use acrf_common::config::Config;
use acrf_common::store::BlockingStore;
use acrf_worker::run::{Observer, RunOutcome};
use acrf_worker::train::StepReport;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::observe::MetricsLog;
use crate::status::{Board, StatusServer};

/// What a run in this process shows: progress bar, metrics file, live status page, and the stop flag.
pub struct Console {
    pub bar: ProgressBar,
    pub stop: Arc<AtomicBool>,
    pub board: Board,
    run: BlockingStore,
    /// Opened when training (re)starts, since only then is it known which lines are being redone.
    metrics: Option<MetricsLog>,
    _server: Option<StatusServer>,
    /// This run committed a checkpoint: only then are its metrics uploaded (see `sync_metrics`).
    committed: bool,
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
            committed: false,
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

    /// Uploads the metrics when the output is an object store, once this run has committed a checkpoint: a
    /// run refused at its first commit (another writer of the same run) must not replace that writer's
    /// metrics with its own.
    fn sync_metrics(&self) {
        if !self.committed {
            return;
        }
        if let Some(Err(e)) = self.metrics.as_ref().map(MetricsLog::sync) {
            warn!("uploading metrics.jsonl: {e:#}");
        }
    }

    pub fn checkpointed(&mut self, step: u64, lora_url: &str) {
        self.committed = true;
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

/// How a run that `acrf` was asked to train ended, for the lines it prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub steps_done: u64,
    /// The final or latest LoRA file.
    pub lora_url: Option<String>,
    pub stopped_early: bool,
    /// The run had reached its last step before: nothing was trained.
    pub already_finished: bool,
}

impl Outcome {
    pub fn trained(run: RunOutcome) -> Outcome {
        Outcome {
            steps_done: run.steps_done,
            lora_url: run.lora_url,
            stopped_early: run.stopped_early,
            already_finished: false,
        }
    }

    pub fn finished_before(step: u64, lora_url: String) -> Outcome {
        Outcome { steps_done: step, lora_url: Some(lora_url), stopped_early: false, already_finished: true }
    }

    /// Says how the run ended; `again` is the command that runs it again.
    pub fn print(&self, again: &str) {
        if self.already_finished {
            println!(
                "this run is finished: it trained all its {} steps, and there is nothing left to do",
                self.steps_done
            );
        }
        if self.stopped_early {
            println!("stopped at step {}; continue with: {again}", self.steps_done);
        }
        if let Some(url) = &self.lora_url {
            println!("LoRA: {url}");
        }
        if self.already_finished {
            println!(
                "to train it longer: {again} --extend --set training.max_steps=N (N > {}); see \"Extending a run\" in \
                 the README",
                self.steps_done
            );
        }
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

/// This machine's name, for the status page.
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}
