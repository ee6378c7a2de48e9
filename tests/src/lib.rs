//! Shared helpers of the end-to-end tests: the CLI as a real process, fixture folders, small jobs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::Config;
use acrf_common::store::BlockingStore;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

pub mod process;
pub mod s3;
pub mod ssh;
pub mod zimage;

/// The fixture folder named by `var`, or the copy under `tests/fixtures/<name>`.
pub fn fixture_dir(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name))
}

/// Runs the `acrf` CLI binary at `bin` with `args`, capturing its output.
pub fn acrf(bin: &str, args: &[&str]) -> Output {
    acrf_command(bin, args).output().expect("the acrf binary runs")
}

/// The `acrf` CLI binary at `bin` with `args`, for a caller that sets more of its environment.
pub fn acrf_command(bin: &str, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command.args(args).env("RUST_LOG", "warn");
    command
}

/// A demo model and dataset in `dir` (written once per folder) and a short job around them, saved as
/// `dir/<name>.toml` with `output` in `dir/<name>-out`.
pub fn small_job(dir: &Path, name: &str, edit: impl FnOnce(&mut Config)) -> (PathBuf, Config) {
    if !dir.join("job.toml").exists() {
        acrf_coordinator::demo::write(dir).expect("demo files");
    }
    let mut cfg = Config::load(&dir.join("job.toml")).expect("demo job");
    cfg.output = dir.join(format!("{name}-out")).display().to_string();
    cfg.training.max_steps = 12;
    cfg.training.gradient_accumulation = 2;
    cfg.training.save_every_n_steps = 4;
    edit(&mut cfg);
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg.to_toml_string_with_credentials().expect("config prints")).expect("job written");
    (path, cfg)
}

/// Heartbeats every second and a worker declared lost after 4 s, so that tests which kill or lose workers
/// see the group re-form in seconds; a 120 s rendezvous leaves room for a loaded CI machine to start them.
pub fn fast_heartbeats(c: &mut Config) {
    c.distributed.heartbeat_interval_s = 1;
    c.distributed.heartbeat_timeout_s = 4;
    c.distributed.rendezvous_timeout_s = 120;
}

/// The `loss` of every line of a run's `metrics.jsonl`.
pub fn losses(cfg: &Config) -> Vec<f64> {
    metrics(cfg).iter().filter_map(|v| v.get("loss")?.as_f64()).collect()
}

/// The lines of a run's `metrics.jsonl` (local outputs only).
pub fn metrics(cfg: &Config) -> Vec<serde_json::Value> {
    let path = Path::new(&cfg.output).join("runs").join(&cfg.run_name).join("metrics.jsonl");
    std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The LoRA tensors of a run's newest valid checkpoint, by name, and its step.
pub fn final_lora(cfg: &Config) -> Result<(u64, BTreeMap<String, Tensor>)> {
    let out = BlockingStore::from_url(&cfg.output)?;
    let (m, blobs) = Checkpoints::new(&out, &cfg.run_name, "reader")?.latest_valid()?.context("no checkpoint")?;
    let r = acrf_worker::checkpoint::read(&blobs, "test", &Device::Cpu)?;
    Ok((m.step, r.lora.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()))
}

/// The LoRA tensors of a run's newest valid checkpoint, by name.
pub fn lora_of(cfg: &Config) -> Result<BTreeMap<String, Tensor>> {
    Ok(final_lora(cfg)?.1)
}

/// Asserts that the LoRA `b` is within `rel` of `a` in the relative L2 sense over all its tensors (the issue's
/// "LoRA weights equal to 1e-5 relative"), computed in f64 so the check adds no rounding of its own; the message
/// names `what` and the tensor that differs most.
pub fn assert_lora_close(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    rel: f64,
    what: &str,
) -> Result<()> {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: other tensors");
    let (mut norm2, mut diff2, mut worst) = (0f64, 0f64, (0f64, ""));
    for (name, ta) in a {
        let (ta, tb) = (ta.to_dtype(DType::F64)?, b[name].to_dtype(DType::F64)?);
        let n2 = ta.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let d2 = (&ta - &tb)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let tensor_rel = (d2 / n2.max(1e-300)).sqrt();
        if tensor_rel >= worst.0 {
            worst = (tensor_rel, name.as_str());
        }
        (norm2, diff2) = (norm2 + n2, diff2 + d2);
    }
    let (norm, diff) = (norm2.sqrt(), diff2.sqrt());
    assert!(
        diff <= rel * norm.max(1e-12),
        "{what}: LoRA differs by {diff:e} (norm {norm}, relative {:e}); most in {} ({:e} relative)",
        diff / norm,
        worst.1,
        worst.0
    );
    Ok(())
}

/// GET `path` from the server at `url` (`http://host:port/…`) and return the status line and the body.
pub fn http_get(url: &str, path: &str) -> std::io::Result<(String, String)> {
    let host = url.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
}
