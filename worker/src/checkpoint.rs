//! What a training checkpoint holds, as named blobs for the commit protocol of `acrf_common::checkpoint`:
//! the LoRA (in the ComfyUI layout, so any checkpoint is also a usable LoRA file), AdamW's moments and step,
//! the training state and the effective config. Together with the step, which fixes every plan, order and
//! noise, they make a resumed run continue bit for bit.

use std::collections::BTreeMap;

use acrf_common::config::Config;
use bytes::Bytes;
use candle_core::{Device, Tensor};

use crate::lora::Lora;
use crate::optim::AdamWState;
use crate::train::{TrainError, TrainState, Trainer};

pub const LORA: &str = "lora.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";
pub const CONFIG: &str = "config.toml";

/// A checkpoint as read back.
pub struct Restored {
    pub lora: Lora,
    pub optimizer: AdamWState,
    pub state: TrainState,
    pub config: Config,
}

/// Metadata that makes a LoRA file self-describing in ComfyUI, diffusers and `acrf inspect`.
pub fn lora_metadata(cfg: &Config, step: u64) -> BTreeMap<String, String> {
    let targets: Vec<&str> = cfg.lora.target_modules().iter().map(|t| t.name()).collect();
    BTreeMap::from([
        ("acrf.trainer".into(), format!("acrf {}", env!("CARGO_PKG_VERSION"))),
        ("acrf.base_model".into(), cfg.model.path.clone()),
        ("acrf.rank".into(), cfg.lora.network_dim.to_string()),
        ("acrf.alpha".into(), cfg.lora.network_alpha.to_string()),
        ("acrf.targets".into(), targets.join(",")),
        ("acrf.step".into(), step.to_string()),
        ("acrf.loss_mode".into(), cfg.loss.loss_mode.name().into()),
        ("acrf.turbo_steps".into(), cfg.acrf.turbo_steps.to_string()),
        ("acrf.shift".into(), cfg.acrf.shift.to_string()),
        ("acrf.jitter_scale".into(), cfg.acrf.jitter_scale.to_string()),
        ("acrf.snr_gamma".into(), cfg.acrf.snr_gamma.to_string()),
        ("acrf.timestep_sampling".into(), format!("{:?}", cfg.acrf.timestep_sampling).to_lowercase()),
    ])
}

/// The blobs of `trainer`'s current state.
pub fn snapshot(trainer: &Trainer) -> Result<Vec<(&'static str, Bytes)>, TrainError> {
    let cfg = trainer.config();
    let state = trainer.state();
    let lora = trainer.lora.to_bytes(&lora_metadata(cfg, state.step))?;
    let opt = trainer.optimizer().state();
    let tensors: Vec<(String, Tensor)> =
        opt.tensors.iter().map(|(n, t)| t.to_device(&Device::Cpu).map(|t| (n.clone(), t))).collect::<Result<_, _>>()?;
    let meta = std::collections::HashMap::from([("step".to_string(), opt.step.to_string())]);
    let optimizer = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| TrainError::Setup(format!("serialising the optimizer state: {e}")))?;
    let config = cfg.to_toml_string().map_err(|e| TrainError::Setup(e.to_string()))?;
    Ok(vec![
        (LORA, Bytes::from(lora)),
        (OPTIMIZER, Bytes::from(optimizer)),
        (STATE, Bytes::from(serde_json::to_vec_pretty(&state).expect("state serialises"))),
        (CONFIG, Bytes::from(config)),
    ])
}

/// Reads back the blobs of a committed checkpoint.
pub fn read(blobs: &BTreeMap<String, Bytes>, origin: &str, device: &Device) -> Result<Restored, TrainError> {
    let blob =
        |name: &str| blobs.get(name).ok_or_else(|| TrainError::Setup(format!("checkpoint {origin} has no {name}")));
    let bad = |name: &str, e: String| TrainError::Setup(format!("checkpoint {origin}: {name}: {e}"));
    let lora = Lora::from_bytes(blob(LORA)?, &format!("{origin}/{LORA}"), device)?;
    let opt_bytes = blob(OPTIMIZER)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(opt_bytes).map_err(|e| bad(OPTIMIZER, e.to_string()))?;
    let step = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(OPTIMIZER, "no step in its metadata".into()))?;
    let tensors = candle_core::safetensors::load_buffer(opt_bytes, device)?.into_iter().collect();
    let state = serde_json::from_slice(blob(STATE)?).map_err(|e| bad(STATE, e.to_string()))?;
    let text = std::str::from_utf8(blob(CONFIG)?).map_err(|e| bad(CONFIG, e.to_string()))?;
    let config = Config::parse(text, &format!("{origin}/{CONFIG}")).map_err(|e| bad(CONFIG, e.to_string()))?;
    Ok(Restored { lora, optimizer: AdamWState { step, tensors }, state, config })
}
