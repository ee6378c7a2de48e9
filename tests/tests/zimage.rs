//! The transformer and its LoRA against diffusers + peft (spec §6), driven by the fixture directory alone
//! (`ACRF_ZIMAGE_FIXTURE`, default the copy in `fixtures/zimage-tiny`): config, sample count, shapes, LoRA
//! rank, alpha and targets all come from the files, so the same tests run on other fixtures of the format.

use std::collections::BTreeMap;

use acrf_tests::zimage::{batch, lora as fixture_lora, model, source, tensors};
use acrf_worker::lora::LoraView;
use acrf_worker::model::{ModelSource, ZImageTransformer};
use acrf_worker::timing::Stopwatch;
use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

fn max_abs(a: &Tensor) -> Result<f64> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

#[test]
fn forward_matches_diffusers() -> Result<()> {
    let model = model()?;
    let fx = tensors("forward.safetensors")?;
    let (x, cap, t) = batch(&fx)?;
    let out = model.forward(&x, &t, &cap, &LoraView::none())?;
    for (i, o) in out.iter().enumerate() {
        let expected = &fx[&format!("out.{i}")];
        assert_eq!(o.dims(), expected.dims(), "sample {i}");
        let err = max_abs_diff(o, expected)?;
        println!("sample {i} {:?}: max |out − diffusers| = {err:.3e}", o.dims());
        assert!(err <= 1e-4, "sample {i}: max abs error {err:e} > 1e-4");
    }
    Ok(())
}

/// Each sample alone gives the same output as in the padded, masked batch.
#[test]
fn batch_padding_is_invisible() -> Result<()> {
    let model = model()?;
    let (x, cap, t) = batch(&tensors("forward.safetensors")?)?;
    let together = model.forward(&x, &t, &cap, &LoraView::none())?;
    for i in 0..x.len() {
        let alone = model.forward(&x[i..=i], &t.narrow(0, i, 1)?, &cap[i..=i], &LoraView::none())?;
        let err = max_abs_diff(&alone[0], &together[i])?;
        assert!(err <= 1e-5, "sample {i}: alone vs batched differ by {err:e}");
    }
    Ok(())
}

fn lora_loss(outs: &[Tensor], targets: &[Tensor]) -> candle_core::Result<Tensor> {
    let per_sample =
        outs.iter().zip(targets).map(|(o, t)| (o - t)?.sqr()?.mean_all()).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&per_sample, 0)?.mean(D::Minus1)
}

#[test]
fn lora_loss_and_gradients_match_peft() -> Result<()> {
    let model = model()?;
    let (lora, meta) = fixture_lora()?;
    let fx = tensors("lora_case.safetensors")?;
    let (x, cap, t) = batch(&fx)?;
    let targets: Vec<Tensor> = (0..x.len()).map(|i| fx[&format!("target.{i}")].clone()).collect();

    let targets_in_meta: Vec<&str> =
        meta["lora_targets"].as_array().context("lora_targets")?.iter().filter_map(|v| v.as_str()).collect();
    for name in lora.modules.keys() {
        assert!(targets_in_meta.iter().any(|t| name.ends_with(&format!(".{t}"))), "{name} not a meta target");
    }

    let out = model.forward(&x, &t, &cap, &lora.view(false, 1.0))?;
    for (i, o) in out.iter().enumerate() {
        let err = max_abs_diff(o, &fx[&format!("out.{i}")])?;
        assert!(err <= 1e-4, "sample {i} with LoRA: max abs error {err:e}");
    }

    let g =
        model.forward_backward(&x, &t, &cap, &lora, false, &mut |o| lora_loss(o, &targets), &mut Stopwatch::new())?;
    let loss = g.loss.to_scalar::<f32>()? as f64;
    let ref_loss = fx["loss"].flatten_all()?.to_vec1::<f32>()?[0] as f64;
    println!("loss {loss:.8} vs peft {ref_loss:.8}");
    assert!(((loss - ref_loss) / ref_loss).abs() <= 1e-3, "loss {loss} vs {ref_loss}");

    let mut worst = 0f64;
    for ((name, _), grad) in lora.vars().iter().zip(&g.grads) {
        let key = format!(
            "grad.{}",
            name.replace(".lora_A.weight", ".lora_A.default.weight")
                .replace(".lora_B.weight", ".lora_B.default.weight")
        );
        let expected = fx.get(&key).with_context(|| format!("{key} missing from lora_case.safetensors"))?;
        let rel = max_abs_diff(grad, expected)? / max_abs(expected)?.max(f64::MIN_POSITIVE);
        worst = worst.max(rel);
        assert!(rel <= 1e-3, "{name}: gradient error {rel:e} (relative to its largest magnitude)");
    }
    let expected_count = fx.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(g.grads.len(), expected_count, "every LoRA gradient of the fixture is checked");
    println!("{} LoRA gradients, worst relative error {worst:.3e}", g.grads.len());
    Ok(())
}

#[test]
fn checkpointing_gives_the_same_gradients() -> Result<()> {
    let model = model()?;
    let (lora, _) = fixture_lora()?;
    let fx = tensors("lora_case.safetensors")?;
    let (x, cap, t) = batch(&fx)?;
    let targets: Vec<Tensor> = (0..x.len()).map(|i| fx[&format!("target.{i}")].clone()).collect();
    let plain =
        model.forward_backward(&x, &t, &cap, &lora, false, &mut |o| lora_loss(o, &targets), &mut Stopwatch::new())?;
    let ckpt =
        model.forward_backward(&x, &t, &cap, &lora, true, &mut |o| lora_loss(o, &targets), &mut Stopwatch::new())?;
    assert_eq!(plain.loss.to_scalar::<f32>()?, ckpt.loss.to_scalar::<f32>()?);
    for ((name, _), (a, b)) in lora.vars().iter().zip(plain.grads.iter().zip(&ckpt.grads)) {
        let rel = max_abs_diff(a, b)? / max_abs(a)?.max(f64::MIN_POSITIVE);
        assert!(rel <= 1e-5, "{name}: checkpointed gradient differs by {rel:e}");
    }
    Ok(())
}

fn fixture_weights() -> Result<BTreeMap<String, Tensor>> {
    tensors("transformer.safetensors")
}

fn forward_of(model: &ZImageTransformer, lora: &LoraView) -> Result<Vec<Tensor>> {
    let (x, cap, t) = batch(&tensors("forward.safetensors")?)?;
    Ok(model.forward(&x, &t, &cap, lora)?)
}

fn assert_same(a: &[Tensor], b: &[Tensor], what: &str) -> Result<()> {
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        let err = max_abs_diff(a, b)?;
        assert!(err == 0.0, "{what}: sample {i} differs by {err:e}");
    }
    Ok(())
}

#[test]
fn diffusers_folder_and_comfy_file_load_the_same_model() -> Result<()> {
    let src = source()?;
    let reference = forward_of(&model()?, &LoraView::none())?;
    let weights = fixture_weights()?;
    let dir = tempfile::tempdir()?;

    let pipeline = dir.path().join("pipeline");
    acrf_worker::model::write_diffusers_folder(&pipeline.join("transformer"), &src.config, &weights, 200_000)?;
    let shards = std::fs::read_dir(pipeline.join("transformer"))?.count();
    assert!(shards > 3, "the weights were split into shards ({shards} files)");
    let found = ModelSource::locate(&pipeline, None)?;
    assert!(!found.comfy && found.files.len() > 1);
    assert_same(
        &reference,
        &forward_of(&ZImageTransformer::load(&found, DType::F32, &Device::Cpu)?, &LoraView::none())?,
        "diffusers folder",
    )?;

    let single = dir.path().join("z_image_comfy.safetensors");
    acrf_worker::model::write_comfy_file(&weights, &src.config, &single)?;
    let names = candle_core::safetensors::load(&single, &Device::Cpu)?;
    assert!(names.contains_key("layers.0.attention.qkv.weight") && names.contains_key("x_embedder.weight"));
    let found = ModelSource::locate(&single, Some(&acrf_tests::zimage::dir().join("config.json")))?;
    assert!(found.comfy);
    assert_same(
        &reference,
        &forward_of(&ZImageTransformer::load(&found, DType::F32, &Device::Cpu)?, &LoraView::none())?,
        "ComfyUI file",
    )?;
    Ok(())
}

#[test]
fn half_precision_weights_load_and_run() -> Result<()> {
    let reference = forward_of(&model()?, &LoraView::none())?;
    for dtype in [DType::BF16, DType::F16] {
        let m = ZImageTransformer::load(&source()?, dtype, &Device::Cpu)?;
        let out = forward_of(&m, &LoraView::none())?;
        for (a, b) in out.iter().zip(&reference) {
            let rel = max_abs_diff(&a.to_dtype(DType::F32)?, b)? / max_abs(b)?;
            assert!(rel < 0.05, "{dtype:?}: relative error {rel}");
        }
    }
    Ok(())
}

/// Copies the fixture model with `edit` applied to its tensors, then loads it.
fn load_edited(edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> Result<String> {
    let mut weights = fixture_weights()?;
    edit(&mut weights);
    let dir = tempfile::tempdir()?;
    acrf_worker::model::write_diffusers_folder(dir.path(), &source()?.config, &weights, usize::MAX)?;
    match ZImageTransformer::load(&ModelSource::locate(dir.path(), None)?, DType::F32, &Device::Cpu) {
        Ok(_) => bail!("the edited model loaded"),
        Err(e) => Ok(e.to_string()),
    }
}

#[test]
fn bad_weights_give_one_clear_error() -> Result<()> {
    let missing = load_edited(|w| {
        w.remove("layers.1.attention.to_v.weight");
    })?;
    assert!(missing.contains("layers.1.attention.to_v.weight") && missing.contains("missing"), "{missing}");

    let misshaped = load_edited(|w| {
        w.insert("layers.0.feed_forward.w2.weight".into(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap());
    })?;
    assert!(misshaped.contains("layers.0.feed_forward.w2.weight") && misshaped.contains("[3, 5]"), "{misshaped}");
    assert!(misshaped.contains("[64, 170]") || misshaped.contains("expects"), "{misshaped}");

    let extra = load_edited(|w| {
        w.insert("layers.9.attention.to_q.weight".into(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap());
    })?;
    assert!(extra.contains("layers.9.attention.to_q.weight") && extra.contains("not part of the model"), "{extra}");

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("truncated.safetensors");
    let bytes = std::fs::read(acrf_tests::zimage::dir().join("transformer.safetensors"))?;
    std::fs::write(&file, &bytes[..bytes.len() / 2])?;
    let err = match ModelSource::locate(&file, Some(&acrf_tests::zimage::dir().join("config.json")))
        .and_then(|s| ZImageTransformer::load(&s, DType::F32, &Device::Cpu))
    {
        Ok(_) => bail!("a truncated file loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("truncated.safetensors"), "{err}");
    println!("{missing}\n{misshaped}\n{extra}\n{err}");
    Ok(())
}

#[test]
fn turbo_sampling_matches_the_pipeline() -> Result<()> {
    let model = model()?;
    let fx = tensors("sample_case.safetensors")?;
    let steps = fx["timesteps"].dim(0)?;
    let sigmas: Vec<f32> = fx["sigmas"].to_vec1()?;
    // The shift is not stored; recover it from the second sigma, s_k(1 − 1/N), to the f32 precision of σ.
    let (u, s) = (1.0 - 1.0 / steps as f64, sigmas[1] as f64);
    let shift = (s * (1.0 - u) / (u * (1.0 - s)) * 1e4).round() / 1e4;
    assert_eq!(acrf_worker::sample::pipeline_sigmas(steps, shift), sigmas, "sigmas bit for bit");
    let latent = acrf_worker::sample::sample_latent(
        &model,
        &fx["noise"],
        &fx["cap"],
        steps,
        shift,
        &LoraView::none(),
        &mut |_, _| {},
    )?;
    let err = max_abs_diff(&latent, &fx["latents"])?;
    println!("{steps} steps, shift {shift:.4}: max |latent − pipeline| = {err:.3e}");
    assert!(err <= 1e-4, "sampled latent differs by {err:e}");
    Ok(())
}
