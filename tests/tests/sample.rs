//! Sample images: `acrf sample` with and without a LoRA, byte-for-byte reproducibility, and the samples a
//! training run renders, which `acrf sample` reproduces from the run's LoRA file.

use std::path::Path;

use acrf_common::store::BlockingStore;
use acrf_tests::{acrf, small_job, stderr};
use acrf_worker::lora::{Lora, LoraSpec};
use acrf_worker::model::ModelSource;
use anyhow::Result;
use candle_core::{Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");
const PROMPT: &str = "a red disc";

/// `acrf sample` of the demo model at 64x64 in 3 steps with seed 5 (unless `extra` gives one); returns the PNG's
/// bytes.
fn sample(dir: &Path, name: &str, extra: &[&str]) -> Result<Vec<u8>> {
    let out = dir.join(format!("{name}.png"));
    let model = dir.join("model").display().to_string();
    let mut args = vec!["sample", "--model", &model, "--prompt", PROMPT, "--steps", "3"];
    if !extra.contains(&"--seed") {
        args.extend(["--seed", "5"]);
    }
    args.extend(["--width", "64", "--height", "64"]);
    args.extend(extra);
    let out_arg = out.display().to_string();
    args.extend(["--out", &out_arg]);
    let o = acrf(BIN, &args);
    assert!(o.status.success(), "acrf sample {extra:?}: {}", stderr(&o));
    Ok(std::fs::read(out)?)
}

#[test]
fn a_zero_lora_is_the_base_model_and_a_seed_gives_the_same_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    acrf_coordinator::demo::write(dir.path())?;
    let model = ModelSource::locate(&dir.path().join("model"), None)?;
    let spec = LoraSpec {
        rank: 4,
        alpha: 4.0,
        targets: vec!["to_q".into(), "to_v".into(), "w2".into()],
        blocks: vec!["layers".into(), "noise_refiner".into()],
    };
    let lora = Lora::init(&model.config, &spec, 3, &Device::Cpu)?;
    let zero = dir.path().join("zero.safetensors");
    lora.save(&zero, &Default::default())?;
    for (_, v) in lora.vars() {
        v.set(&(Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu)? * 0.5)?)?;
    }
    let trained = dir.path().join("trained.safetensors");
    lora.save(&trained, &Default::default())?;

    let base = sample(dir.path(), "base", &[])?;
    let image = image::load_from_memory(&base)?;
    assert_eq!((image.width(), image.height()), (64, 64));
    let with_zero = sample(dir.path(), "zero", &["--lora", &zero.display().to_string()])?;
    assert!(with_zero == base, "a LoRA whose B is zero changed the image");
    let with_lora = sample(dir.path(), "lora", &["--lora", &trained.display().to_string()])?;
    assert!(with_lora != base, "a non-zero LoRA left the image unchanged");
    let again = sample(dir.path(), "again", &["--lora", &trained.display().to_string()])?;
    assert!(again == with_lora, "the same seed gave other bytes");
    let none = sample(dir.path(), "none", &["--lora", &trained.display().to_string(), "--strength", "0"])?;
    assert!(none == base, "strength 0 is the base model");
    let other_seed = sample(dir.path(), "seed", &["--seed", "6"])?;
    assert!(other_seed != base, "another seed gave the same image");
    Ok(())
}

/// A strength that is not a finite number in [-10, 10] (NaN gave a black image with exit status 0) and an
/// output folder that does not exist are refused (exit 2) before the model is loaded or a step rendered; a
/// render says how far it is after each step and where it wrote the PNG.
#[test]
fn bad_flags_are_refused_before_rendering_and_a_render_reports_progress() -> Result<()> {
    let dir = tempfile::tempdir()?;
    acrf_coordinator::demo::write(dir.path())?;
    let model = dir.path().join("model").display().to_string();
    let out = dir.path().join("cat.png").display().to_string();
    let base = ["sample", "--model", &model, "--prompt", PROMPT, "--steps", "3", "--width", "64", "--height", "64"];
    let missing = dir.path().join("no-such-folder/cat.png").display().to_string();
    for (extra, says) in [
        (["--strength", "nan", "--out", &out], "--strength NaN: must be a finite number in [-10, 10]"),
        (["--strength", "1e30", "--out", &out], "--strength 1000000000000000000000000000000: must be a finite"),
        (["--strength", "-11", "--out", &out], "--strength -11: must be"),
        (["--strength", "1", "--out", &missing], "the folder"),
    ] {
        let o = acrf(BIN, &[&base[..], &extra[..]].concat());
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says) && !err.contains("sampling: step"), "{extra:?}: {err}");
    }
    assert!(!Path::new(&out).exists());

    let o = acrf(BIN, &[&base[..], &["--strength", "-10", "--out", &out]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let steps: Vec<&str> = err.lines().filter(|l| l.starts_with("sampling: step")).map(|l| &l[..17]).collect();
    assert_eq!(steps, ["sampling: step 1/", "sampling: step 2/", "sampling: step 3/"], "{err}");
    assert_eq!(acrf_tests::stdout(&o).trim(), format!("wrote {out}"));
    assert!(image::load_from_memory(&std::fs::read(&out)?).is_ok());
    Ok(())
}

#[test]
fn training_renders_samples_that_acrf_sample_reproduces() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job, cfg) = small_job(dir.path(), "samples", |c| {
        c.training.max_steps = 6;
        c.training.save_every_n_steps = 3;
        c.sample.prompts = vec![PROMPT.into(), "blue stripes".into()];
        c.sample.every_n_steps = 4;
        c.sample.steps = 3;
        c.sample.seed = 5;
        c.sample.width = 64;
        c.sample.height = 64;
    });
    let out = acrf(BIN, &["train", &job.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let samples = Path::new(&cfg.output).join("runs").join(&cfg.run_name).join("samples");
    let mut names: Vec<String> =
        std::fs::read_dir(&samples)?.filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string())).collect();
    names.sort();
    // Every 4 steps and at the end, every prompt.
    assert_eq!(
        names,
        ["prompts.json", "step00000004-0.png", "step00000004-1.png", "step00000006-0.png", "step00000006-1.png"]
    );
    let prompts: Vec<String> = serde_json::from_slice(&std::fs::read(samples.join("prompts.json"))?)?;
    assert_eq!(prompts, cfg.sample.prompts);
    assert!(std::fs::read(samples.join("step00000004-0.png"))? != std::fs::read(samples.join("step00000006-0.png"))?);

    // The final sample is what `acrf sample` makes of the exported LoRA with the same settings.
    let lora = Path::new(&cfg.output).join(format!("{}.safetensors", cfg.run_name));
    let again = sample(dir.path(), "final", &["--lora", &lora.display().to_string()])?;
    assert!(again == std::fs::read(samples.join("step00000006-0.png"))?, "acrf sample differs from the run's sample");
    Ok(())
}

#[test]
fn samples_and_the_report_of_a_run_on_an_object_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, mut cfg) = small_job(dir.path(), "remote", |c| {
        c.training.max_steps = 2;
        c.sample.prompts = vec![PROMPT.into()];
        c.sample.every_n_steps = 1;
        c.sample.steps = 2;
        c.sample.width = 32;
        c.sample.height = 32;
        c.status.listen = String::new();
    });
    cfg.output = "memory://sample-test/out".into();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    acrf_coordinator::job::train_here(&cfg, &Device::Cpu, acrf_worker::checkpoint::ResumeRequest::CONFIG, stop)?;
    let run = BlockingStore::from_url(&format!("{}/runs/{}", cfg.output, cfg.run_name))?;
    let mut samples: Vec<String> = run.list("samples")?.into_iter().map(|(name, _)| name).collect();
    samples.sort();
    assert_eq!(samples, ["samples/prompts.json", "samples/step00000001-0.png", "samples/step00000002-0.png"]);
    let png = image::load_from_memory(&run.get("samples/step00000002-0.png")?)?;
    assert_eq!((png.width(), png.height()), (32, 32));

    // The report reads the same store (in this process, since a memory:// store lives in it).
    let out = dir.path().join("report");
    let page = acrf_coordinator::report::write(run.url(), Some(&out))?;
    let html = std::fs::read_to_string(page)?;
    assert!(html.contains("alt=\"demo step 2, prompt 0\""), "the report has no final sample");
    assert!(html.contains("<td>2</td>"), "the report has no 2-step row");
    Ok(())
}
