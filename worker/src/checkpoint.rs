//! The one owner of a run's checkpoints (in the shape of torchtitan's CheckpointManager): when one is due,
//! what it holds and how it is saved next to the LoRA file a user takes away, and where a run continues from —
//! with the same refusals on every path (one process, a group, a worker).
//!
//! A checkpoint is a set of named blobs for the commit protocol of `acrf_common::checkpoint`: the LoRA (in the
//! ComfyUI layout, so any checkpoint is also a usable LoRA file), AdamW's moments and step, the training
//! state and the effective config. Its manifest records the settings' hash and the [`RunFacts`] a resume
//! decides with — above all the run's global batch, fixed when it started — so that the coordinator decides
//! without reading a tensor. Together with the step, which fixes every plan, order and noise, they make a
//! resumed run continue bit for bit, whatever the number of ranks it continues on.

use std::collections::BTreeMap;

use acrf_common::checkpoint::{CheckpointError, Checkpoints};
use acrf_common::config::{Config, Resume};
use acrf_common::store::BlockingStore;
use bytes::Bytes;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub(crate) mod error;

pub use error::{ResumeError, SaveError};

use crate::lora::Lora;
use crate::optim::AdamWState;
use crate::train::{Restored, Trainer};

pub const LORA: &str = "lora.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "state.json";
pub const CONFIG: &str = "config.toml";

/// The settings `--extend` may change: the length of the run, and with it the LR schedule's horizon.
const LENGTH_KEYS: [&str; 2] = ["training.epochs", "training.max_steps"];

/// What a checkpoint's manifest records about its run beyond the step, so that a resume decides without
/// reading a blob.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunFacts {
    pub epoch: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// M, the global micro-batches per step: fixed when the run started, kept by every resume and every
    /// re-formed group whatever its size.
    pub micro_batches: usize,
}

/// Which checkpoint to continue from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// `checkpoint.resume` decides: the newest valid one under "auto", none under "never".
    Config,
    /// `--resume STEP`.
    Step(u64),
}

/// How a run asks to continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeRequest {
    pub from: ResumeFrom,
    /// `--extend`: the job may be longer than the checkpoint's run (and must go past its step).
    pub extend: bool,
}

impl ResumeRequest {
    /// What `checkpoint.resume` says, with no flag.
    pub const CONFIG: ResumeRequest = ResumeRequest { from: ResumeFrom::Config, extend: false };
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// From scratch: the first formation fixes the global batch (its ranks × `gradient_accumulation`).
    Fresh,
    /// From the checkpoint of `step`, keeping its global batch.
    Resume { step: u64, micro_batches: usize },
    /// The newest checkpoint is this job's last step: there is nothing to train.
    Finished { step: u64, lora_url: String },
}

/// The checkpoints of one run, and the LoRA files exported next to them.
pub struct Checkpointer {
    cfg: Config,
    checkpoints: Checkpoints,
    /// The output root; LoRA files go to `<run>-step<N>.safetensors` and `<run>.safetensors`.
    exports: BlockingStore,
}

impl Checkpointer {
    /// The checkpoints of `cfg`'s run under its output; `writer` names this process in what it commits.
    pub fn new(cfg: &Config, writer: &str) -> Result<Checkpointer, ResumeError> {
        let exports = BlockingStore::for_job(&cfg.output, &cfg.storage).map_err(CheckpointError::from)?;
        let checkpoints = Checkpoints::new(&exports, &cfg.run_name, writer)?;
        Ok(Checkpointer { cfg: cfg.clone(), checkpoints, exports })
    }

    /// The run folder, `runs/<run_name>` under the output: checkpoints, metrics, samples.
    pub fn run_folder(&self) -> &BlockingStore {
        self.checkpoints.root()
    }

    /// Decides where the run starts: the checkpoint `req` and `checkpoint.resume` select, refused (naming the
    /// keys) when it was trained with other settings — except a longer run under `--extend`, whose LR
    /// schedule then spans the new length from its first step on.
    pub fn start(&self, req: ResumeRequest) -> Result<Start, ResumeError> {
        let (run, url) = (self.cfg.run_name.clone(), self.run_folder().url().to_string());
        let found = match (req.from, self.cfg.checkpoint.resume) {
            (ResumeFrom::Step(step), _) => {
                let newer: Vec<u64> = self.checkpoints.committed_steps()?.into_iter().filter(|&s| s > step).collect();
                if !newer.is_empty() {
                    return Err(ResumeError::Newer { run, step, newer, url });
                }
                Some(self.checkpoints.load(step)?)
            }
            (ResumeFrom::Config, Resume::Auto) => self.checkpoints.latest_valid()?,
            (ResumeFrom::Config, Resume::Never) => match self.checkpoints.committed_steps()?.last() {
                Some(&step) => return Err(ResumeError::Never { run, url, step }),
                None => None,
            },
        };
        let Some((manifest, blobs)) = found else {
            return if req.extend { Err(ResumeError::NoRunToExtend { run, url }) } else { Ok(Start::Fresh) };
        };
        let origin = self.origin(manifest.step);
        let facts: RunFacts = serde_json::from_value(manifest.info.clone()).map_err(|e| ResumeError::Unreadable {
            origin: origin.clone(),
            name: acrf_common::checkpoint::MANIFEST.into(),
            message: format!("no run facts ({e}): written by an older acrf"),
        })?;
        if manifest.training_hash != self.cfg.training_hash() {
            let keys = written_config(&blobs, &origin)?.diff_training(&self.cfg);
            let other: Vec<String> = keys.iter().filter(|k| !LENGTH_KEYS.contains(&k.as_str())).cloned().collect();
            if keys.is_empty() {
                return Err(ResumeError::Hash { origin });
            } else if !other.is_empty() {
                return Err(ResumeError::Settings { origin, keys });
            } else if !req.extend {
                return Err(ResumeError::Length { origin, keys });
            }
        }
        let total = self.cfg.training.total_steps(facts.steps_per_epoch);
        if req.extend && total <= manifest.step {
            return Err(ResumeError::NothingToExtend { origin, step: manifest.step, total });
        }
        if manifest.step >= total {
            let lora_url = self.exports.url_of(&format!("{}.safetensors", self.cfg.run_name));
            return Ok(Start::Finished { step: manifest.step, lora_url });
        }
        Ok(Start::Resume { step: manifest.step, micro_batches: facts.micro_batches })
    }

    /// The newest checkpoint that verifies: where a group that lost or gained workers continues. It was written
    /// by this run, so it needs no settings check.
    pub fn latest(&self) -> Result<Option<u64>, ResumeError> {
        Ok(self.checkpoints.latest_valid()?.map(|(m, _)| m.step))
    }

    /// Reads the checkpoint of `step` onto `device`.
    pub fn load(&self, step: u64, device: &Device) -> Result<Restored, ResumeError> {
        let (_, blobs) = self.checkpoints.load(step)?;
        read(&blobs, &self.origin(step), device)
    }

    /// Whether a checkpoint is due after `step`, by `training.save_every_n_steps` and `save_every_n_epochs`.
    pub fn due(&self, step: u64, steps_per_epoch: u64) -> bool {
        let t = &self.cfg.training;
        (t.save_every_n_steps > 0 && step.is_multiple_of(t.save_every_n_steps))
            || (t.save_every_n_epochs > 0
                && step.is_multiple_of(steps_per_epoch)
                && (step / steps_per_epoch).is_multiple_of(t.save_every_n_epochs))
    }

    /// Commits a checkpoint of the trainer's state, exports its LoRA — `<run>.safetensors` at the run's last
    /// step, `<run>-step<N>.safetensors` before — and prunes old checkpoints; returns the LoRA file's URL.
    pub fn save(&self, trainer: &Trainer) -> Result<String, SaveError> {
        let state = trainer.state();
        let blobs = snapshot(trainer)?;
        let facts = RunFacts {
            epoch: state.step / trainer.steps_per_epoch(),
            total_steps: trainer.total_steps(),
            steps_per_epoch: trainer.steps_per_epoch(),
            micro_batches: trainer.micro_batches(),
        };
        let info = serde_json::to_value(facts).expect("run facts serialise");
        self.checkpoints.commit(state.step, &trainer.config().training_hash(), info, &blobs)?;
        let file = if state.step == trainer.total_steps() {
            format!("{}.safetensors", self.cfg.run_name)
        } else {
            self.step_export(state.step)
        };
        let lora = blobs.iter().find(|(n, _)| *n == LORA).map(|(_, b)| b.clone()).expect("a snapshot has a LoRA");
        self.exports.put(&file, lora)?;
        let ck = &self.cfg.checkpoint;
        // A step's LoRA file goes with its checkpoint, so that retention bounds the output folder too.
        for step in self.checkpoints.prune(ck.keep_last, ck.keep_every)? {
            self.exports.delete(&self.step_export(step))?;
        }
        Ok(self.exports.url_of(&file))
    }

    /// The LoRA file exported with the checkpoint of `step` before the run's last step.
    fn step_export(&self, step: u64) -> String {
        format!("{}-step{step:08}.safetensors", self.cfg.run_name)
    }

    fn origin(&self, step: u64) -> String {
        self.run_folder().url_of(&format!("ckpt/{step:010}"))
    }
}

/// The config a checkpoint was trained with.
fn written_config(blobs: &BTreeMap<String, Bytes>, origin: &str) -> Result<Config, ResumeError> {
    let unreadable = |message: String| ResumeError::Unreadable { origin: origin.into(), name: CONFIG.into(), message };
    let bytes = blobs.get(CONFIG).ok_or_else(|| unreadable("missing".into()))?;
    let text = std::str::from_utf8(bytes).map_err(|e| unreadable(e.to_string()))?;
    Config::parse(text, &format!("{origin}/{CONFIG}")).map_err(|e| unreadable(e.to_string()))
}

/// Metadata that makes a LoRA file self-describing in ComfyUI, diffusers and `acrf inspect`.
pub fn lora_metadata(cfg: &Config, step: u64) -> BTreeMap<String, String> {
    let targets: Vec<&str> = cfg.lora.target_modules().iter().map(|t| t.name()).collect();
    let mut meta = BTreeMap::from([
        ("acrf.trainer".into(), format!("acrf {}", env!("CARGO_PKG_VERSION"))),
        ("acrf.base_model".into(), base_model_name(&cfg.model.path)),
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
    ]);
    if !cfg.model.adapters.is_empty() {
        // Not part of the LoRA: the frozen adapters it was trained over, for whoever wants to reproduce that.
        let adapters = serde_json::to_string(&cfg.model.adapters).expect("adapters serialise");
        meta.insert("acrf.trained_over_adapters".into(), adapters);
    }
    meta
}

/// The model folder's or file's name: what identifies the base model to whoever receives the LoRA, without
/// the trainer's local directories (which can name users, mounts and projects).
fn base_model_name(path: &str) -> String {
    std::path::Path::new(path).file_name().map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned())
}

/// The blobs of `trainer`'s current state.
fn snapshot(trainer: &Trainer) -> Result<Vec<(&'static str, Bytes)>, SaveError> {
    let cfg = trainer.config();
    let state = trainer.state();
    let lora = trainer.lora.to_bytes(&lora_metadata(cfg, state.step))?;
    let opt = trainer.optimizer().state();
    let tensors: Vec<(String, Tensor)> =
        opt.tensors.iter().map(|(n, t)| t.to_device(&Device::Cpu).map(|t| (n.clone(), t))).collect::<Result<_, _>>()?;
    let meta = std::collections::HashMap::from([("step".to_string(), opt.step.to_string())]);
    let optimizer = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| SaveError::Optimizer(e.to_string()))?;
    Ok(vec![
        (LORA, Bytes::from(lora)),
        (OPTIMIZER, Bytes::from(optimizer)),
        (STATE, Bytes::from(serde_json::to_vec_pretty(&state).expect("state serialises"))),
        (CONFIG, Bytes::from(cfg.to_toml_string()?)),
    ])
}

/// Reads back the blobs of a committed checkpoint.
pub fn read(blobs: &BTreeMap<String, Bytes>, origin: &str, device: &Device) -> Result<Restored, ResumeError> {
    let bad =
        |name: &str, message: String| ResumeError::Unreadable { origin: origin.into(), name: name.into(), message };
    let blob = |name: &str| blobs.get(name).ok_or_else(|| bad(name, "missing".into()));
    let lora =
        Lora::from_bytes(blob(LORA)?, &format!("{origin}/{LORA}"), device).map_err(|e| bad(LORA, e.to_string()))?;
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
    Ok(Restored { lora, optimizer: AdamWState { step, tensors }, state, origin: origin.to_string() })
}
