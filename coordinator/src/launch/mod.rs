//! Starting the workers of a distributed job and keeping them running: local processes for `acrf train
//! --workers N` (`local`), ssh sessions for `acrf launch` (`ssh`), and what SLURM and Kubernetes deployments,
//! which start the processes themselves, need (`cluster`). A launched worker that dies is started again (the
//! group re-forms around the replacement and continues from the last checkpoint) while restarts are left.

pub mod cluster;
pub mod local;
pub mod ssh;

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acrf_common::config::Config;
use acrf_worker::checkpoint::{Checkpointer, ResumeRequest, Start};
use anyhow::Result;
use indicatif::ProgressBar;
use tracing::{error, info};

use crate::console::Outcome;
use crate::control::{self, Listening};
use crate::job::{lock_run, writer_id};

/// `cfg` for a launch of exactly `workers` workers: all of them are admitted, and the group forms once they
/// are all in (or with `min_workers` of them after `rendezvous_timeout_s`).
pub fn sized_for(cfg: &Config, workers: usize) -> Config {
    let mut cfg = cfg.clone();
    cfg.distributed.max_workers = workers;
    cfg.distributed.min_workers = cfg.distributed.min_workers.min(workers);
    cfg
}

/// Starts worker `i` of a launch: a process of this binary here, or an ssh session running one elsewhere.
pub type SpawnWorker = Box<dyn Fn(usize) -> Result<Child> + Send>;

/// What a launch of workers is for: `workers` of them, started by `spawn`, each started again after a
/// failure while `max_restarts` (in all) allow, continuing the run as `resume` asks.
pub struct Launch {
    pub workers: usize,
    pub max_restarts: usize,
    pub resume: ResumeRequest,
    pub spawn: SpawnWorker,
}

/// Decides where the run starts (refusing, before any worker starts, what the checkpointer refuses), then runs
/// the coordinator of `l` on this thread while a supervisor keeps the launch's workers running; stops the job
/// at the failure after the last restart, and stops the workers when the job ends, however it ends. A run
/// that is already finished starts no worker.
pub fn serve_with_workers(
    cfg: &Config,
    l: Listening,
    launch: Launch,
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
) -> Result<Outcome> {
    let _run = lock_run(cfg)?;
    let start = Checkpointer::new(cfg, &writer_id())?.start(launch.resume)?;
    if let Start::Finished { step, lora_url } = start {
        return Ok(Outcome::finished_before(step, lora_url));
    }
    let Launch { workers, max_restarts, spawn, .. } = launch;
    let finished = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (finished, stop) = (finished.clone(), stop.clone());
        std::thread::spawn(move || supervise(workers, &spawn, max_restarts, &finished, &stop))
    };
    let outcome = control::serve(cfg, l, start, stop, bar);
    finished.store(true, Ordering::SeqCst);
    let _ = supervisor.join();
    outcome
}

/// Makes the child die with this process: a worker must not outlive the launcher that started it, or it
/// would keep training (and writing checkpoints) under a job nobody coordinates.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Keeps the workers running until `finished`. A worker that fails (exits unsuccessfully, or cannot be
/// started) is started again while `max_restarts` allows; after that the next failure stops the job (the
/// ranks left checkpoint if they can) rather than leaving the group short or waiting out the rendezvous.
fn supervise(n: usize, spawn: &SpawnWorker, max_restarts: usize, finished: &AtomicBool, stop: &AtomicBool) {
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    let mut failure = None;
    for i in 0..n {
        match spawn(i) {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                failure.get_or_insert(format!("worker {i} could not be started: {e:#}"));
                children.push(None);
            }
        }
    }
    let mut restarts = 0;
    while !finished.load(Ordering::SeqCst) {
        for (i, slot) in children.iter_mut().enumerate() {
            let Some(status) = slot.as_mut().and_then(|c| c.try_wait().ok().flatten()) else { continue };
            *slot = None;
            // A clean exit is a worker the coordinator dismissed; only a failure needs a replacement.
            if status.success() || failure.is_some() || finished.load(Ordering::SeqCst) {
                continue;
            }
            if restarts >= max_restarts {
                failure = Some(format!("worker {i} exited ({status}) and no restart is left ({max_restarts} allowed)"));
                continue;
            }
            restarts += 1;
            info!("worker {i} exited ({status}); starting a replacement ({restarts} of {max_restarts} restarts)");
            match spawn(i) {
                Ok(c) => *slot = Some(c),
                Err(e) => failure = Some(format!("worker {i} could not be started again: {e:#}")),
            }
        }
        if let Some(why) = &failure
            && !stop.swap(true, Ordering::SeqCst)
        {
            error!("{why}: stopping the job");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Closing a worker's stdin tells a remote one its launcher is done with it; then the grace period, then
    // the kill.
    for c in children.iter_mut().flatten() {
        drop(c.stdin.take());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut().flatten() {
        while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
