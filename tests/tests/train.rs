//! Single-node training through the real `acrf` binary: the demo, exact resume (also after SIGTERM),
//! and what bad input does.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use acrf_common::checkpoint::Checkpoints;
use acrf_common::config::Config;
use acrf_common::store::BlockingStore;
use acrf_tests::{acrf, losses, metrics, small_job, stderr, stdout};
use acrf_worker::checkpoint as ckpt;
use acrf_worker::timing::Stopwatch;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// The newest checkpoint of a run, read back.
fn final_state(cfg: &Config) -> Result<(u64, BTreeMap<String, Tensor>)> {
    let out = BlockingStore::from_url(&cfg.output)?;
    let c = Checkpoints::new(&out, &cfg.run_name, "reader")?;
    let (manifest, blobs) = c.latest_valid()?.context("no checkpoint")?;
    let r = ckpt::read(&blobs, "test", &Device::Cpu)?;
    let mut tensors: BTreeMap<String, Tensor> =
        r.lora.vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    tensors.extend(r.optimizer.tensors.into_iter().map(|(n, t)| (format!("opt.{n}"), t)));
    Ok((manifest.step, tensors))
}

fn assert_bitwise_equal(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Result<()> {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, ta) in a {
        let (va, vb): (Vec<f32>, Vec<f32>) = (ta.flatten_all()?.to_vec1()?, b[name].flatten_all()?.to_vec1()?);
        let same = va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs");
    }
    Ok(())
}

#[test]
fn demo_trains_and_the_loss_falls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = acrf(BIN, &["demo", "--dir", &dir.path().display().to_string()]);
    assert!(out.status.success(), "demo failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("acrf train") && text.contains("demo.safetensors"), "{text}");
    let cfg = Config::load(&dir.path().join("job.toml"))?;
    let l = losses(&cfg);
    assert_eq!(l.len() as u64, cfg.training.max_steps, "one metrics line per step");
    let n = l.len() / 10;
    let (first, last) = (l[..n].iter().sum::<f64>() / n as f64, l[l.len() - n..].iter().sum::<f64>() / n as f64);
    assert!(last < 0.9 * first, "loss did not fall: first 10% {first}, last 10% {last}");
    let lora = acrf_worker::lora::Lora::load(&dir.path().join("output/demo.safetensors"), &Device::Cpu)?;
    assert!(!lora.modules.is_empty());

    // The printed command trains it again from the demo's folder, its parent or anywhere else (issue #16,
    // item 5): the job's paths mean the same from everywhere, so the finished run is recognised and said to
    // be finished, with its LoRA and the way to extend it.
    let again = text.lines().find_map(|l| l.strip_prefix("train it again with: ")).context("no rerun command")?;
    let job = dir.path().join("job.toml");
    assert_eq!(again, format!("acrf train {}", job.display()));
    let parent = dir.path().parent().context("parent")?;
    let name = dir.path().file_name().context("name")?.to_string_lossy().into_owned();
    for (cwd, path) in [
        (dir.path(), "job.toml".to_string()),
        (parent, format!("{name}/job.toml")),
        (parent, job.display().to_string()),
    ] {
        let out = acrf_tests::acrf_command(BIN, &["train", &path]).current_dir(cwd).output()?;
        let said = stdout(&out);
        assert!(out.status.success(), "acrf train {path} in {}: {}", cwd.display(), stderr(&out));
        assert!(said.contains("this run is finished") && said.contains("demo.safetensors"), "{said}");
        assert!(said.contains("--extend --set training.max_steps="), "{said}");
    }
    // And the printed way to train it longer does, by two steps here.
    let longer = text.lines().find_map(|l| l.strip_prefix("train it longer with: ")).context("no extend command")?;
    let steps = cfg.training.max_steps + 2;
    let extend = longer.replace(&format!("max_steps={}", 2 * cfg.training.max_steps), &format!("max_steps={steps}"));
    let argv: Vec<&str> = extend.split_whitespace().skip(1).collect();
    let out = acrf_tests::acrf_command(BIN, &argv).current_dir(dir.path()).output()?;
    assert!(out.status.success(), "{extend}: {}", stderr(&out));
    assert_eq!(losses(&cfg).len() as u64, steps, "{extend} trains on to step {steps}");
    Ok(())
}

#[test]
fn resume_after_sigterm_is_exact() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (whole, whole_cfg) = small_job(dir.path(), "whole", |_| {});
    let (parts, parts_cfg) = small_job(dir.path(), "parts", |_| {});

    let out = acrf(BIN, &["train", &whole.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Stop the second run with SIGTERM once it is past step 5; it must save before exiting.
    let mut child = Command::new(BIN).args(["train", &parts.display().to_string()]).env("RUST_LOG", "warn").spawn()?;
    let started = Instant::now();
    while metrics(&parts_cfg).len() < 5 {
        if started.elapsed() > Duration::from_secs(120) {
            child.kill()?;
            bail!("the run did not reach step 5");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status()?.success());
    let status = child.wait()?;
    assert!(status.success(), "a SIGTERM'd run exits cleanly after saving");
    let (stopped_at, _) = final_state(&parts_cfg)?;
    assert!((5..12).contains(&stopped_at), "saved at the step it stopped on, got {stopped_at}");

    let out = acrf(BIN, &["train", &parts.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a_step, a) = final_state(&whole_cfg)?;
    let (b_step, b) = final_state(&parts_cfg)?;
    assert_eq!((a_step, b_step), (12, 12));
    assert_bitwise_equal(&a, &b)?;
    let (la, lb) = (losses(&whole_cfg), losses(&parts_cfg));
    assert_eq!(la, lb, "the metrics of the resumed run continue the same curve");
    Ok(())
}

#[test]
fn resume_from_a_chosen_step_and_refused_changes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "pick", |c| c.training.max_steps = 8);
    assert!(acrf(BIN, &["train", &job.display().to_string()]).status.success());
    let (_, reference) = final_state(&cfg)?;

    let out = acrf(BIN, &["train", &job.display().to_string(), "--resume", "4"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("newer than step 4"), "{}", stderr(&out));

    // Remove step 8 and continue from 4: the same weights again.
    let run = Path::new(&cfg.output).join("runs").join(&cfg.run_name).join("ckpt/0000000008");
    std::fs::remove_dir_all(&run)?;
    let out = acrf(BIN, &["train", &job.display().to_string(), "--resume", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_bitwise_equal(&reference, &final_state(&cfg)?.1)?;

    let out = acrf(
        BIN,
        &[
            "train",
            &job.display().to_string(),
            "--set",
            "training.learning_rate=1e-2",
            "--set",
            "training.max_steps=12",
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("training.learning_rate") && err.contains("different settings"), "{err}");
    Ok(())
}

#[test]
fn bad_config_and_data_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, _) = small_job(dir.path(), "bad", |_| {});
    let text = std::fs::read_to_string(&job)?;

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, text.replace("learning_rate", "learnin_rate"))?;
    let err = stderr(&acrf(BIN, &["train", &typo.display().to_string()]));
    assert!(err.contains("learnin_rate") && err.contains("typo.toml"), "{err}");

    let range = dir.path().join("range.toml");
    std::fs::write(&range, text.replace("batch_size = 2", "batch_size = 0"))?;
    let err = stderr(&acrf(BIN, &["train", &range.display().to_string()]));
    assert!(err.contains("training.batch_size"), "{err}");

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "output = \"x\"\n[model\npath = 1")?;
    let out = acrf(BIN, &["train", &broken.display().to_string()]);
    assert!(!out.status.success() && stderr(&out).contains("broken.toml"), "{}", stderr(&out));

    let (nodata, _) = small_job(dir.path(), "nodata", |c| c.data.path = "/nonexistent/dataset".into());
    let err = stderr(&acrf(BIN, &["train", &nodata.display().to_string()]));
    assert!(err.contains("no dataset at /nonexistent/dataset"), "{err}");

    // Replace one item file with a latent of another shape: the error names the file and both shapes.
    let items = dir.path().join("data/items");
    let victim = std::fs::read_dir(&items)?.next().context("an item")??.path();
    let bytes = std::fs::read(&victim)?;
    let meta = safetensors::SafeTensors::read_metadata(&bytes)?.1.metadata().clone();
    let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    t.insert("latent".into(), Tensor::zeros((16, 6, 6), candle_core::DType::F32, &Device::Cpu)?);
    let views: Vec<(String, Tensor)> = t.into_iter().collect();
    std::fs::write(&victim, safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), meta)?)?;
    let (shape_job, _) = small_job(dir.path(), "shape", |_| {});
    let err = stderr(&acrf(BIN, &["train", &shape_job.display().to_string()]));
    let name = victim.file_name().context("name")?.to_string_lossy().into_owned();
    assert!(err.contains(&name) && err.contains("[16, 6, 6]"), "{err}");
    Ok(())
}

#[test]
fn non_finite_losses_are_skipped_then_stop_the_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    acrf_coordinator::demo::write(dir.path())?;
    // A second dataset in which half the items are NaN.
    let store = BlockingStore::from_url(&dir.path().join("nan-data").display().to_string())?;
    let mut w = acrf_worker::data::DatasetWriter::new(store, 16, 64, serde_json::json!({}));
    for i in 0..8 {
        let value = if i % 2 == 0 { 0.5 } else { f32::NAN };
        w.put_item(
            &format!("i{i}"),
            "test",
            &Tensor::full(value, (16, 8, 8), &Device::Cpu)?,
            &Tensor::ones((5, 64), candle_core::DType::F32, &Device::Cpu)?,
        )?;
    }
    w.finish()?;
    let (job, cfg) = small_job(dir.path(), "nan", |c| {
        c.data.path = dir.path().join("nan-data").display().to_string();
        c.training.batch_size = 1;
        c.training.gradient_accumulation = 1;
        c.training.max_steps = 40;
        c.training.save_every_n_steps = 1;
        c.training.max_nonfinite_steps = 2;
    });
    let out = acrf(BIN, &["train", &job.display().to_string()]);
    assert!(!out.status.success(), "the run must stop");
    assert!(stderr(&out).contains("not finite"), "{}", stderr(&out));
    let lines = metrics(&cfg);
    let skipped: Vec<bool> = lines.iter().map(|l| l["skipped"].as_bool().unwrap_or(false)).collect();
    assert!(skipped.iter().any(|s| !s) && skipped.iter().filter(|s| **s).count() >= 2, "{skipped:?}");
    assert!(skipped.ends_with(&[true, true]), "stopped after two skipped steps in a row: {skipped:?}");
    // The last checkpoint is the last good step's, and its weights are finite.
    let (step, tensors) = final_state(&cfg)?;
    assert!(step < lines.len() as u64);
    for (name, t) in tensors {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    Ok(())
}

#[test]
fn print_config_shows_every_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, _) = small_job(dir.path(), "print", |_| {});
    let out = acrf(BIN, &["train", &job.display().to_string(), "--print-config", "--set", "loss.loss_mode=style"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for key in ["max_grad_norm", "lr_min", "snr_gamma", "jitter_scale", "keep_last", "heartbeat_timeout_s"] {
        assert!(text.contains(key), "{key} missing from --print-config");
    }
    assert!(Config::parse(&text, "printed")?.loss.loss_mode == "style".parse().map_err(anyhow::Error::msg)?);
    Ok(())
}

/// Accumulating G micro-batches of b samples gives the gradient of one batch of G·b samples.
#[test]
fn accumulation_equals_one_large_batch() -> Result<()> {
    use acrf_common::plan::{PlanParams, SlotPlan};
    use acrf_worker::batch::MicroBatch;
    use acrf_worker::lora::{Lora, LoraSpec};
    use acrf_worker::loss::LossFn;
    use acrf_worker::model::{ModelSource, ZImageTransformer};

    let dir = tempfile::tempdir()?;
    let demo = acrf_coordinator::demo::write(dir.path())?;
    let cfg = demo.config;
    let model = ZImageTransformer::load(
        &ModelSource::locate(Path::new(&cfg.model.path), None)?,
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let spec =
        LoraSpec { rank: 4, alpha: 4.0, targets: vec!["to_q".into(), "w2".into()], blocks: vec!["layers".into()] };
    let lora = Lora::init(model.config(), &spec, 3, &Device::Cpu)?;
    for (_, v) in lora.vars() {
        v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu)?)?;
    }
    let data = acrf_worker::data::Dataset::open(BlockingStore::from_url(&cfg.data.path)?)?;
    let bucket = data.manifest().items[0].latent_shape;
    let items: Vec<_> = (0..data.len())
        .filter(|&i| data.manifest().items[i].latent_shape == bucket)
        .take(4)
        .map(|i| data.load_item(i, &Device::Cpu))
        .collect::<Result<_, _>>()?;
    let plan = SlotPlan::new(PlanParams::from_config(&cfg.acrf, 9, 1, 4))?;
    let slots = plan.global_slots(0);
    let loss = LossFn::new(cfg.loss.clone());

    let grads = |parts: &[(usize, usize)]| -> Result<Vec<Tensor>> {
        let mut acc: Option<Vec<Tensor>> = None;
        for &(lo, hi) in parts {
            let mb = MicroBatch::new(
                &slots[lo..hi],
                &items[lo..hi],
                cfg.acrf.snr_gamma,
                candle_core::DType::F32,
                &Device::Cpu,
            )?;
            let mut loss_fn = |outs: &[Tensor]| Ok(loss.step_loss(outs, &mb, 4)?.loss);
            let g = model.forward_backward(
                &mb.x_t,
                &mb.t,
                &mb.captions,
                &lora,
                false,
                &mut loss_fn,
                &mut Stopwatch::new(),
            )?;
            acc = Some(match acc {
                None => g.grads,
                Some(a) => a.iter().zip(&g.grads).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
            });
        }
        acc.context("no parts")
    };
    let one = grads(&[(0, 4)])?;
    let accumulated = grads(&[(0, 2), (2, 4)])?;
    // Relative in the L2 sense: f32 sums over 4 samples at once or 2 + 2 round differently, element by
    // element, at ~1e-7 of the tensor's size.
    for ((name, _), (a, b)) in lora.vars().iter().zip(one.iter().zip(&accumulated)) {
        let norm = a.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let diff = (a - b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!(diff <= 1e-5 * norm, "{name}: accumulated gradient differs by {diff} (norm {norm})");
    }
    Ok(())
}

/// A checkpoint whose blob was truncated, or whose manifest is missing, is never loaded: the run resumes from
/// the one before it and trains the lost steps again to the same weights.
#[test]
fn corrupt_checkpoints_are_never_loaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "corrupt", |c| c.training.max_steps = 12);
    assert!(acrf(BIN, &["train", &job.display().to_string()]).status.success());
    let (_, reference) = final_state(&cfg)?;
    let ckpt = Path::new(&cfg.output).join("runs").join(&cfg.run_name).join("ckpt");

    // Step 12: truncate its LoRA blob. Step 8: remove its manifest. Step 4 is the newest valid one.
    let lora12 = std::fs::read_dir(ckpt.join("0000000012"))?
        .flatten()
        .find(|e| e.path().is_dir())
        .context("blob folder")?
        .path()
        .join("lora.safetensors");
    let bytes = std::fs::read(&lora12)?;
    std::fs::write(&lora12, &bytes[..bytes.len() / 2])?;
    std::fs::remove_file(ckpt.join("0000000008/MANIFEST.json"))?;

    let out = acrf(BIN, &["train", &job.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (step, again) = final_state(&cfg)?;
    assert_eq!(step, 12);
    assert_bitwise_equal(&reference, &again)?;
    assert!(ckpt.join("0000000012/MANIFEST.json.invalid").exists(), "the bad manifest is set aside");
    Ok(())
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { found.extend(files_under(&path)) } else { found.push(path) }
    }
    found
}

/// Issue 20: credentials in `[storage.options]` were copied into every checkpoint's config.toml and printed
/// by `--print-config`. They are redacted there, and nothing the run writes holds them.
#[test]
fn storage_credentials_are_never_written_or_printed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secrets = [("aws_secret_access_key", "s3cr3t-AKIA-value"), ("azure_storage_sas_token", "sv=2026&sig=abc")];
    let (job, cfg) = small_job(dir.path(), "secrets", |c| {
        c.training.max_steps = 4;
        c.training.save_every_n_steps = 2;
        for (key, value) in secrets {
            c.storage.options.insert(key.into(), value.into());
        }
    });
    let job = job.display().to_string();
    let printed = acrf(BIN, &["train", &job, "--print-config"]);
    assert!(printed.status.success(), "{}", stderr(&printed));
    let out = acrf(BIN, &["train", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (key, value) in secrets {
        for (what, text) in [("--print-config", stdout(&printed)), ("the run's output", stdout(&out) + &stderr(&out))] {
            assert!(!text.contains(value), "{what} shows {key}:\n{text}");
        }
        assert!(stdout(&printed).contains(&format!("{key} = \"<redacted>\"")), "{}", stdout(&printed));
    }
    let written = files_under(Path::new(&cfg.output));
    let configs = written.iter().filter(|p| p.ends_with(ckpt::CONFIG)).count();
    assert_eq!(configs, 2, "a config.toml in each checkpoint: {written:?}");
    for file in &written {
        let bytes = std::fs::read(file)?;
        for (key, value) in secrets {
            let found = bytes.windows(value.len()).any(|w| w == value.as_bytes());
            assert!(!found, "{} holds {key}", file.display());
        }
    }
    Ok(())
}

/// Issue 20: `keep_last = 3` pruned checkpoints but not the `<run>-step<N>.safetensors` exported with them, nor
/// a folder under `ckpt/` that a killed writer left without a manifest.
#[test]
fn retention_prunes_step_loras_and_leftover_folders() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "retention", |c| {
        c.training.max_steps = 12;
        c.training.save_every_n_steps = 2;
        c.checkpoint.keep_last = 3;
    });
    let out_dir = Path::new(&cfg.output);
    let ckpt_dir = out_dir.join("runs").join(&cfg.run_name).join("ckpt");
    std::fs::create_dir_all(ckpt_dir.join("0000000001/p1-killed"))?;
    let out = acrf(BIN, &["train", &job.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let names = |dir: &Path| -> Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let loras: Vec<String> = names(out_dir)?.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
    let run = &cfg.run_name;
    let expected = [
        format!("{run}-step00000008.safetensors"),
        format!("{run}-step00000010.safetensors"),
        format!("{run}.safetensors"),
    ];
    assert_eq!(loras, expected);
    assert_eq!(names(&ckpt_dir)?, ["0000000008", "0000000010", "0000000012"]);

    // Issue 20: the LoRA named the base model by the trainer's absolute path; it names its folder or file.
    let bytes = std::fs::read(out_dir.join(format!("{run}.safetensors")))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let base = header.metadata().as_ref().and_then(|m| m.get("acrf.base_model")).cloned();
    let folder = Path::new(&cfg.model.path).file_name().map(|n| n.to_string_lossy().into_owned());
    assert_eq!(base, folder, "the model path was {}", cfg.model.path);
    Ok(())
}

/// Issue 20: a second `acrf train` of a run that is training was refused only at its first checkpoint, after
/// it had rewritten metrics.jsonl (45 lines for 40 steps). It is refused before it writes anything.
#[test]
fn a_second_writer_of_a_run_is_refused_before_it_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let steps = 40;
    let (job, cfg) = small_job(dir.path(), "two", |c| {
        c.training.max_steps = steps;
        c.training.save_every_n_steps = 10;
    });
    let job = job.display().to_string();
    let mut first = acrf_tests::process::Running(
        Command::new(BIN).args(["train", &job]).env("RUST_LOG", "warn").stdout(std::process::Stdio::null()).spawn()?,
    );
    acrf_tests::process::wait_for_step(&cfg, 2, &mut first.0)?;
    let started = Instant::now();
    let second = acrf(BIN, &["train", &job]);
    assert!(!second.status.success(), "the second writer ran: {}", stdout(&second));
    assert!(stderr(&second).contains("is being trained by another acrf process"), "{}", stderr(&second));
    assert!(started.elapsed() < Duration::from_secs(10), "refused only after {:?}", started.elapsed());
    assert!(first.0.try_wait()?.is_none(), "the first run ended before the second was refused: a shorter test");
    assert!(first.0.wait()?.success());
    let steps_logged: Vec<u64> = metrics(&cfg).iter().filter_map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps_logged, (1..=steps).collect::<Vec<_>>());
    Ok(())
}
