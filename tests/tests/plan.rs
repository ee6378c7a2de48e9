//! `acrf plan` and `acrf bench` through the real binary: the memory prediction against the peak resident set
//! a real training step reaches, the full-size Z-Image Turbo prediction, and `acrf train` refusing a job
//! that will not fit.

use acrf_common::config::{Config, LoraBlock, LoraTarget, ModelDtype};
use acrf_tests::{acrf, small_job, stderr, stdout};
use acrf_worker::estimate::{Estimate, Workload};
use acrf_worker::model::ZImageConfig;
use anyhow::{Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// Runs one timed step of a synthetic job in a fresh process and returns (measured, planned) peak bytes.
///
/// glibc's mmap threshold is pinned so that every tensor-sized block goes back to the system when freed:
/// the resident set then follows the live tensors instead of what the allocator chose to keep, which is
/// what a GPU's caching allocator does with its own pool.
fn measured_and_planned(flags: &[&str]) -> Result<(f64, f64)> {
    let mut args = vec!["bench", "--synthetic", "--steps", "1", "--warmup", "1", "--json"];
    args.extend_from_slice(flags);
    let out = std::process::Command::new(BIN)
        .args(&args)
        .env("RUST_LOG", "warn")
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_ARENA_MAX", "1")
        .output()?;
    assert!(out.status.success(), "bench {flags:?} failed: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim())?;
    let peak = report["peak_bytes"].as_f64().context("no measured peak (is /proc/self/status readable?)")?;
    Ok((peak, report["planned_bytes"].as_f64().context("planned_bytes")?))
}

#[test]
fn plan_is_within_15_percent_of_the_measured_peak() -> Result<()> {
    let configs: [&[&str]; 3] = [
        &["--dim", "128", "--heads", "2", "--layers", "2", "--refiners", "1", "--hw", "16", "--cap", "32"],
        &["--dim", "256", "--heads", "4", "--layers", "4", "--refiners", "2", "--hw", "32", "--cap", "64", "--ffn"],
        &["--dim", "256", "--heads", "4", "--layers", "4", "--refiners", "2", "--hw", "48", "--cap", "64", "--ckpt"],
    ];
    for flags in configs {
        let (measured, planned) = measured_and_planned(flags)?;
        let error = (planned - measured) / measured;
        println!(
            "{flags:?}: measured {:.1} MiB, planned {:.1} MiB, error {:+.1}%",
            measured / 1048576.0,
            planned / 1048576.0,
            100.0 * error
        );
        assert!(
            error.abs() <= 0.15,
            "{flags:?}: planned {planned} bytes, measured {measured} ({:+.1}%)",
            100.0 * error
        );
    }
    Ok(())
}

/// The product's target: Z-Image Turbo at 1024² (a 128×128 latent, 4096 image tokens) with a 512-token
/// caption, rank 16 on every linear of every block, batch 1, checkpointing, bf16 base weights, on a GPU.
#[test]
fn full_size_turbo_at_1024_is_planned_under_20_gb() -> Result<()> {
    let mut cfg = Config::new("out", "model", "data");
    cfg.model.dtype = ModelDtype::Bf16;
    cfg.lora.network_dim = 16;
    cfg.lora.network_alpha = 16.0;
    cfg.lora.targets =
        vec![LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0, LoraTarget::FeedForward];
    cfg.lora.blocks = vec![LoraBlock::NoiseRefiner, LoraBlock::ContextRefiner, LoraBlock::Layers];
    cfg.training.batch_size = 1;
    cfg.training.gradient_accumulation = 1;
    cfg.training.gradient_checkpointing = true;
    let turbo = ZImageConfig::z_image_turbo();
    assert_eq!(
        (turbo.dim, turbo.n_heads, turbo.n_layers, turbo.n_refiner_layers, turbo.cap_feat_dim),
        (3840, 30, 30, 2, 2560)
    );
    let w = Workload::new(&cfg, turbo, true, (128, 128), 512);
    let e = Estimate::new(&w);
    for item in &e.memory {
        println!("{:<40} {:>8.2} GB  {}", item.name, item.bytes as f64 / 1e9, item.detail);
    }
    println!("peak {:.2} GB, {:.1} TFLOP per step", e.peak() as f64 / 1e9, e.flops.total() / 1e12);
    assert!(e.peak() < 20_000_000_000, "full-size peak planned at {} bytes", e.peak());
    // The bf16 weights alone are 12.3 GB: a plan below them would be leaving something out.
    assert!(e.peak() > 12_300_000_000);
    Ok(())
}

#[test]
fn train_refuses_a_job_that_does_not_fit_and_names_the_knob() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, _) = small_job(dir.path(), "fit", |c| c.training.gradient_checkpointing = false);
    let job = job.display().to_string();
    let out = acrf(BIN, &["train", &job, "--device-memory", "1MiB"]);
    assert!(!out.status.success(), "a 1 MiB device took the job: {}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("1.0 MiB") && err.contains("training.gradient_checkpointing = true"), "{err}");
    let plan = acrf(BIN, &["plan", &job, "--device-memory", "1MiB"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let table = stdout(&plan);
    assert!(table.contains("predicted peak") && table.contains("base weights") && table.contains("FLOPs"), "{table}");
    Ok(())
}
