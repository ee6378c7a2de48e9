//! The command line as a script or a person meets it, as real processes: the exit status of each way a run
//! ends (README "Exit codes"), and what lands on stderr when it is a file or a pipe.

use std::process::{Command, Stdio};
use std::time::Duration;

use acrf_tests::process::{Running, signal, wait, wait_for_step};
use acrf_tests::{acrf, acrf_command, small_job, stderr, stdout};
use anyhow::Result;

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// SIGINT stops a run after its checkpoint with 130, so that a script tells it from a finished run (0); the
/// same command then finishes it with 0.
#[test]
fn sigint_stops_a_run_with_exit_status_130() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "interrupted", |c| c.training.max_steps = 12);
    let job = job.display().to_string();
    let child = Command::new(BIN).args(["train", &job]).env("RUST_LOG", "warn").stdout(Stdio::piped()).spawn()?;
    let mut run = Running(child);
    wait_for_step(&cfg, 2, &mut run.0)?;
    signal(run.0.id(), "INT")?;
    let status = wait(&mut run.0, Duration::from_secs(120))?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut run.0.stdout.take().expect("piped"), &mut out)?;
    assert_eq!(status.code(), Some(130), "{status}: {out}");
    assert!(out.contains("stopped at step") && out.contains(&format!("continue with: acrf train {job}")), "{out}");

    let again = acrf(BIN, &["train", &job]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    Ok(())
}

/// A job refused before it starts exits 2, as clap's usage errors do; a failure along the way exits 1.
#[test]
fn a_refused_job_exits_2_and_a_failed_one_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, _) = small_job(dir.path(), "refused", |_| {});
    let job = job.display().to_string();
    let refused = acrf(BIN, &["train", &job, "--set", "acrf.turbo_steps=1"]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("`acrf.turbo_steps`"), "{}", stderr(&refused));
    let missing = acrf(BIN, &["train", &dir.path().join("no-such-job.toml").display().to_string()]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    let usage = acrf(BIN, &["train", &job, "--no-such-flag"]);
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));

    // A resume the checkpoints rule out is refused too: --extend of a run that has none.
    let extend = acrf(BIN, &["train", &job, "--extend"]);
    assert_eq!(extend.status.code(), Some(2), "{}", stderr(&extend));
    assert!(stderr(&extend).contains("has no checkpoint"), "{}", stderr(&extend));

    // An output that cannot be created is a failure, said once: the message carries the OS error and the
    // chain does not repeat it.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "a file where the output folder should be")?;
    let (failing, _) = small_job(dir.path(), "failing", |c| c.output = blocked.display().to_string());
    let failed = acrf(BIN, &["train", &failing.display().to_string()]);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(1), "{err}");
    assert!(err.contains("Not a directory (os error 20)"), "{err}");
    assert_eq!(err.matches("(os error").count(), 1, "{err}");
    Ok(())
}

/// Logs that go to a file or a pipe carry no colour codes.
#[test]
fn logs_into_a_pipe_have_no_colour_codes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, _) = small_job(dir.path(), "logged", |c| c.training.max_steps = 2);
    let out = acrf_command(BIN, &["train", &job.display().to_string()]).env("RUST_LOG", "info").output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("INFO"), "the run logged nothing to check: {err}");
    assert!(!out.stderr.contains(&0x1b), "ANSI escape codes in piped logs: {err:?}");
    assert!(!stdout(&out).contains('\u{1b}'));
    Ok(())
}
