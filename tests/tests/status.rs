//! The live status page, polled over HTTP while `acrf train` runs, in one process and with local workers.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use acrf_tests::{http_get, small_job};
use anyhow::{Context, Result, bail};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");
const STEPS: u64 = 40;

/// Kills the run if the test ends early.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `acrf train JOB extra…` and returns it with the status URL it printed.
fn start(job: &std::path::Path, extra: &[&str]) -> Result<(Running, String)> {
    let mut child = Running(
        Command::new(BIN)
            .arg("train")
            .arg(job)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut lines = BufReader::new(child.0.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines.next().context("the run printed no status URL")??;
        if let Some(url) = line.strip_prefix("status of ").and_then(|l| l.split_once(": ")).map(|(_, u)| u.to_string())
        {
            break url;
        }
    };
    // Keep reading, so that the run never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, url))
}

fn status(url: &str) -> Result<serde_json::Value> {
    let (line, body) = http_get(url, "/status")?;
    assert!(line.contains("200"), "{line}");
    Ok(serde_json::from_str(&body)?)
}

/// Polls `/status` until the run ends; checks its fields and returns every step it saw.
fn watch(run: &mut Running, url: &str, run_name: &str, ranks: usize) -> Result<Vec<u64>> {
    let started = Instant::now();
    let mut seen = Vec::new();
    while run.0.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the run did not end");
        }
        let Ok(s) = status(url) else { continue };
        let step = s["step"].as_u64().context("step")?;
        if step > 0 {
            assert_eq!(s["run"], run_name, "{s}");
            assert_eq!(s["total"], STEPS, "{s}");
            assert!(s["state"] == "running" || (s["state"] == "finished" && step == STEPS), "{s}");
            let r = s["ranks"].as_array().context("ranks")?;
            assert_eq!(r.len(), ranks, "{s}");
            assert!(r.iter().all(|r| r["device"] == "cpu" && r["host"].is_string()), "{s}");
            assert!(r.iter().all(|r| r["samples_per_s"].as_f64().is_some_and(|v| v > 0.0)), "{s}");
            let losses = s["last_losses"].as_array().context("last_losses")?;
            assert!(!losses.is_empty() && losses.last().context("a loss")?["step"] == step, "{s}");
            if step >= 3 {
                assert!(s["eta_s"].as_f64().is_some_and(|e| e >= 0.0), "{s}");
            }
            // The checkpoint of step 10 is committed after step 10 is reported, and before step 11 starts.
            if step > 10 {
                assert!(s["last_checkpoint"]["step"].as_u64().is_some_and(|c| c >= 10), "{s}");
            }
            if seen.last() != Some(&step) {
                seen.push(step);
            }
        }
        if seen.len() == 3 {
            let (line, page) = http_get(url, "/")?;
            assert!(line.contains("200") && page.contains("<canvas") && page.contains("fetch(\"/status\")"), "{line}");
            let (_, metrics) = http_get(url, &format!("/metrics?since={}", seen[0]))?;
            let metrics: serde_json::Value = serde_json::from_str(&metrics)?;
            let points = metrics["points"].as_array().context("points")?;
            assert!(points.first().is_some_and(|p| p["step"].as_u64() > Some(seen[0])), "{metrics}");
            assert!(points.iter().all(|p| p["loss"].is_f64() && p["ema_loss"].is_f64()), "{metrics}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(run.0.wait()?.success());
    Ok(seen)
}

#[test]
fn status_is_served_while_a_run_trains_in_one_process_and_with_workers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, workers) in [("single", None), ("group", Some("2"))] {
        let (job, cfg) = small_job(dir.path(), name, |c| {
            c.training.max_steps = STEPS;
            c.training.gradient_accumulation = 2;
            c.training.save_every_n_steps = 10;
            acrf_tests::fast_heartbeats(c);
        });
        let extra: Vec<&str> = workers.map(|n| vec!["--workers", n]).unwrap_or_default();
        let (mut run, url) = start(&job, &extra)?;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let seen = watch(&mut run, &url, &cfg.run_name, workers.map_or(1, |_| 2))?;
        assert!(seen.len() >= 3 && seen.windows(2).all(|w| w[0] < w[1]), "{name}: steps seen {seen:?}");
    }
    Ok(())
}
