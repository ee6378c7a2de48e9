//! Starting a distributed job: the coordinator's endpoint and join token, and for `acrf train --workers N`
//! the local worker processes, supervised so that one that dies is started again (the group re-forms
//! around the replacement and continues from the last checkpoint).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acrf_common::config::Config;
use acrf_common::protocol::{self, JoinToken};
use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::group::{GroupOutcome, coordinate};
use crate::net::{self, Identity};

/// Local workers are restarted at most this many times in one job.
const MAX_RESTARTS: usize = 20;

/// The coordinator's certificate and job secret, kept in `path` (created on first use) so that a restarted
/// coordinator presents the same token and its workers can rejoin.
pub fn identity_and_secret(path: Option<&Path>) -> Result<(Identity, [u8; 32])> {
    let Some(path) = path else { return Ok((Identity::generate()?, protocol::random_bytes())) };
    if let Ok(bytes) = std::fs::read(path) {
        return Identity::from_bytes(&bytes).with_context(|| format!("identity file {}", path.display()));
    }
    let (id, secret) = (Identity::generate()?, protocol::random_bytes());
    write_private(path, &id.to_bytes(&secret))?;
    Ok((id, secret))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(bytes)?;
    Ok(())
}

/// A running coordinator endpoint, the runtime that drives it, and the token that joins it.
pub struct Listening {
    runtime: tokio::runtime::Runtime,
    pub endpoint: quinn::Endpoint,
    pub token: JoinToken,
    pub secret: [u8; 32],
}

/// Listens on `listen`; the token names `advertise` (or the bound address) as where to connect.
pub fn listen(
    cfg: &Config,
    listen: SocketAddr,
    advertise: Vec<SocketAddr>,
    identity: Option<&Path>,
) -> Result<Listening> {
    let (id, secret) = identity_and_secret(identity)?;
    let idle = Duration::from_secs(cfg.distributed.heartbeat_timeout_s);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let endpoint = {
        let _inside = runtime.enter();
        net::server(listen, &id, idle)?
    };
    let bound = endpoint.local_addr()?;
    let addrs = if advertise.is_empty() { vec![bound] } else { advertise };
    Ok(Listening { runtime, endpoint, token: JoinToken { addrs, fingerprint: id.fingerprint, secret }, secret })
}

/// Runs the coordinator until the job ends.
pub fn serve(cfg: &Config, l: Listening, stop: Arc<AtomicBool>) -> Result<GroupOutcome> {
    let _inside = l.runtime.enter();
    coordinate(cfg.clone(), l.endpoint, l.secret, stop)
}

/// `acrf train CONFIG --workers N`: the coordinator here and N worker processes of this binary on this
/// machine, one per entry of `devices` (cycled).
pub fn train_with_local_workers(
    cfg: &Config,
    workers: usize,
    devices: &[String],
    stop: Arc<AtomicBool>,
) -> Result<GroupOutcome> {
    let mut cfg = cfg.clone();
    cfg.distributed.max_workers = workers;
    cfg.distributed.min_workers = cfg.distributed.min_workers.min(workers);
    let l = listen(&cfg, "127.0.0.1:0".parse().expect("valid"), vec![], None)?;
    let token = l.token.encode();
    let finished = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let finished = finished.clone();
        let devices: Vec<String> = if devices.is_empty() { vec!["cpu".into()] } else { devices.to_vec() };
        std::thread::spawn(move || supervise(workers, &token, &devices, &finished))
    };
    let outcome = serve(&cfg, l, stop);
    finished.store(true, Ordering::SeqCst);
    let _ = supervisor.join();
    outcome
}

fn spawn_worker(exe: &Path, token: &str, device: &str) -> Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(["worker", "--join", token, "--device", device]);
    // A worker must not outlive the coordinator that started it: it would keep training (and writing
    // checkpoints) under a job nobody coordinates.
    #[cfg(target_os = "linux")]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("starting {}", exe.display()))
}

fn supervise(n: usize, token: &str, devices: &[String], finished: &AtomicBool) {
    let exe: PathBuf = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return warn!("cannot find this program to start workers: {e}"),
    };
    let device = |i: usize| devices[i % devices.len()].as_str();
    let mut children: Vec<Option<Child>> =
        (0..n).map(|i| spawn_worker(&exe, token, device(i)).map_err(|e| warn!("{e:#}")).ok()).collect();
    let mut restarts = 0;
    while !finished.load(Ordering::SeqCst) {
        for (i, slot) in children.iter_mut().enumerate() {
            let exited = match slot {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                // A clean exit is a worker the coordinator dismissed; only a crash needs a replacement.
                if finished.load(Ordering::SeqCst) || status.success() {
                    *slot = None;
                    continue;
                }
                if restarts >= MAX_RESTARTS {
                    warn!("local worker {i} exited ({status}); not restarting: {MAX_RESTARTS} restarts already");
                    *slot = None;
                    continue;
                }
                restarts += 1;
                info!("local worker {i} exited ({status}); starting a replacement");
                *slot = spawn_worker(&exe, token, device(i)).map_err(|e| warn!("{e:#}")).ok();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
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
