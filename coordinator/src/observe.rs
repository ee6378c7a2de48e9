//! What a person and a plotting script see of a run: the progress bar and `metrics.jsonl`, one line per
//! optimizer step, kept in the run folder of the output.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use acrf_common::store::BlockingStore;
use acrf_worker::train::StepReport;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::status::Point;

pub const METRICS: &str = "metrics.jsonl";

/// `metrics.jsonl` of a run. Lines are appended to a local file as steps finish (the run folder itself when
/// the output is local) and the whole file is uploaded to the run folder at every checkpoint, so an object
/// store always holds the metrics up to its newest checkpoint.
pub struct MetricsLog {
    run: BlockingStore,
    /// Whether `local` is a copy rather than the run folder's own file.
    remote: bool,
    local: PathBuf,
    lines: Vec<String>,
    ema: Ema,
}

/// Exponential moving average of the loss (β = 0.99) with bias correction, so early values are not
/// dragged towards zero.
#[derive(Default, Clone, Copy)]
pub struct Ema {
    value: f64,
    weight: f64,
}

impl Ema {
    const BETA: f64 = 0.99;

    pub fn update(&mut self, x: f64) -> f64 {
        if x.is_finite() {
            self.value = Self::BETA * self.value + (1.0 - Self::BETA) * x;
            self.weight = Self::BETA * self.weight + (1.0 - Self::BETA);
        }
        self.get()
    }

    pub fn get(&self) -> f64 {
        if self.weight > 0.0 { self.value / self.weight } else { f64::NAN }
    }
}

impl MetricsLog {
    /// Continues the metrics of `run` up to `resumed_step` (lines of later steps belong to work that is
    /// being redone and are dropped).
    pub fn open(run: &BlockingStore, resumed_step: u64) -> Result<MetricsLog> {
        let (local, remote) = match acrf_common::store::Location::parse(run.url())? {
            acrf_common::store::Location::Local(dir) => (dir.join(METRICS), false),
            _ => {
                // Concurrent runs of a sweep share this process: each needs its own copy.
                static OPENED: AtomicU64 = AtomicU64::new(0);
                let n = OPENED.fetch_add(1, Ordering::Relaxed);
                (std::env::temp_dir().join(format!("acrf-{}-{n}-{METRICS}", std::process::id())), true)
            }
        };
        let existing =
            run.get_if_exists(METRICS)?.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let mut ema = Ema::default();
        let lines: Vec<String> = existing
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s <= resumed_step)
            })
            .map(String::from)
            .collect();
        for l in &lines {
            if let Some(loss) = serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("loss")?.as_f64())
            {
                ema.update(loss);
            }
        }
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&local, body).with_context(|| local.display().to_string())?;
        Ok(MetricsLog { run: run.clone(), remote, local, lines, ema })
    }

    /// Appends the line of `r` (with every rank's σ, by rank) and returns the loss EMA after it.
    pub fn append(&mut self, r: &StepReport, samples_per_s: f64, rank_sigmas: Vec<Vec<f64>>) -> Result<f64> {
        let ema = if r.skipped { self.ema.get() } else { self.ema.update(r.loss) };
        let mut line = serde_json::json!({
            "step": r.step,
            "epoch": r.epoch,
            "loss": r.loss,
            "ema_loss": ema,
            "mean_weight": r.mean_weight,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "sigmas": r.sigmas,
            "anchor_sigmas": r.anchor_sigmas,
            "sample_losses": r.sample_losses,
            "rank_sigmas": rank_sigmas,
            "samples_per_s": samples_per_s,
            "seconds": r.seconds,
            "skipped": r.skipped,
        });
        for (k, v) in &r.terms {
            line[k.as_str()] = serde_json::json!(v);
        }
        if !r.module_grad_norms.is_empty() {
            line["module_grad_norms"] = serde_json::json!(r.module_grad_norms);
        }
        if let Some(eval) = r.eval_loss {
            line["eval_loss"] = serde_json::json!(eval);
        }
        if let Some(drift) = &r.drift {
            line["turbo_drift"] = serde_json::json!(drift);
        }
        let text = line.to_string();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.local)
            .with_context(|| self.local.display().to_string())?;
        writeln!(f, "{text}")?;
        self.lines.push(text);
        Ok(ema)
    }

    /// Uploads the whole file to the run folder when the output is not local.
    pub fn sync(&self) -> Result<()> {
        if self.remote {
            let body: String = self.lines.iter().map(|l| format!("{l}\n")).collect();
            self.run.put(METRICS, body.into_bytes())?;
        }
        Ok(())
    }

    fn records(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.lines.iter().filter_map(|l| serde_json::from_str(l).ok())
    }

    pub fn losses(&self) -> Vec<f64> {
        self.records().filter_map(|v| v.get("loss")?.as_f64()).collect()
    }

    /// The loss curve so far.
    pub fn points(&self) -> Vec<Point> {
        self.records()
            .filter_map(|v| {
                let number = |key: &str| v.get(key).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
                Some(Point { step: v.get("step")?.as_u64()?, loss: number("loss"), ema_loss: number("ema_loss") })
            })
            .collect()
    }
}

/// A size field of /proc/self/status (`VmRSS`, the resident set; `VmHWM`, its peak) in bytes; Linux only.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    line.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

/// The progress bar: step/total, loss, EMA loss, lr, it/s and ETA; its length is set when training starts.
pub fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix}{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar
}
