//! `acrf bench`: times a job's optimizer steps after a warm-up and sets them against the plan: step time,
//! tokens/s, achieved FLOP/s, the share of each phase, and the peak memory next to the predicted one.

use std::time::Instant;

use acrf_common::config::Config;
use acrf_worker::collective::Local;
use acrf_worker::estimate::{Estimate, human_bytes, job_workload};
use acrf_worker::profile::{self, Profile};
use acrf_worker::timing::PhaseTimes;
use acrf_worker::train::Trainer;
use anyhow::{Context, Result};
use candle_core::Device;
use serde::Serialize;

/// What a benchmark measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub steps: usize,
    pub warmup: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Image and caption tokens (padded) of one optimizer step.
    pub tokens_per_step: usize,
    pub tokens_per_s: f64,
    pub flops_per_step: f64,
    pub flops_per_s: f64,
    /// Mean seconds of each phase over the timed steps.
    pub phases: PhaseTimes,
    /// The steps' peak memory: the resident set above the process's before it loaded anything on a CPU, the
    /// device's memory in use on a GPU (polled while the steps run). `None` where it cannot be read.
    pub peak_bytes: Option<u64>,
    pub planned_bytes: u64,
    /// Setup (loading the model and the dataset) in seconds.
    pub setup_s: f64,
    /// Time per op site and pass of the profiled steps (`--profile`), which ran after the timed ones.
    pub profile: Option<Profile>,
}

/// Steps profiled after the timed ones: the first step of a profile creates its timing events.
const PROFILED_STEPS: usize = 3;

/// Runs `warmup` untimed and `steps` timed optimizer steps of `cfg` on `device`, then, with `profile`, a few
/// more under the profiler.
pub fn run(cfg: &Config, device: &Device, steps: usize, warmup: usize, profile: bool) -> Result<BenchReport> {
    let workload = job_workload(cfg, device.is_cuda(), None, None)?;
    let estimate = Estimate::new(&workload);
    let mut meter = memory::Meter::new(device);
    let started = Instant::now();
    let mut trainer = Trainer::new(cfg, Box::new(Local), device, cfg.training.gradient_accumulation)?;
    trainer.set_exact_phase_times(true);
    let setup_s = started.elapsed().as_secs_f64();
    for _ in 0..warmup {
        trainer.step(false)?;
    }
    meter.start();
    let mut seconds = Vec::with_capacity(steps);
    let mut phases = PhaseTimes::default();
    for _ in 0..steps.max(1) {
        let r = trainer.step(false)?;
        seconds.push(r.seconds);
        phases = phases.add(&r.phases);
    }
    let peak = meter.peak()?;
    let profile = match profile {
        true => Some(profiled(&mut trainer, device)?),
        false => None,
    };
    seconds.sort_by(f64::total_cmp);
    let n = seconds.len();
    let median_s = if n % 2 == 1 { seconds[n / 2] } else { (seconds[n / 2 - 1] + seconds[n / 2]) / 2.0 };
    let tokens_per_step = workload.tokens_per_sample() * workload.batch * workload.accumulation;
    let flops_per_step = estimate.flops.total();
    Ok(BenchReport {
        device: format!("{device:?}"),
        steps: n,
        warmup,
        median_s,
        min_s: seconds[0],
        max_s: seconds[n - 1],
        tokens_per_step,
        tokens_per_s: tokens_per_step as f64 / median_s,
        flops_per_step,
        flops_per_s: flops_per_step / median_s,
        phases: phases.scale(1.0 / n as f64),
        peak_bytes: peak,
        planned_bytes: estimate.peak(),
        setup_s,
        profile,
    })
}

/// [`PROFILED_STEPS`] steps under the profiler, after one to create its events.
fn profiled(trainer: &mut Trainer, device: &Device) -> Result<Profile> {
    profile::start(device)?;
    trainer.step(false)?;
    profile::start(device)?;
    for _ in 0..PROFILED_STEPS {
        trainer.step(false)?;
        profile::step_done()?;
    }
    Ok(profile::finish()?)
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let p = &self.phases;
        let total = p.total().max(f64::MIN_POSITIVE);
        let share = |v: f64| format!("{:.0}%", 100.0 * v / total);
        let peak = match self.peak_bytes {
            Some(b) => human_bytes(b),
            None => "not measured".into(),
        };
        let rows = [
            ("device", self.device.clone()),
            ("steps", format!("{} timed after {} warm-up (setup {:.1} s)", self.steps, self.warmup, self.setup_s)),
            ("step time", format!("median {:.3} s, min {:.3} s, max {:.3} s", self.median_s, self.min_s, self.max_s)),
            ("tokens/s", format!("{:.0} ({} tokens per step)", self.tokens_per_s, self.tokens_per_step)),
            (
                "FLOP/s",
                format!(
                    "{:.2} GFLOP/s ({:.2} GFLOP per step, planned)",
                    self.flops_per_s / 1e9,
                    self.flops_per_step / 1e9
                ),
            ),
            ("peak memory", format!("{peak} measured, {} planned", human_bytes(self.planned_bytes))),
            (
                "phases",
                format!(
                    "forward {}, recompute {}, backward {}, all-reduce {}, optimizer {}, other {}",
                    share(p.forward),
                    share(p.recompute),
                    share(p.backward),
                    share(p.all_reduce),
                    share(p.optimizer),
                    share(p.other)
                ),
            ),
        ];
        let mut text: String = rows.iter().map(|(k, v)| format!("{k:<12} {v}\n")).collect();
        if let Some(p) = &self.profile {
            text += &format!("\nprofile of {} more steps (after one to warm the profiler up):\n", p.steps);
            text += &p.to_text();
        }
        text
    }
}

/// Peak memory of this process or its device.
mod memory {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use super::*;
    use crate::observe::status_bytes;

    /// How often the GPU's memory in use is read while the steps run.
    const GPU_POLL: Duration = Duration::from_millis(1);

    /// Measures the steps' peak: on a CPU the process's resident set above what it held before anything was
    /// loaded; on a GPU the device's whole memory in use, as the plan counts it (the CUDA context included,
    /// and whatever else runs on the device).
    pub enum Meter {
        Cpu { baseline: Option<u64> },
        Gpu { device: Device, poller: Option<(Arc<AtomicBool>, JoinHandle<Option<u64>>)> },
    }

    impl Meter {
        pub fn new(device: &Device) -> Meter {
            match device.is_cuda() {
                true => Meter::Gpu { device: device.clone(), poller: None },
                false => Meter::Cpu { baseline: status_bytes("VmRSS") },
            }
        }

        /// Starts the peak afresh: loading maps the weight files next to their copies, and only the steps'
        /// peak is wanted.
        pub fn start(&mut self) {
            match self {
                // /proc/self/clear_refs (Linux ≥ 4.0) restarts VmHWM from the resident set. Failing leaves
                // the peak of the whole process, which only overstates; nothing to report.
                Meter::Cpu { .. } => {
                    let _ = std::fs::write("/proc/self/clear_refs", "5");
                }
                // The stream-ordered allocator hands freed memory back to the driver whenever the stream
                // synchronises, so the memory in use after the steps is below their peak (on an H200 at full
                // size: 13.0 GiB in use after the steps, 16.0 GiB at their peak by nvidia-smi, context
                // included): it is polled while they run.
                Meter::Gpu { device, poller } => {
                    let stop = Arc::new(AtomicBool::new(false));
                    let (device, done) = (device.clone(), stop.clone());
                    let polling = std::thread::spawn(move || {
                        let mut peak = None;
                        while !done.load(Ordering::Relaxed) {
                            peak = peak.max(gpu_in_use(&device).ok().flatten());
                            std::thread::sleep(GPU_POLL);
                        }
                        peak
                    });
                    *poller = Some((stop, polling));
                }
            }
        }

        /// The peak since [`Meter::start`]; `None` where it cannot be read.
        pub fn peak(self) -> Result<Option<u64>> {
            match self {
                Meter::Cpu { baseline } => {
                    Ok(status_bytes("VmHWM").zip(baseline).map(|(peak, base)| peak.saturating_sub(base)))
                }
                Meter::Gpu { device, poller } => {
                    let polled = match poller {
                        Some((stop, polling)) => {
                            stop.store(true, Ordering::Relaxed);
                            polling.join().map_err(|_| anyhow::anyhow!("the memory poller panicked"))?
                        }
                        None => None,
                    };
                    Ok(polled.max(gpu_in_use(&device)?))
                }
            }
        }
    }

    fn gpu_in_use(device: &Device) -> Result<Option<u64>> {
        Ok(acrf_worker::estimate::device_memory(device)?.map(|m| m.total - m.free))
    }
}

/// Writes the synthetic job under a temporary folder, kept for the benchmark's life.
pub fn synthetic_job(args: &crate::args::SyntheticArgs) -> Result<(tempfile::TempDir, Config)> {
    let dir = tempfile::tempdir().context("temporary folder for the synthetic job")?;
    let cfg = args.write(dir.path())?;
    Ok((dir, cfg))
}
