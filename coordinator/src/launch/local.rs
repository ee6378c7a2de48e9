//! `acrf train CONFIG --workers N`: the coordinator in this process and N worker processes of this binary on
//! this machine.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use acrf_common::config::Config;
use acrf_worker::checkpoint::ResumeRequest;
use anyhow::{Context, Result};
use indicatif::ProgressBar;

use super::cluster::TOKEN_VAR;
use super::{Launch, die_with_parent, serve_with_workers, sized_for};
use crate::console::Outcome;
use crate::control;

/// `acrf train --workers` restarts its local workers at most this many times in one job: a crash of one
/// process on one box is worth retrying, a worker that keeps crashing is not.
const MAX_RESTARTS: usize = 20;

/// Runs the job with `workers` local worker processes, one per entry of `devices` (cycled), continuing as
/// `resume` asks.
pub fn train_with_local_workers(
    cfg: &Config,
    workers: usize,
    devices: &[String],
    resume: ResumeRequest,
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
) -> Result<Outcome> {
    let cfg = sized_for(cfg, workers);
    let l = control::listen(&cfg, "127.0.0.1:0".parse().expect("valid"), vec![], None)?;
    let token = l.token.encode();
    let exe = std::env::current_exe().context("finding this program to start its workers")?;
    let devices: Vec<String> = if devices.is_empty() { vec!["cpu".into()] } else { devices.to_vec() };
    let spawn = move |i: usize| spawn_worker(&exe, &token, &devices[i % devices.len()]);
    let launch = Launch { workers, max_restarts: MAX_RESTARTS, resume, spawn: Box::new(spawn) };
    serve_with_workers(&cfg, l, launch, stop, bar)
}

fn spawn_worker(exe: &Path, token: &str, device: &str) -> Result<Child> {
    let mut cmd = Command::new(exe);
    // The token in the environment, which only this user can read, rather than in the arguments, which
    // `ps` shows to everyone.
    cmd.args(["worker", "--device", device]).env(TOKEN_VAR, token);
    die_with_parent(&mut cmd);
    cmd.spawn().with_context(|| format!("starting {}", exe.display()))
}
