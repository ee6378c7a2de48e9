//! Frozen adapters (`model.adapters`): merged into the base at load, never saved, recorded by hash, and a
//! resume with another adapter refused. Real `acrf train` processes on the demo model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use acrf_common::config::{AdapterConfig, Config};
use acrf_tests::{acrf, assert_lora_close, lora_of, losses, small_job, stderr};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// The adapted linears: the noise refiner, which the trained LoRA below leaves alone, and one of the layers.
const ADAPTED: [&str; 3] =
    ["noise_refiner.0.attention.to_q", "noise_refiner.0.feed_forward.w1", "layers.0.attention.to_v"];
const ALPHA: f64 = 2.0;
const RANK: usize = 4;

/// A small LoRA in kohya's layout (`lora_unet_…lora_down/up` + alpha), deterministic in `seed`: (A, B) by module.
fn write_adapter(path: &Path, seed: u64) -> Result<HashMap<String, (Tensor, Tensor)>> {
    let cfg = acrf_coordinator::demo::model_config();
    let shapes: HashMap<String, (usize, usize)> =
        cfg.linear_modules().into_iter().map(|(n, i, o)| (n, (i, o))).collect();
    let mut tensors = HashMap::new();
    let mut pairs = HashMap::new();
    for (k, module) in ADAPTED.iter().enumerate() {
        let (fan_in, fan_out) = shapes[*module];
        let values = |n: usize, salt: u64| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u64 + 1) * (seed * 31 + salt * 7 + k as u64 + 3)) as f32 * 0.618).sin() * 0.2)
                .collect()
        };
        let a = Tensor::from_vec(values(RANK * fan_in, 1), (RANK, fan_in), &Device::Cpu)?;
        let b = Tensor::from_vec(values(fan_out * RANK, 2), (fan_out, RANK), &Device::Cpu)?;
        let kohya = format!("lora_unet_{}", module.replace('.', "_"));
        tensors.insert(format!("{kohya}.lora_down.weight"), a.clone());
        tensors.insert(format!("{kohya}.lora_up.weight"), b.clone());
        tensors.insert(format!("{kohya}.alpha"), Tensor::new(ALPHA as f32, &Device::Cpu)?);
        pairs.insert(module.to_string(), (a, b));
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(pairs)
}

/// A copy of the demo transformer with the adapter merged into its weights by hand, file by file.
fn merge_offline(demo: &Path, pairs: &HashMap<String, (Tensor, Tensor)>, strength: f64) -> Result<PathBuf> {
    let (from, to) = (demo.join("model/transformer"), demo.join("merged-transformer"));
    std::fs::create_dir_all(&to)?;
    for entry in std::fs::read_dir(&from)? {
        let path = entry?.path();
        let name = path.file_name().context("a file name")?.to_owned();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
            for (module, (a, b)) in pairs {
                if let Some(w) = tensors.get_mut(&format!("{module}.weight")) {
                    let delta = (b.matmul(a)? * (ALPHA / RANK as f64 * strength))?;
                    *w = (w.to_dtype(DType::F32)? + delta)?;
                }
            }
            candle_core::safetensors::save(&tensors, to.join(name))?;
        } else {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(to)
}

fn short(c: &mut Config) {
    c.training.max_steps = 4;
    c.training.save_every_n_steps = 0;
    c.lora.blocks = vec![acrf_common::config::LoraBlock::Layers];
}

fn train(job: &Path) {
    let out = acrf(BIN, &["train", &job.display().to_string()]);
    assert!(out.status.success(), "{}: {}", job.display(), stderr(&out));
}

/// The tensor names of the run's exported LoRA file.
fn exported_keys(cfg: &Config) -> Result<Vec<String>> {
    let file = Path::new(&cfg.output).join(format!("{}.safetensors", cfg.run_name));
    let mut keys: Vec<String> = candle_core::safetensors::load(&file, &Device::Cpu)?.into_keys().collect();
    keys.sort();
    Ok(keys)
}

#[test]
fn an_adapter_merged_at_load_trains_like_a_base_merged_offline_and_is_never_saved() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let adapter = dir.path().join("adapter.safetensors");
    let pairs = write_adapter(&adapter, 1)?;
    let (merged_job, merged) = small_job(dir.path(), "merged", |c| {
        short(c);
        c.model.adapters = vec![AdapterConfig { path: adapter.display().to_string(), strength: 0.7, sha256: None }];
    });
    let base = merge_offline(dir.path(), &pairs, 0.7)?;
    let (offline_job, offline) = small_job(dir.path(), "offline", |c| {
        short(c);
        c.model.path = base.display().to_string();
    });
    train(&merged_job);
    train(&offline_job);
    assert_lora_close(&lora_of(&offline)?, &lora_of(&merged)?, 1e-6, "merged at load vs offline")?;
    assert_eq!(losses(&merged).len(), 4);

    // The saved LoRA holds the trained modules only: none of the noise refiner's, which only the adapter has.
    let keys = exported_keys(&merged)?;
    assert_eq!(keys, exported_keys(&offline)?);
    assert!(!keys.is_empty() && keys.iter().all(|k| !k.contains("noise_refiner")), "{keys:?}");

    // The checkpoint's settings name the adapter by content: another file at the same path is refused.
    write_adapter(&adapter, 2)?;
    let out = acrf(BIN, &["train", &merged_job.display().to_string()]);
    assert!(!out.status.success(), "a resume with another adapter must be refused");
    assert!(stderr(&out).contains("model.adapters"), "{}", stderr(&out));
    Ok(())
}

#[test]
fn a_zero_strength_adapter_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let adapter = dir.path().join("adapter.safetensors");
    write_adapter(&adapter, 3)?;
    let (plain_job, plain) = small_job(dir.path(), "plain", short);
    let (zero_job, zero) = small_job(dir.path(), "zero", |c| {
        short(c);
        c.model.adapters = vec![AdapterConfig { path: adapter.display().to_string(), strength: 0.0, sha256: None }];
    });
    train(&plain_job);
    train(&zero_job);
    assert_lora_close(&lora_of(&plain)?, &lora_of(&zero)?, 0.0, "strength 0")?;
    assert_eq!(losses(&plain), losses(&zero));
    Ok(())
}

#[test]
fn samples_on_the_merged_base_with_the_adapters_cancelled_are_the_plain_bases() -> Result<()> {
    use acrf_worker::adapters::Merged;
    use acrf_worker::lora::{Lora, LoraSpec};
    use acrf_worker::model::{ModelSource, ZImageTransformer};
    use acrf_worker::sample::{SampleSettings, Sampler};

    let dir = tempfile::tempdir()?;
    small_job(dir.path(), "demo", short);
    let adapter = dir.path().join("adapter.safetensors");
    write_adapter(&adapter, 4)?;
    let (pipeline, cpu) = (dir.path().join("model"), Device::Cpu);
    let source = ModelSource::locate(&pipeline, None)?;
    let adapters = [AdapterConfig { path: adapter.display().to_string(), strength: 0.7, sha256: None }];
    let merged_in = Merged::load(&adapters, &source.config, &cpu)?;
    let merged = ZImageTransformer::load_merged(&source, DType::F32, &cpu, merged_in.deltas()?)?;
    let plain = ZImageTransformer::load(&source, DType::F32, &cpu)?;
    let spec = LoraSpec {
        rank: 2,
        alpha: 2.0,
        targets: vec!["to_q".into(), "to_v".into()],
        blocks: vec!["noise_refiner".into(), "layers".into()],
    };
    let lora = Lora::init(&source.config, &spec, 7, &cpu)?;
    for m in lora.modules.values() {
        m.b.set(&Tensor::full(0.05f32, m.b.dims(), &cpu)?)?;
    }
    let settings = SampleSettings { steps: 3, seed: 1, width: 32, height: 32 };
    let sampler = Sampler::new(&pipeline, &["a red disc".into()], 64, settings, DType::F32, &cpu)?;
    let latent =
        |model: &ZImageTransformer, view| -> Result<Tensor> { Ok(sampler.latent(model, &view, 0, 3, &mut |_, _| {})?) };
    let want = latent(&plain, lora.view(false, 1.0))?;
    let max_diff = |t: &Tensor| -> Result<f32> { Ok((t - &want)?.abs()?.max_all()?.to_scalar::<f32>()?) };
    let cancelled = max_diff(&latent(&merged, merged_in.cancel(&lora, 1.0)?)?)?;
    let with_adapters = max_diff(&latent(&merged, lora.view(false, 1.0))?)?;
    assert!(cancelled < 1e-4, "the merged base with the adapters cancelled is off by {cancelled}");
    assert!(with_adapters > 1e-3, "the adapter changes the render by only {with_adapters}");
    Ok(())
}
