//! LoRA files and trainability: our ComfyUI/diffusers layout round-trips, peft and kohya files of the same
//! weights act identically, and nothing but the adapters can change during training.

use std::collections::BTreeMap;
use std::path::Path;

use acrf_tests::zimage::model;
use acrf_worker::lora::{Lora, LoraSpec};
use acrf_worker::model::ZImageTransformer;
use anyhow::{Context, Result};
use candle_core::{D, DType, Device, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

fn batch() -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
    acrf_tests::zimage::batch(&acrf_tests::zimage::tensors("forward.safetensors")?)
}

/// A LoRA on every linear with non-zero B, so that it changes the output.
fn trained_like_lora(model: &ZImageTransformer) -> Result<Lora> {
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"].map(String::from).to_vec(),
        blocks: ["noise_refiner", "context_refiner", "layers"].map(String::from).to_vec(),
    };
    let lora = Lora::init(model.config(), &spec, 7, &Device::Cpu)?;
    for m in lora.modules.values() {
        m.b.set(&Tensor::randn(0f32, 0.05, m.b.shape(), &Device::Cpu)?)?;
    }
    Ok(lora)
}

fn outputs(model: &ZImageTransformer, lora: &Lora) -> Result<Vec<Tensor>> {
    let (x, cap, t) = batch()?;
    Ok(model.forward(&x, &t, &cap, &lora.view(false, 1.0))?)
}

fn write(path: &Path, tensors: BTreeMap<String, Tensor>, meta: Option<BTreeMap<String, String>>) -> Result<()> {
    let views: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let bytes =
        safetensors::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), meta.map(|m| m.into_iter().collect()))?;
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn save_and_load_round_trip_exactly() -> Result<()> {
    let model = model()?;
    let lora = trained_like_lora(&model)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("lora.safetensors");
    let meta = BTreeMap::from([("acrf.base_model".to_string(), "tiny".to_string())]);
    lora.save(&file, &meta)?;

    let raw = candle_core::safetensors::load(&file, &Device::Cpu)?;
    let alpha = &raw["diffusion_model.layers.0.attention.to_q.alpha"];
    assert_eq!(alpha.dims(), &[] as &[usize], "alpha is a 0-dim tensor");
    assert_eq!(alpha.dtype(), DType::F32);
    assert!(raw.contains_key("diffusion_model.layers.0.attention.to_out.0.lora_B.weight"));

    let back = Lora::load(&file, &Device::Cpu)?;
    assert_eq!(back.metadata.get("acrf.base_model").map(String::as_str), Some("tiny"));
    assert_eq!(back.modules.len(), lora.modules.len());
    for ((n1, v1), (n2, v2)) in lora.vars().iter().zip(back.vars()) {
        assert_eq!(n1, &n2);
        let diff = (v1.as_tensor() - v2.as_tensor())?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "{n1} changed in the round trip");
    }
    for (name, m) in &back.modules {
        assert_eq!(m.alpha, lora.modules[name].alpha);
    }
    back.check_against(model.config(), "lora.safetensors")?;
    Ok(())
}

#[test]
fn comfy_peft_and_kohya_files_act_identically() -> Result<()> {
    let model = model()?;
    let lora = trained_like_lora(&model)?;
    let dir = tempfile::tempdir()?;
    let reference = outputs(&model, &lora)?;
    let base = outputs(&model, &Lora { modules: BTreeMap::new(), metadata: BTreeMap::new() })?;

    let comfy = dir.path().join("comfy.safetensors");
    lora.save(&comfy, &BTreeMap::new())?;

    let mut peft = BTreeMap::new();
    let mut kohya = BTreeMap::new();
    for (name, m) in &lora.modules {
        peft.insert(format!("transformer.{name}.lora_A.weight"), m.a.as_tensor().clone());
        peft.insert(format!("transformer.{name}.lora_B.weight"), m.b.as_tensor().clone());
        let flat = format!("lora_unet_{}", name.replace('.', "_"));
        kohya.insert(format!("{flat}.lora_down.weight"), m.a.as_tensor().clone());
        kohya.insert(format!("{flat}.lora_up.weight"), m.b.as_tensor().clone());
        kohya.insert(format!("{flat}.alpha"), Tensor::new(m.alpha as f32, &Device::Cpu)?);
    }
    let peft_file = dir.path().join("peft.safetensors");
    let adapter = serde_json::json!({ "r": 4, "lora_alpha": 8.0 }).to_string();
    write(&peft_file, peft, Some(BTreeMap::from([("lora_adapter_metadata".to_string(), adapter)])))?;
    let kohya_file = dir.path().join("kohya.safetensors");
    write(&kohya_file, kohya, None)?;

    for file in [comfy, peft_file, kohya_file] {
        let loaded = Lora::load(&file, &Device::Cpu).with_context(|| file.display().to_string())?;
        assert_eq!(loaded.modules.len(), lora.modules.len(), "{}", file.display());
        let out = outputs(&model, &loaded)?;
        for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{}: sample {i} differs by {diff}", file.display());
        }
        let moved = (&out[0] - &base[0])?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(moved > 1e-4, "the LoRA changes the output");
        let described = acrf_tests::acrf(BIN, &["inspect", &file.display().to_string()]);
        assert!(described.status.success(), "{}", acrf_tests::stderr(&described));
        let described = acrf_tests::stdout(&described);
        assert!(described.contains("rank 4, alpha 8"), "{described}");
    }
    Ok(())
}

#[test]
fn a_lora_that_does_not_fit_the_model_is_refused() -> Result<()> {
    let model = model()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("wrong.safetensors");
    let a = Tensor::zeros((4, 65), DType::F32, &Device::Cpu)?;
    let b = Tensor::zeros((64, 4), DType::F32, &Device::Cpu)?;
    write(
        &file,
        BTreeMap::from([
            ("diffusion_model.layers.0.attention.to_q.lora_A.weight".to_string(), a),
            ("diffusion_model.layers.0.attention.to_q.lora_B.weight".to_string(), b),
        ]),
        None,
    )?;
    let err =
        Lora::load(&file, &Device::Cpu)?.check_against(model.config(), "wrong.safetensors").unwrap_err().to_string();
    assert!(err.contains("layers.0.attention.to_q") && err.contains("[4, 65]"), "{err}");
    let file = dir.path().join("junk.safetensors");
    std::fs::write(&file, b"not a safetensors file")?;
    let err = Lora::load(&file, &Device::Cpu).err().context("junk loaded")?.to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
    Ok(())
}

/// `acrf inspect` of a file that is not safetensors (a job file, a stub, a header that is not JSON) says so,
/// naming the file, rather than "header too large".
#[test]
fn inspect_says_when_a_file_is_not_safetensors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut not_json = 12u64.to_le_bytes().to_vec();
    not_json.extend_from_slice(b"output = 'x'");
    let cases: [(&str, &[u8], &str); 3] = [
        ("job.toml", b"output = \"out\"\n[model]\npath = \"model\"\n", "its first 8 bytes declare a header of"),
        ("stub.safetensors", b"abc", "it has 3 bytes, fewer than the 8 of a header length"),
        ("toml-inside.safetensors", &not_json, "its header is not JSON"),
    ];
    for (name, bytes, reason) in cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes)?;
        let out = acrf_tests::acrf(BIN, &["inspect", &file.display().to_string()]);
        let err = acrf_tests::stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("{} is not a safetensors file: {reason}", file.display())), "{err}");
        assert!(!err.contains("too large"), "{err}");
    }
    Ok(())
}

/// Only the adapters are trainable: no base tensor is a `Var`, no gradient is ever computed for a linear's
/// weight, and the base model is bit-for-bit unchanged after training steps.
#[test]
fn everything_but_the_adapters_is_frozen() -> Result<()> {
    let model = model()?;
    let lora = trained_like_lora(&model)?;
    let frozen = model.frozen_tensors();
    let expected: usize = model.config().tensor_shapes().len();
    assert_eq!(frozen.len(), expected, "every base tensor is accounted for");
    assert!(frozen.iter().all(|t| !t.is_variable()), "no base tensor is trainable");
    let before: Vec<Tensor> = frozen.iter().map(|t| t.copy()).collect::<candle_core::Result<_>>()?;

    // One sample whose 8×40 latent makes 80 tokens (padded to 96) keeps every 2-D activation (tokens × width,
    // as matmul flattens them) from having a weight's shape by coincidence.
    let (x, cap, t) = batch()?;
    let (x, cap, t) =
        (vec![Tensor::cat(&[&x[0], &x[0], &x[0], &x[0], &x[0]], 3)?], vec![cap[0].clone()], t.narrow(0, 0, 1)?);
    let out = model.forward(&x, &t, &cap, &lora.view(true, 1.0))?;
    let loss = Tensor::stack(&out.iter().map(|o| o.sqr()?.mean_all()).collect::<candle_core::Result<Vec<_>>>()?, 0)?
        .mean(D::Minus1)?;
    let store = loss.backward()?;
    // candle files a weight's gradient under the id of the view the op used (e.g. its transpose), so look
    // for any 2-D gradient shaped like a frozen weight or its transpose; activations here are 3-D or more,
    // and the adapters' shapes differ from every weight's.
    let weight_shapes: std::collections::BTreeSet<Vec<usize>> = frozen
        .iter()
        .filter(|w| w.rank() == 2 && w.dim(0).unwrap_or(1) > 1)
        .flat_map(|w| [w.dims().to_vec(), vec![w.dims()[1], w.dims()[0]]])
        .collect();
    let lora_ids: Vec<_> = lora.vars().iter().map(|(_, v)| v.as_tensor().id()).collect();
    for id in store.get_ids() {
        let g = store.get_id(*id).context("listed id")?;
        if !lora_ids.contains(id) {
            assert!(!weight_shapes.contains(g.dims()), "a weight-sized gradient {:?} was computed", g.dims());
        }
    }
    for (name, v) in lora.vars() {
        assert!(store.get(v.as_tensor()).is_some(), "{name} gets a gradient");
    }

    // An SGD step over `Lora::vars`: whatever the optimizer, it can only reach what that list holds.
    for (name, v) in lora.vars() {
        let g = store.get(v.as_tensor()).context(name)?;
        v.set(&(v.as_tensor() - (g * 0.1)?)?)?;
    }
    for (a, b) in frozen.iter().zip(&before) {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "a base tensor changed");
    }
    Ok(())
}
