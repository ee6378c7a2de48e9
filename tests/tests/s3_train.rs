//! Training runs against an S3-compatible server on loopback (`acrf_tests::s3`): the same run into a bucket
//! and into a local folder, its dataset read from a bucket, and store failures on the way, both the kind
//! that retries absorb and the kind that must stop the run without a half-written checkpoint.

use std::path::Path;
use std::process::Output;

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::Config;
use acrf_common::store::BlockingStore;
use acrf_tests::s3::{Fault, S3Server};
use acrf_tests::{acrf, acrf_command, losses, small_job, stderr};
use acrf_worker::checkpoint::{LORA, OPTIMIZER};
use anyhow::Result;
use hyper::{Method, StatusCode};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// Eight steps with a checkpoint at 4 and 8.
fn short(c: &mut Config) {
    c.training.max_steps = 8;
    c.training.save_every_n_steps = 4;
}

/// `acrf train job` with the server's credentials in the environment and nothing else of its settings:
/// the endpoint, region and plain HTTP must come from the job's `[storage]` section.
fn train_on(server: &S3Server, job: &Path, extra: &[&str]) -> Result<Output> {
    let job = job.display().to_string();
    let mut command = acrf_command(BIN, &[&["train", job.as_str()], extra].concat());
    server.configure(&mut command);
    for from_the_job in ["AWS_ENDPOINT", "AWS_ALLOW_HTTP", "AWS_REGION"] {
        command.env_remove(from_the_job);
    }
    Ok(command.output()?)
}

/// Points `c` at `server` through its `[storage]` section.
fn storage_on(server: &S3Server, c: &mut Config) {
    c.storage.endpoint = Some(server.endpoint().to_string());
    c.storage.allow_http = Some(true);
    c.storage.region = Some(acrf_tests::s3::REGION.to_string());
}

/// Copies every object of `from` to `to`.
fn upload(from: &BlockingStore, to: &BlockingStore) -> Result<()> {
    for (name, _) in from.list("")? {
        to.put(&name, from.get(&name)?)?;
    }
    Ok(())
}

/// Both runs read the demo dataset, the S3 one from a bucket; the server throttles the first two tries to
/// commit each checkpoint (503 SlowDown), which the retries ride out. The LoRA files come out byte for
/// byte the same, every checkpoint verifies, and the losses agree step for step.
#[test]
fn training_into_s3_matches_training_into_a_folder() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("acrf-runs");
    server.create_bucket("acrf-data");
    let dir = tempfile::tempdir()?;
    let (local_job, local_cfg) = small_job(dir.path(), "local", short);
    let data = server.store("s3://acrf-data/demo/cache")?;
    upload(&BlockingStore::from_url(&local_cfg.data.path)?, &data)?;
    let (s3_job, s3_cfg) = small_job(dir.path(), "s3", |c| {
        short(c);
        c.output = "s3://acrf-runs/team/out".into();
        c.data.path = data.url().to_string();
        storage_on(&server, c);
    });
    for step in [4, 8] {
        server.inject(Fault {
            method: Method::PUT,
            path_contains: format!("ckpt/{step:010}/MANIFEST.json"),
            status: StatusCode::SERVICE_UNAVAILABLE,
            times: 2,
        });
    }

    let out = acrf(BIN, &["train", &local_job.display().to_string()]);
    assert!(out.status.success(), "local run: {}", stderr(&out));
    let out = train_on(&server, &s3_job, &[])?;
    assert!(out.status.success(), "S3 run: {}", stderr(&out));
    assert_eq!(server.faults_served(), 4, "every injected 503 was met and retried");

    let local = BlockingStore::from_url(&local_cfg.output)?;
    let s3 = server.store(&s3_cfg.output)?;
    let run = &s3_cfg.run_name;
    for file in [format!("{run}.safetensors"), format!("{run}-step00000004.safetensors")] {
        assert!(s3.get(&file)? == local.get(&file)?, "{file} differs between the bucket and the folder");
    }

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

/// A missing bucket, a wrong secret, and a refusal in the middle of a checkpoint each stop the run with a
/// non-zero exit that names the URL and the server's answer. The refused checkpoint is not committed, the
/// one before it still verifies, and the same job run again resumes from it and finishes. A second
/// coordinator told to start the finished run over (resume = never) is refused before it writes.
#[test]
fn a_permanent_store_error_stops_the_run_without_a_half_commit() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("acrf-runs");
    let dir = tempfile::tempdir()?;
    let job = |name: &str, output: &str| {
        small_job(dir.path(), name, |c| {
            short(c);
            c.output = output.into();
            storage_on(&server, c);
        })
    };

    let (missing, _) = job("missing", "s3://no-such-bucket/out");
    let out = train_on(&server, &missing, &[])?;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("s3://no-such-bucket/out") && err.contains("NoSuchBucket"), "{err}");

    let (refused, _) = job("refused", "s3://acrf-runs/refused");
    let mut command = acrf_command(BIN, &["train", &refused.display().to_string()]);
    server.configure(&mut command).env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let out = command.output()?;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("s3://acrf-runs/refused") && err.contains("403"), "{err}");
    assert!(server.store("s3://acrf-runs/refused")?.list("")?.is_empty(), "a refused run wrote something");

    let (broken, cfg) = job("broken", "s3://acrf-runs/broken");
    server.inject(Fault {
        method: Method::PUT,
        path_contains: "ckpt/0000000008/".into(),
        status: StatusCode::FORBIDDEN,
        times: 1,
    });
    let out = train_on(&server, &broken, &[])?;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    let run = &cfg.run_name;
    let step_8 = format!("s3://acrf-runs/broken/runs/{run}/ckpt/0000000008/");
    assert!(err.contains(&step_8) && err.contains("AccessDenied"), "{err}");
    assert_eq!(server.faults_served(), 1);
    let output = server.store(&cfg.output)?;
    let checkpoints = Checkpoints::new(&output, run, "reader")?;
    assert_eq!(checkpoints.committed_steps()?, [4], "step 8 has no manifest");
    assert_eq!(checkpoints.latest_pointer()?, Some(4));
    assert_eq!(checkpoints.latest_valid()?.map(|(m, _)| m.step), Some(4));
    assert!(!output.exists(&format!("{run}.safetensors"))?, "no final LoRA without its checkpoint");

    let out = train_on(&server, &broken, &[])?;
    assert!(out.status.success(), "the rerun: {}", stderr(&out));
    assert_eq!(checkpoints.committed_steps()?, [4, 8]);
    assert_eq!(checkpoints.load(8)?.1[LORA], output.get(&format!("{run}.safetensors"))?);

    let first = checkpoints.load(4)?.0.writer;
    let out = train_on(&server, &broken, &["--set", "checkpoint.resume=never"])?;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    let expected = format!("run `{run}` at s3://acrf-runs/broken/runs/{run} already has checkpoints (up to step 8)");
    assert!(err.contains(&expected), "{err}");
    assert_eq!(checkpoints.load(4)?.0.writer, first, "the first writer's checkpoint stands");
    Ok(())
}

/// Issue 20: a second writer of a run on an object store (which has no lock) is refused at its first commit;
/// it used to upload its own metrics.jsonl on the way out, over the first writer's. A run that never
/// committed uploads none. Here the second writer resumes from step 4 and finds step 8 taken (the server
/// answers its create-only manifest with 412, as when another writer got there first).
#[test]
fn a_writer_refused_at_its_first_commit_uploads_no_metrics() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("acrf-runs");
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "second", |c| {
        short(c);
        c.output = "s3://acrf-runs/second".into();
        storage_on(&server, c);
    });
    let out = train_on(&server, &job, &[])?;
    assert!(out.status.success(), "the first writer: {}", stderr(&out));
    let run = &cfg.run_name;
    let output = server.store(&cfg.output)?;
    let metrics = format!("runs/{run}/metrics.jsonl");
    let first = output.get(&metrics)?;
    output.delete(&format!("runs/{run}/ckpt/0000000008/MANIFEST.json"))?;
    server.inject(Fault {
        method: Method::PUT,
        path_contains: "ckpt/0000000008/MANIFEST.json".into(),
        status: StatusCode::PRECONDITION_FAILED,
        times: 1,
    });
    let out = train_on(&server, &job, &[])?;
    assert!(!out.status.success(), "the second writer committed");
    assert!(stderr(&out).contains("step 8 is already committed"), "{}", stderr(&out));
    assert!(output.get(&metrics)? == first, "the refused writer replaced the metrics");
    Ok(())
}
