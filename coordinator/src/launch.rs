//! Starting a distributed job: the coordinator's endpoint and join token, and the workers of a launch
//! (local processes for `acrf train --workers N`, ssh sessions for `acrf launch`, see `remote`), supervised
//! so that one that dies is started again (the group re-forms around the replacement and continues from the
//! last checkpoint).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use acrf_common::config::Config;
use acrf_common::protocol::{self, JoinToken};
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use tracing::{error, info};

use crate::group::{GroupOutcome, coordinate};
use crate::net::{self, Identity};

/// The environment variable a worker takes its join token from.
pub const TOKEN_VAR: &str = "ACRF_JOIN_TOKEN";

/// `acrf train --workers` restarts its local workers at most this many times in one job: a crash of one
/// process on one box is worth retrying, a worker that keeps crashing is not.
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

/// Writes the join token readable by its owner only (it lets anyone join the job), under a temporary name
/// renamed into place, so that a script waiting for the file never reads half a token.
pub fn write_token_file(path: &Path, token: &str) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    write_private(&partial, token.as_bytes())?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming {} into place", partial.display()))
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
pub fn serve(cfg: &Config, l: Listening, stop: Arc<AtomicBool>, bar: ProgressBar) -> Result<GroupOutcome> {
    let _inside = l.runtime.enter();
    coordinate(cfg.clone(), l.endpoint, l.secret, stop, bar)
}

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

/// Runs the coordinator of `l` on this thread while a supervisor starts `workers` workers with `spawn`,
/// replaces those that fail up to `max_restarts` times in all, stops the job at the failure after that, and
/// stops the workers when the job ends, however it ends.
pub fn serve_with_workers(
    cfg: &Config,
    l: Listening,
    workers: usize,
    max_restarts: usize,
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
    spawn: SpawnWorker,
) -> Result<GroupOutcome> {
    let finished = Arc::new(AtomicBool::new(false));
    let supervisor = {
        let (finished, stop) = (finished.clone(), stop.clone());
        std::thread::spawn(move || supervise(workers, &spawn, max_restarts, &finished, &stop))
    };
    let outcome = serve(cfg, l, stop, bar);
    finished.store(true, Ordering::SeqCst);
    let _ = supervisor.join();
    outcome
}

/// `acrf train CONFIG --workers N`: the coordinator here and N worker processes of this binary on this
/// machine, one per entry of `devices` (cycled).
pub fn train_with_local_workers(
    cfg: &Config,
    workers: usize,
    devices: &[String],
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
) -> Result<GroupOutcome> {
    let cfg = sized_for(cfg, workers);
    let l = listen(&cfg, "127.0.0.1:0".parse().expect("valid"), vec![], None)?;
    let token = l.token.encode();
    let exe = std::env::current_exe().context("finding this program to start its workers")?;
    let devices: Vec<String> = if devices.is_empty() { vec!["cpu".into()] } else { devices.to_vec() };
    let spawn = move |i: usize| spawn_worker(&exe, &token, &devices[i % devices.len()]);
    serve_with_workers(&cfg, l, workers, MAX_RESTARTS, stop, bar, Box::new(spawn))
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

fn spawn_worker(exe: &Path, token: &str, device: &str) -> Result<Child> {
    let mut cmd = Command::new(exe);
    // The token in the environment, which only this user can read, rather than in the arguments, which
    // `ps` shows to everyone.
    cmd.args(["worker", "--device", device]).env(TOKEN_VAR, token);
    die_with_parent(&mut cmd);
    cmd.spawn().with_context(|| format!("starting {}", exe.display()))
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
