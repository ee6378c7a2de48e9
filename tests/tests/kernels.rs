//! The tools that check and measure the fused kernels, through the real binary: `acrf doctor` checks every
//! fused op against the composed ops it replaces and fails when one disagrees; `acrf bench --profile` charges
//! a step's time to the op sites of the model.

use acrf_tests::{acrf, stderr, stdout};
use anyhow::{Context, Result};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

#[test]
fn doctor_checks_every_fused_op_on_the_cpu() -> Result<()> {
    let out = acrf(BIN, &["doctor"]);
    assert!(out.status.success(), "doctor failed: {}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    for op in ["attention", "rms_norm · scale", "residual + rms_norm · gate", "qk-norm + rope", "swiglu", "lora linear"]
    {
        assert!(text.lines().any(|l| l.starts_with(op) && l.ends_with("ok")), "no passing {op} check:\n{text}");
    }
    assert!(text.contains("checks passed") && text.contains("CPU"), "{text}");

    let json = acrf(BIN, &["doctor", "--json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_str(stdout(&json).trim())?;
    let checks = report["checks"].as_array().context("checks")?;
    assert!(checks.len() >= 12, "{checks:?}");
    for c in checks {
        assert_eq!(c["dtype"], "f32", "the CPU checks f32: {c}");
        let (v, g) = (c["value_err"].as_f64().context("value_err")?, c["grad_err"].as_f64().context("grad_err")?);
        assert!(c["pass"] == true && v <= 1e-5 && g <= 1e-5, "{c}");
    }
    Ok(())
}

#[test]
fn doctor_refuses_a_gpu_it_cannot_use() {
    let out = acrf(BIN, &["doctor", "--device", "cuda:0"]);
    assert!(!out.status.success(), "a CPU build (or a machine without a GPU) passed a GPU doctor");
    assert!(stderr(&out).contains("cuda"), "{}", stderr(&out));
}

/// The profile names every op site of a block, charges time to each pass of a checkpointed step, and its
/// sites and the rest add up to the pass.
#[test]
fn bench_profile_charges_the_step_to_op_sites() -> Result<()> {
    let flags = ["--synthetic", "--dim", "128", "--heads", "2", "--layers", "2", "--refiners", "1", "--hw", "16"];
    let mut args = vec!["bench", "--steps", "1", "--warmup", "0", "--profile", "--ckpt", "--ffn"];
    args.extend(flags);
    let out = acrf(BIN, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for row in [
        "norm (+scale, +residual)",
        "modulation (adaLN)",
        "q/k/v projections",
        "qk-norm + RoPE",
        "attention core",
        "out projection",
        "feed-forward (SwiGLU)",
        "LoRA branches",
        "other (autograd, glue)",
        "whole pass",
    ] {
        assert!(text.lines().any(|l| l.starts_with(row)), "no {row} row:\n{text}");
    }

    args.push("--json");
    let json = acrf(BIN, &args);
    assert!(json.status.success(), "{}", stderr(&json));
    let report: serde_json::Value = serde_json::from_str(stdout(&json).trim())?;
    let profile = &report["profile"];
    assert_eq!(profile["steps"], 3, "{profile}");
    let rows = profile["per_step"].as_array().context("per_step")?;
    // An adapted projection's backward is the projection's (its LoRA parts are the LoRA branch's).
    for site in ["q/k/v projections", "out projection", "LoRA branches"] {
        let row = rows.iter().find(|r| r["site"] == site && r["pass"] == "Backward").context(site)?;
        assert!(row["host_ms"].as_f64().context("host_ms")? > 0.0, "{row}");
    }
    for pass in ["Forward", "Recompute", "Backward"] {
        let of_pass: Vec<_> = rows.iter().filter(|r| r["pass"] == pass).collect();
        let attention = of_pass.iter().find(|r| r["site"] == "attention core").context("attention row")?;
        assert!(attention["host_ms"].as_f64().context("host_ms")? > 0.0, "{pass}: {attention}");
        assert!(attention["gpu_ms"].is_null(), "no GPU time on a CPU: {attention}");
        let host = |r: &&serde_json::Value| r["host_ms"].as_f64().unwrap_or(f64::NAN);
        let (whole, parts): (Vec<_>, Vec<_>) = of_pass.iter().partition(|r| r["site"] == "whole pass");
        let sum: f64 = parts.iter().map(host).sum();
        let whole = host(&whole.first().context("a whole-pass row")?);
        assert!((sum - whole).abs() <= 1e-6 * whole.max(1.0), "{pass}: sites add up to {sum} ms of {whole} ms");
    }
    Ok(())
}
