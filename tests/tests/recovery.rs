//! Crash recovery with real processes: workers killed with SIGKILL, and the coordinator itself killed and
//! restarted, while a 2-worker run trains. The run must finish by itself with the weights of a run that was
//! never interrupted: the global batch never changes, every sample is a function of (seed, step, slot), and
//! a re-formed group continues from the last committed checkpoint.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use acrf_common::config::Config;
use acrf_tests::process::{Running, last_step, wait, wait_for_step};
use acrf_tests::{acrf, assert_lora_close, fast_heartbeats, final_lora, metrics, small_job, stderr};
use anyhow::{Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");
const STEPS: u64 = 30;

fn job(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Config) {
    small_job(dir, name, |c| {
        c.training.max_steps = STEPS;
        c.training.gradient_accumulation = 2;
        c.training.save_every_n_steps = 2;
        fast_heartbeats(c);
    })
}

fn spawn_train(job: &std::path::Path) -> Result<Child> {
    Ok(Command::new(BIN)
        .args(["train", &job.display().to_string(), "--workers", "2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?)
}

/// The pids of the live processes whose parent is `parent` (the local workers of a launcher).
fn workers_of(parent: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces, so split after the ')'.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            fields.first() != Some(&"Z") && fields.get(1) == Some(&parent.to_string().as_str())
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn killed_workers_and_a_killed_coordinator_do_not_change_the_result() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (whole, whole_cfg) = job(dir.path(), "whole");
    let out = acrf(BIN, &["train", &whole.display().to_string(), "--workers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (step, reference) = final_lora(&whole_cfg)?;
    assert_eq!(step, STEPS);

    // Five SIGKILLs of a worker at steps that vary with the clock, in one run that must finish by itself.
    let (crashy, crashy_cfg) = job(dir.path(), "crashy");
    let mut guard = Running(spawn_train(&crashy)?);
    let run = &mut guard.0;
    let jitter = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos() as u64;
    for kill in 0..5u64 {
        let at = (last_step(&crashy_cfg) + 2 + (jitter >> (kill * 3)) % 3).min(STEPS - 2);
        wait_for_step(&crashy_cfg, at, run)?;
        let victims = workers_of(run.id());
        let victim = victims.get((kill as usize) % victims.len().max(1)).context("no worker process")?;
        assert!(Command::new("kill").args(["-KILL", &victim.to_string()]).status()?.success());
    }
    let status = wait(run, Duration::from_secs(300))?;
    assert!(status.success(), "the run with killed workers failed");
    let (step, crashed) = final_lora(&crashy_cfg)?;
    assert_eq!(step, STEPS);
    // Every formation trains the same global batch, summed in f64: the same weights, bit for bit.
    assert_lora_close(&reference, &crashed, 0.0, "killed workers")?;

    // The coordinator killed with SIGKILL mid-run (its workers go with it), then started again.
    let (restart, restart_cfg) = job(dir.path(), "restart");
    let mut guard = Running(spawn_train(&restart)?);
    wait_for_step(&restart_cfg, STEPS / 2, &mut guard.0)?;
    drop(guard);
    let out = acrf(BIN, &["train", &restart.display().to_string(), "--workers", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (step, restarted) = final_lora(&restart_cfg)?;
    assert_eq!(step, STEPS);
    assert_lora_close(&reference, &restarted, 0.0, "a killed coordinator")?;
    // The restarted coordinator kept the metrics up to the checkpoint it resumed from and redid the rest.
    let steps: Vec<u64> = metrics(&restart_cfg).iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    Ok(())
}
