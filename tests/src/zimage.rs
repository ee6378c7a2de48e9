//! The tiny Z-Image fixture as the parity tests read it (`ACRF_ZIMAGE_FIXTURE`, default the copy in
//! `fixtures/zimage-tiny`): config, weights, recorded batches and the peft LoRA case. Everything about the
//! fixture comes from its files, so the same tests run on other fixtures of the format.

use std::collections::BTreeMap;
use std::path::PathBuf;

use acrf_worker::lora::Lora;
use acrf_worker::model::{ModelSource, ZImageConfig, ZImageTransformer};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::fixture_dir;

pub fn dir() -> PathBuf {
    fixture_dir("ACRF_ZIMAGE_FIXTURE", "zimage-tiny")
}

pub fn source() -> Result<ModelSource> {
    let dir = dir();
    let config = ZImageConfig::from_json(&std::fs::read_to_string(dir.join("config.json"))?, "config.json")?;
    Ok(ModelSource { config, files: vec![dir.join("transformer.safetensors")], comfy: false })
}

/// The fixture transformer in f32 on the CPU.
pub fn model() -> Result<ZImageTransformer> {
    Ok(ZImageTransformer::load(&source()?, DType::F32, &Device::Cpu)?)
}

/// The tensors of the fixture file `name`, by name.
pub fn tensors(name: &str) -> Result<BTreeMap<String, Tensor>> {
    let path = dir().join(name);
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| path.display().to_string())?
        .into_iter()
        .collect())
}

/// The pieces `<prefix>.0`, `<prefix>.1`, … of a recorded batch, as many as the file holds samples.
pub fn samples(t: &BTreeMap<String, Tensor>, prefix: &str) -> Result<Vec<Tensor>> {
    let n = (0..).take_while(|i| t.contains_key(&format!("x.{i}"))).count();
    if n == 0 {
        bail!("fixture has no samples x.0 ...");
    }
    (0..n).map(|i| t.get(&format!("{prefix}.{i}")).cloned().with_context(|| format!("no {prefix}.{i}"))).collect()
}

/// A recorded batch: latents, captions and model times.
pub fn batch(t: &BTreeMap<String, Tensor>) -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
    Ok((samples(t, "x")?, samples(t, "cap")?, t.get("t").cloned().context("no t")?))
}

/// The fixture LoRA (peft keys, no alpha tensors) with the rank and alpha of `meta.json`, and that file.
pub fn lora() -> Result<(Lora, serde_json::Value)> {
    let dir = dir();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json"))?)?;
    let alpha = meta["alpha"].as_f64().context("meta.json: alpha")?;
    let rank = meta["rank"].as_u64().context("meta.json: rank")? as usize;
    let mut lora = Lora::load(&dir.join("lora.safetensors"), &Device::Cpu)?;
    for (name, m) in lora.modules.iter_mut() {
        if m.rank() != rank {
            bail!("{name}: rank {} but meta.json says {rank}", m.rank());
        }
        m.alpha = alpha;
    }
    Ok((lora, meta))
}
