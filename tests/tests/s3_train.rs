//! A training run with its output in an S3 bucket (the test server, which the `acrf` process reaches
//! through the `AWS_*` environment) against the same run into a local folder.

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::Config;
use acrf_common::store::BlockingStore;
use acrf_tests::s3::S3Server;
use acrf_tests::{acrf, acrf_command, losses, small_job, stderr};
use acrf_worker::checkpoint::{LORA, OPTIMIZER};
use anyhow::Result;
use candle_core::Device;

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// The tensors of a safetensors file as raw f32 bits, by name.
fn tensor_bits(bytes: &[u8]) -> Result<Vec<(String, Vec<u32>)>> {
    let mut out = Vec::new();
    for (name, t) in candle_core::safetensors::load_buffer(bytes, &Device::Cpu)? {
        let values: Vec<f32> = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        out.push((name, values.iter().map(|v| v.to_bits()).collect()));
    }
    out.sort();
    Ok(out)
}

#[test]
fn training_into_s3_matches_training_into_a_folder() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("acrf-runs");
    let dir = tempfile::tempdir()?;
    let short = |c: &mut Config| {
        c.training.max_steps = 8;
        c.training.save_every_n_steps = 4;
    };
    let (local_job, local_cfg) = small_job(dir.path(), "local", short);
    let (s3_job, s3_cfg) = small_job(dir.path(), "s3", |c| {
        short(c);
        c.output = "s3://acrf-runs/team/out".into();
    });

    let out = acrf(BIN, &["train", &local_job.display().to_string()]);
    assert!(out.status.success(), "local run: {}", stderr(&out));
    let out = server.configure(&mut acrf_command(BIN, &["train", &s3_job.display().to_string()])).output()?;
    assert!(out.status.success(), "S3 run: {}", stderr(&out));

    let local = BlockingStore::from_url(&local_cfg.output)?;
    let s3 = server.store(&s3_cfg.output)?;
    let run = &s3_cfg.run_name;
    assert_eq!(run, &local_cfg.run_name);

    let lora_file = format!("{run}.safetensors");
    let final_lora = tensor_bits(&s3.get(&lora_file)?)?;
    assert!(!final_lora.is_empty());
    assert!(final_lora == tensor_bits(&local.get(&lora_file)?)?, "the final LoRA differs");

    let (on_s3, on_disk) = (Checkpoints::new(&s3, run, "reader")?, Checkpoints::new(&local, run, "reader")?);
    assert_eq!(on_s3.committed_steps()?, [4, 8]);
    assert_eq!(on_disk.committed_steps()?, [4, 8]);
    assert_eq!(on_s3.latest_pointer()?, Some(8));
    for step in [4, 8] {
        let (s3_blobs, disk_blobs) = (on_s3.load(step)?.1, on_disk.load(step)?.1);
        for blob in [LORA, OPTIMIZER] {
            assert!(s3_blobs[blob] == disk_blobs[blob], "{blob} of step {step} differs");
        }
    }

    let metrics = s3.get(&format!("runs/{run}/metrics.jsonl"))?;
    let lines: Vec<serde_json::Value> =
        String::from_utf8(metrics.to_vec())?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let steps: Vec<u64> = lines.iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let s3_losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(s3_losses, losses(&local_cfg));
    Ok(())
}
