//! Training processes as a test drives them: a coordinator with its log in a file, workers that join it,
//! guards that kill what a failing test leaves behind, and waits on a run's progress in its metrics.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use acrf_common::config::Config;
use acrf_common::protocol::JoinToken;
use anyhow::{Result, bail};

use crate::metrics;

/// A child process killed when the guard goes, so that no orphan of a failed test keeps writing into a
/// deleted folder.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `acrf coordinator JOB` started as its own process, its stderr in `dir/coordinator.log`.
pub struct Coordinator {
    pub child: Running,
    log: PathBuf,
    pub token: JoinToken,
}

impl Coordinator {
    /// Starts it on a free loopback port with `extra` arguments, and waits for its join token.
    pub fn start(bin: &str, dir: &Path, job: &Path, extra: &[&str]) -> Result<Coordinator> {
        let (log, token_file) = (dir.join("coordinator.log"), dir.join("token"));
        let _ = std::fs::remove_file(&token_file);
        let child = Command::new(bin)
            .args(["coordinator", &job.display().to_string(), "--listen", "127.0.0.1:0"])
            .args(["--token-file", &token_file.display().to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut child = Running(child);
        let started = Instant::now();
        while !token_file.exists() {
            if let Some(status) = child.0.try_wait()? {
                bail!("the coordinator exited ({status}) before writing its token:\n{}", read(&log));
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the coordinator wrote no token:\n{}", read(&log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let token = JoinToken::decode(&std::fs::read_to_string(&token_file)?)?;
        Ok(Coordinator { child, log, token })
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }

    /// Waits until the log contains `text`.
    pub fn wait_for(&self, text: &str) -> Result<()> {
        let started = Instant::now();
        while !self.log().contains(text) {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the coordinator never logged `{text}`:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A worker process that joins this coordinator through its environment, as the deployment recipes do.
    pub fn worker(&self, bin: &str) -> Result<Running> {
        let child = Command::new(bin)
            .args(["worker", "--reconnect-for", "5"])
            .env("ACRF_JOIN_TOKEN", self.token.encode())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Running(child))
    }

    /// Waits for the coordinator to exit.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        wait(&mut self.child.0, limit)
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The step of the last line of a run's metrics, 0 before the first.
pub fn last_step(cfg: &Config) -> u64 {
    metrics(cfg).last().and_then(|l| l["step"].as_u64()).unwrap_or(0)
}

/// Waits until the run has recorded step `step`, failing if `child` (what trains it) ends first.
pub fn wait_for_step(cfg: &Config, step: u64, child: &mut Child) -> Result<()> {
    let started = Instant::now();
    while last_step(cfg) < step {
        if let Some(status) = child.try_wait()? {
            bail!("the run ended ({status}) before step {step}");
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("no step {step} after {:?}", started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// Waits for `child` to exit within `limit`, killing it after.
pub fn wait(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            bail!("the process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `kill -SIG pid`.
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid}");
    Ok(())
}
