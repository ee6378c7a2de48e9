//! `acrf launch` over real ssh: an sshd of its own on loopback ([`acrf_tests::ssh::Sshd`]).
//! A 2-worker run started through ssh must train the LoRA of the same run under `acrf train --workers 2`,
//! and the remote workers must not outlive their launcher, whether it stops on Ctrl-C or is killed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use acrf_common::config::Config;
use acrf_tests::ssh::{Sshd, free_port};
use acrf_tests::{acrf, assert_lora_close, fast_heartbeats, lora_of, metrics, small_job, stderr, stdout};
use anyhow::{Context, Result, bail};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");
fn job(dir: &Path, name: &str, steps: u64) -> (PathBuf, Config) {
    small_job(dir, name, |c| {
        c.training.max_steps = steps;
        c.training.gradient_accumulation = 2;
        c.training.save_every_n_steps = 4;
        fast_heartbeats(c);
    })
}

#[test]
fn a_run_launched_over_ssh_trains_the_lora_of_a_local_launch() -> Result<()> {
    let sshd = Sshd::start()?;
    let dir = tempfile::tempdir()?;

    let (local_job, local) = job(dir.path(), "local", 8);
    let out = acrf(BIN, &["train", &local_job.display().to_string(), "--workers", "2"]);
    assert!(out.status.success(), "acrf train --workers 2: {}", stderr(&out));

    // Two hosts entries for one machine: one worker with an ephemeral ring port, one with a pinned one.
    let (ssh_job, remote) = job(dir.path(), "ssh", 8);
    let hosts = dir.path().join("hosts.toml");
    let ring_port = free_port()?;
    let info = r#"RUST_LOG = "info""#;
    let file = [
        sshd.host(&["cpu"], BIN, info, "")?,
        sshd.host(&["cpu"], BIN, info, &format!("collective_port = {ring_port}"))?,
    ];
    let file = file.concat();
    std::fs::write(&hosts, file)?;
    let out = acrf(
        BIN,
        &["launch", "--hosts", &hosts.display().to_string(), &ssh_job.display().to_string(), "--listen", "127.0.0.1:0"],
    );
    let log = stderr(&out);
    assert!(out.status.success(), "acrf launch: {log}\nsshd:\n{}", sshd.log());
    for prefix in ["[0 127.0.0.1 cpu]", "[1 127.0.0.1 cpu]"] {
        assert!(log.contains(&format!("{prefix} ")) && log.contains("joined the job"), "no {prefix} lines:\n{log}");
    }
    assert!(stdout(&out).contains("LoRA: "), "{}", stdout(&out));

    assert_eq!(metrics(&remote).len(), metrics(&local).len());
    assert_lora_close(&lora_of(&local)?, &lora_of(&remote)?, 1e-5, "launched over ssh")?;
    Ok(())
}

fn pids() -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    entries.filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()).collect()
}

/// The `NAME=value` entries of a process's environment; none for a process that is gone or not ours.
fn environ(pid: u32) -> Vec<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    env.split(|&b| b == 0).map(|kv| String::from_utf8_lossy(kv).into_owned()).collect()
}

/// The pids of live processes whose environment holds `NAME=value`: the remote workers of one launch.
fn processes_with(var: &str) -> Vec<u32> {
    let zombie = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
    };
    pids().into_iter().filter(|&pid| !zombie(pid) && environ(pid).iter().any(|kv| kv == var)).collect()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Kills the launcher when the test ends early.
struct Launcher(Child);

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status()?;
    anyhow::ensure!(status.success(), "kill -{sig} {pid}");
    Ok(())
}

#[test]
fn remote_workers_stop_with_their_launcher() -> Result<()> {
    let sshd = Sshd::start()?;
    let dir = tempfile::tempdir()?;
    let (job_file, cfg) = job(dir.path(), "stop", 10_000);
    let tag = format!("ACRF_TEST_LAUNCH={}", dir.path().display());
    let (name, value) = tag.split_once('=').expect("a pair");
    let hosts = dir.path().join("hosts.toml");
    std::fs::write(&hosts, sshd.host(&["cpu", "cpu"], BIN, &format!("{name} = \"{value}\""), "")?)?;
    let start = || -> Result<Launcher> {
        Ok(Launcher(
            Command::new(BIN)
                .args(["launch", "--hosts", &hosts.display().to_string(), &job_file.display().to_string()])
                .args(["--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };

    // Ctrl-C: the ranks checkpoint, the launcher reports where it stopped and exits, no worker is left.
    let mut launcher = start()?;
    wait_until("two steps were trained", Duration::from_secs(300), || metrics(&cfg).len() >= 2)?;
    let workers = processes_with(&tag);
    assert_eq!(workers.len(), 2, "two remote workers run");
    // The token reached the workers through their environment and shows in no process's arguments.
    let token = environ(workers[0]).into_iter().find_map(|kv| kv.strip_prefix("ACRF_JOIN_TOKEN=").map(str::to_string));
    let token = token.context("the worker has no ACRF_JOIN_TOKEN")?;
    for pid in pids() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&token), "process {pid} shows the token: {cmdline:?}");
    }
    signal(launcher.0.id(), "INT")?;
    let mut out = String::new();
    launcher.0.stdout.take().context("stdout")?.read_to_string(&mut out)?;
    let status = launcher.0.wait()?;
    assert!(status.code() == Some(130) && out.contains("stopped at step"), "{status}: {out}");
    wait_until("the workers exited", Duration::from_secs(20), || processes_with(&tag).is_empty())?;

    // SIGKILL: nothing runs in the launcher any more; the workers go through their lifeline.
    let launcher = start()?;
    wait_until("both workers run again", Duration::from_secs(120), || processes_with(&tag).len() == 2)?;
    signal(launcher.0.id(), "KILL")?;
    // Under 60 s: a worker that lost its coordinator gives up after `--reconnect-for` (60 s), so only the
    // lifeline ends it sooner. Once in about a dozen runs the lifeline took near 30 s here, not 2.
    wait_until("the orphaned workers exited", Duration::from_secs(45), || processes_with(&tag).is_empty())?;
    Ok(())
}

#[test]
fn one_failed_worker_stops_the_launch_and_every_other_worker() -> Result<()> {
    let sshd = Sshd::start()?;
    let dir = tempfile::tempdir()?;
    let (job_file, _) = job(dir.path(), "fail", 10_000);
    let tag = format!("ACRF_TEST_LAUNCH={}", dir.path().display());
    let (name, value) = tag.split_once('=').expect("a pair");
    let env = format!("{name} = \"{value}\"");
    // Worker 0 starts and waits for the group; worker 1's host has no acrf where the file says.
    let missing = dir.path().join("no-such-dir/acrf");
    let file = [sshd.host(&["cpu"], BIN, &env, "")?, sshd.host(&["cpu"], &missing.display().to_string(), &env, "")?];
    let hosts = dir.path().join("hosts.toml");
    std::fs::write(&hosts, file.concat())?;
    let started = Instant::now();
    let out = acrf(
        BIN,
        &[
            "launch",
            "--hosts",
            &hosts.display().to_string(),
            &job_file.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let log = stderr(&out);
    assert!(!out.status.success(), "a launch with a failed worker succeeded:\n{log}");
    assert!(log.contains("worker 1 exited") && log.contains("stopping the job"), "the failure is not named:\n{log}");
    assert!(log.contains("[1 127.0.0.1 cpu]") && log.contains("no-such-dir/acrf"), "the shell's error:\n{log}");
    // Well before distributed.rendezvous_timeout_s (120 s), which is what a launcher that keeps waiting
    // for the missing worker would take.
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
    wait_until("worker 0 exited", Duration::from_secs(20), || processes_with(&tag).is_empty())?;
    Ok(())
}

/// Issue #16, item 1, for `acrf launch`: a run whose checkpoint was trained with another learning rate, or a
/// job with `checkpoint.resume = "never"` over existing checkpoints, is refused with the reason named before
/// any worker is started.
#[test]
fn a_launch_refuses_changed_settings_and_honours_never() -> Result<()> {
    let sshd = Sshd::start()?;
    let dir = tempfile::tempdir()?;
    let (job_file, _) = job(dir.path(), "refused", 2);
    let out = acrf(BIN, &["train", &job_file.display().to_string(), "--workers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hosts = dir.path().join("hosts.toml");
    std::fs::write(&hosts, sshd.host(&["cpu", "cpu"], BIN, r#"RUST_LOG = "info""#, "")?)?;
    let launch = ["launch", "--hosts", &hosts.display().to_string(), &job_file.display().to_string()];
    let cases = [
        ("training.learning_rate=1e-3", "training.learning_rate"),
        ("checkpoint.resume=never", "checkpoint.resume = \"never\""),
    ];
    for (set, named) in cases {
        let out = acrf(BIN, &[&launch[..], &["--listen", "127.0.0.1:0", "--set", set]].concat());
        let log = stderr(&out);
        assert!(!out.status.success(), "--set {set}: the launch was not refused:\n{log}");
        assert!(log.contains(named), "--set {set}: the refusal does not name {named}:\n{log}");
        assert!(!log.contains("[0 127.0.0.1 cpu]"), "--set {set}: a worker was started:\n{log}");
    }
    Ok(())
}
