//! The losses against the PyTorch float64 reference cases (spec §6), computed in f32.
//!
//! Everything about the cases comes from the fixture directory (`ACRF_LOSS_FIXTURE`, default the copy in
//! `fixtures/losses`): the case list, shapes, parameters, the expected terms, weights, mode losses and
//! gradients. A mismatch is reported with its case, parameter set and term; all of them are collected before
//! the test fails, and the largest error of each kind of check is printed either way.

use std::collections::HashMap;
use std::path::PathBuf;

use acrf_common::config::{AcrfConfig, LossConfig, LossMode};
use acrf_worker::loss::{LossFn, Term, batch_loss, min_snr_weights};
use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor, Var};
use serde_json::Value;

/// Losses, terms and weights: relative to the reference value.
const VALUE_RTOL: f64 = 1e-5;
/// Gradients: relative to the largest magnitude of the reference tensor.
const GRAD_RTOL: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    std::env::var_os("ACRF_LOSS_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/losses"))
}

/// The largest error seen per kind of check, and every failure.
#[derive(Default)]
struct Report {
    worst: HashMap<String, f64>,
    failures: Vec<String>,
}

impl Report {
    /// Records `err` (already relative) for the check `kind`; `what` names it in a failure.
    fn record(&mut self, kind: &str, what: String, err: f64, tol: f64) {
        let worst = self.worst.entry(kind.to_string()).or_insert(0.0);
        *worst = worst.max(err);
        if err.is_nan() || err > tol {
            self.failures.push(format!("{what}: relative error {err:.3e} > {tol:e}"));
        }
    }

    fn value(&mut self, kind: &str, what: String, got: f64, want: f64) {
        let err = (got - want).abs() / want.abs();
        self.record(kind, format!("{what}: got {got:.10}, want {want:.10}"), err, VALUE_RTOL);
    }
}

/// The `LossConfig` fields of a parameter set, by name (unknown keys are an error), and its Min-SNR γ.
fn parse_params(params: &Value) -> Result<(LossConfig, f64)> {
    let mut fields = params.as_object().context("`params` is not an object")?.clone();
    let gamma = match fields.remove("snr_gamma") {
        Some(g) => g.as_f64().context("`snr_gamma` is not a number")?,
        None => AcrfConfig::default().snr_gamma,
    };
    let cfg: LossConfig = serde_json::from_value(Value::Object(fields)).context("loss parameters")?;
    cfg.validate()?;
    Ok((cfg, gamma))
}

fn f64s(v: &Value, what: &str) -> Result<Vec<f64>> {
    v.as_array()
        .with_context(|| format!("{what} is not an array"))?
        .iter()
        .map(|x| x.as_f64().with_context(|| format!("{what} holds a non-number")))
        .collect()
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

fn check_entry(entry: &Value, tensors: &HashMap<String, Tensor>, report: &mut Report) -> Result<()> {
    let case = entry["case"].as_u64().context("`case` is not an integer")?;
    let pset = entry["pset"].as_u64().context("`pset` is not an integer")?;
    let label = format!("case {case} pset {pset}");
    let (cfg, gamma) = parse_params(&entry["params"]).with_context(|| label.clone())?;
    let tensor = |name: &str| {
        let key = format!("case{case}.{name}");
        tensors.get(&key).cloned().ok_or_else(|| anyhow!("{label}: `{key}` is missing from the safetensors"))
    };
    let (x0, noise, sigma, v_pred) = (tensor("x0")?, tensor("noise")?, tensor("sigma")?, tensor("v_pred")?);
    let shape: Vec<usize> = f64s(&entry["shape"], "`shape`")?.into_iter().map(|d| d as usize).collect();
    if x0.dims() != shape.as_slice() {
        bail!("{label}: x0 has shape {:?}, the json says {shape:?}", x0.dims());
    }
    let v_pred = Var::from_tensor(&v_pred)?;

    let all = LossFn::new(cfg.clone()).terms(&Term::ALL, v_pred.as_tensor(), &x0, &noise, &sigma)?;
    for (name, want) in entry["terms"].as_object().context("`terms` is not an object")? {
        let term: Term = name.parse().map_err(|e: String| anyhow!("{label}: {e}"))?;
        let got = all.get(term).context("term not computed")?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let want = f64s(want, name)?;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            report.value(&format!("term {name}"), format!("{label} term {name} sample {i}"), *g, *w);
        }
    }

    let weights = min_snr_weights(&sigma, gamma)?;
    for (i, (g, w)) in weights.iter().zip(&f64s(&entry["weights"], "`weights`")?).enumerate() {
        report.value("min-snr weight", format!("{label} weight sample {i}"), *g, *w);
    }

    for (name, want) in entry["losses"].as_object().context("`losses` is not an object")? {
        let mode: LossMode = name.parse().map_err(|e: String| anyhow!("{label}: {e}"))?;
        let loss_fn = LossFn::new(LossConfig { loss_mode: mode, ..cfg.clone() });
        let per_sample = loss_fn.per_sample_loss(v_pred.as_tensor(), &x0, &noise, &sigma)?.loss;
        let loss = batch_loss(&per_sample, &sigma, gamma)?;
        let got = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let want = want.as_f64().with_context(|| format!("{label}: loss `{name}` is not a number"))?;
        report.value(&format!("loss {name}"), format!("{label} loss {name}"), got, want);

        let grads = loss.backward()?;
        let grad = grads.get(v_pred.as_tensor()).with_context(|| format!("{label} {name}: no gradient"))?;
        let want = tensor(&format!("p{pset}.grad.{name}"))?;
        let scale = max_abs(&want)?;
        let err = max_abs(&(grad - &want)?)? / scale;
        report.record(
            &format!("grad {name}"),
            format!("{label} gradient of {name} (max |g_ref| {scale:.3e})"),
            err,
            GRAD_RTOL,
        );
    }
    Ok(())
}

#[test]
fn losses_match_the_reference_cases() -> Result<()> {
    let dir = fixture_dir();
    let json = dir.join("loss_cases.json");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?)?;
    let tensors = candle_core::safetensors::load(dir.join("loss_cases.safetensors"), &Device::Cpu)
        .with_context(|| format!("reading {}", dir.join("loss_cases.safetensors").display()))?;
    let cases = cases.as_array().context("loss_cases.json is not a list")?;
    assert!(!cases.is_empty(), "{} holds no cases", json.display());

    let mut report = Report::default();
    for entry in cases {
        check_entry(entry, &tensors, &mut report)?;
    }
    let mut worst: Vec<_> = report.worst.iter().collect();
    worst.sort_by(|a, b| a.0.cmp(b.0));
    println!("{} entries from {}; largest relative errors:", cases.len(), dir.display());
    for (kind, err) in worst {
        println!("  {kind:<22} {err:.3e}");
    }
    assert!(report.failures.is_empty(), "{} mismatches:\n{}", report.failures.len(), report.failures.join("\n"));
    Ok(())
}
