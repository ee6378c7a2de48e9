//! Keeping Turbo fast: caption dropout, preservation against the base model and the Turbo drift measured at
//! sample points — each a pure function of (seed, step, slot), so world-size invariant, and each a no-op
//! where it is switched off. Real `acrf train` processes on the demo model.

use std::path::Path;

use acrf_common::config::{Config, PreservationConfig};
use acrf_tests::{acrf, assert_lora_close, fast_heartbeats, lora_of, losses, metrics, small_job, stderr};
use anyhow::{Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// Four steps of M = 4 micro-batches, on one worker (4 accumulation) or two (2 each).
fn layout(c: &mut Config, workers: usize) {
    c.training.max_steps = 4;
    c.training.save_every_n_steps = 0;
    c.training.gradient_accumulation = 4 / workers;
    fast_heartbeats(c);
}

fn train(job: &Path, workers: usize) {
    let out = acrf(BIN, &["train", &job.display().to_string(), "--workers", &workers.to_string()]);
    assert!(out.status.success(), "{} on {workers} worker(s): {}", job.display(), stderr(&out));
}

/// Trains `name` on 1 and 2 workers with `edit`; returns the configs.
fn one_and_two(dir: &Path, name: &str, edit: impl Fn(&mut Config)) -> (Config, Config) {
    let mut cfgs = Vec::new();
    for workers in [1, 2] {
        let (job, cfg) = small_job(dir, &format!("{name}-w{workers}"), |c| {
            layout(c, workers);
            edit(c);
        });
        train(&job, workers);
        cfgs.push(cfg);
    }
    let two = cfgs.pop().expect("two runs");
    (cfgs.pop().expect("two runs"), two)
}

fn plain(dir: &Path) -> Config {
    let (job, cfg) = small_job(dir, "plain", |c| layout(c, 1));
    train(&job, 1);
    cfg
}

#[test]
fn caption_dropout_zero_is_todays_run_and_any_rate_is_world_size_invariant() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plain = plain(dir.path());
    let (zero_job, zero) = small_job(dir.path(), "zero", |c| {
        layout(c, 1);
        c.data.caption_dropout = 0.0;
    });
    train(&zero_job, 1);
    assert_lora_close(&lora_of(&plain)?, &lora_of(&zero)?, 0.0, "caption dropout 0")?;
    assert_eq!(losses(&plain), losses(&zero));

    let (one, two) = one_and_two(dir.path(), "dropout", |c| c.data.caption_dropout = 0.5);
    assert_lora_close(&lora_of(&one)?, &lora_of(&two)?, 0.0, "caption dropout on 2 workers")?;
    assert_eq!(losses(&one), losses(&two));
    // Half the captions were the empty prompt: the run is not the plain one.
    assert_ne!(losses(&one), losses(&plain));
    Ok(())
}

#[test]
fn preservation_weight_zero_is_a_run_without_it_and_any_weight_is_world_size_invariant() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plain = plain(dir.path());
    let preserve = |weight: f64| {
        move |c: &mut Config| {
            // The demo dataset doubles as the preservation set: its items are trained toward the base model.
            c.preservation = Some(PreservationConfig { data: c.data.path.clone(), weight, ratio: 0.5 });
        }
    };
    let (zero_job, zero) = small_job(dir.path(), "weight0", |c| {
        layout(c, 1);
        preserve(0.0)(c);
    });
    train(&zero_job, 1);
    assert_lora_close(&lora_of(&plain)?, &lora_of(&zero)?, 0.0, "preservation weight 0")?;
    assert_eq!(losses(&plain), losses(&zero));

    let (one, two) = one_and_two(dir.path(), "weight1", preserve(1.0));
    assert_lora_close(&lora_of(&one)?, &lora_of(&two)?, 1e-5, "preservation on 2 workers")?;
    let preservation: Vec<f64> = metrics(&one).iter().filter_map(|l| l.get("preservation")?.as_f64()).collect();
    assert_eq!(preservation.len(), 4);
    assert!(preservation.iter().any(|&p| p > 0.0), "{preservation:?}");
    let lines_two: Vec<f64> = metrics(&two).iter().filter_map(|l| l.get("preservation")?.as_f64()).collect();
    assert_eq!(preservation, lines_two);
    assert_ne!(losses(&one), losses(&plain));
    Ok(())
}

/// The `turbo_drift` of every metrics line that has one, by step.
fn drifts(cfg: &Config) -> Vec<(u64, serde_json::Value)> {
    metrics(cfg).into_iter().filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("turbo_drift")?.clone()))).collect()
}

#[test]
fn turbo_drift_is_measured_at_sample_points_deterministic_and_zero_against_itself() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sampled = |reference: usize| {
        move |c: &mut Config| {
            layout(c, 1);
            c.sample.prompts = vec!["a red circle".into(), "a blue square".into()];
            c.sample.every_n_steps = 2;
            c.sample.steps = 3;
            c.sample.reference_steps = reference;
            (c.sample.width, c.sample.height) = (32, 32);
        }
    };
    let mut runs = Vec::new();
    for (name, reference) in [("drift-a", 6), ("drift-b", 6), ("itself", 3)] {
        let (job, cfg) = small_job(dir.path(), name, sampled(reference));
        train(&job, 1);
        runs.push(cfg);
    }
    let (a, b, itself) = (drifts(&runs[0]), drifts(&runs[1]), drifts(&runs[2]));
    assert_eq!(a.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 4]);
    assert_eq!(a, b, "the same seed measures the same drift");
    for (step, d) in &a {
        let prompts = d["prompts"].as_array().context("prompts")?;
        assert_eq!(prompts.len(), 2, "step {step}");
        assert_eq!(d["baseline"].as_array().context("baseline")?.len(), 2);
        assert!(prompts.iter().all(|p| p["latent_mad"].as_f64().is_some_and(|v| v > 0.0)), "{d}");
    }
    for (step, d) in &itself {
        for p in d["prompts"].as_array().into_iter().flatten().chain(d["baseline"].as_array().into_iter().flatten()) {
            assert_eq!(p["latent_mad"].as_f64(), Some(0.0), "step {step}: {d}");
            assert_eq!(p["psnr"].as_f64(), Some(acrf_worker::drift::PSNR_CAP), "step {step}: {d}");
            assert_eq!(p["sharpness"].as_f64(), Some(1.0), "step {step}: {d}");
        }
    }

    let run = Path::new(&runs[0].output).join("runs").join(&runs[0].run_name);
    let out = acrf(BIN, &["report", &run.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    for plot in ["turbo_drift.png", "turbo_sharpness.png"] {
        assert!(run.join(plot).is_file(), "{plot} not written");
    }
    assert!(std::fs::read_to_string(run.join("report.html"))?.contains("id=\"turbo-drift\""));
    Ok(())
}
