//! The job configuration: one TOML file that drives a CPU run, a one-GPU run and a multi-node run alike.
//!
//! Every section rejects unknown keys, and [`Config::validate`] names the offending key with its section
//! (`acrf.jitter_scale`), so a typo never silently falls back to a default. Only `output`, `model.path` and
//! `data.path` are required; [`Config::to_toml_string`] writes every default out, so a run's effective settings
//! can be read, diffed and replayed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("cannot write the config as TOML: {0}")]
    Write(String),
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// Where the noise level of a training slot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSampling {
    /// AC-RF: the Turbo inference anchors plus jitter (spec §2).
    Anchor,
    /// Ablation: σ = s_k(U(0,1)), clamped.
    Uniform,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    Uniform,
    Gaussian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    Standard,
    Frequency,
    Style,
    Unified,
}

impl LossMode {
    pub const ALL: [LossMode; 4] = [LossMode::Standard, LossMode::Frequency, LossMode::Style, LossMode::Unified];

    pub fn name(self) -> &'static str {
        match self {
            LossMode::Standard => "standard",
            LossMode::Frequency => "frequency",
            LossMode::Style => "style",
            LossMode::Unified => "unified",
        }
    }
}

impl std::str::FromStr for LossMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LossMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown loss mode `{s}` (standard, frequency, style, unified)"))
    }
}

/// The AC-RF noise schedule (spec §2, §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcrfConfig {
    /// K: number of Turbo inference anchors.
    pub turbo_steps: usize,
    /// k in s_k(x) = kx / (1 + (k−1)x).
    pub shift: f64,
    /// η: half-width of the uniform jitter, or the std of the gaussian one.
    pub jitter_scale: f64,
    pub jitter: Jitter,
    /// γ of Min-SNR; 0 disables the weighting.
    pub snr_gamma: f64,
    pub timestep_sampling: TimestepSampling,
}

impl Default for AcrfConfig {
    fn default() -> Self {
        AcrfConfig {
            turbo_steps: 10,
            shift: 3.0,
            jitter_scale: 0.02,
            jitter: Jitter::Uniform,
            snr_gamma: 5.0,
            timestep_sampling: TimestepSampling::Anchor,
        }
    }
}

impl AcrfConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        // One anchor is σ = 1 alone (the anchors run from 1 down to σ_min), so every slot would train on pure
        // noise give or take the jitter.
        if !(2..=1000).contains(&self.turbo_steps) {
            return Err(invalid(
                "acrf.turbo_steps",
                format!(
                    "must be in 2..=1000 (K anchors from σ = 1 down to σ_min; with K = 1 every σ sits near 1), got {}",
                    self.turbo_steps
                ),
            ));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(invalid("acrf.shift", format!("must be a positive number, got {}", self.shift)));
        }
        if !(self.jitter_scale.is_finite() && (0.0..=0.5).contains(&self.jitter_scale)) {
            return Err(invalid("acrf.jitter_scale", format!("must be in [0, 0.5], got {}", self.jitter_scale)));
        }
        if !(self.snr_gamma.is_finite() && self.snr_gamma >= 0.0) {
            return Err(invalid("acrf.snr_gamma", format!("must be ≥ 0 (0 disables Min-SNR), got {}", self.snr_gamma)));
        }
        Ok(())
    }
}

/// The loss mode and its weights (spec §4, §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub loss_mode: LossMode,
    pub lambda_char: f64,
    pub lambda_mse: f64,
    pub lambda_cos: f64,
    pub lambda_fft: f64,
    pub alpha_hf: f64,
    pub beta_lf: f64,
    pub lambda_struct: f64,
    pub lambda_light: f64,
    pub lambda_color: f64,
    pub lambda_tex: f64,
    /// p: the low band is the adaptive average pool to (⌊H/p⌋, ⌊W/p⌋), upsampled back.
    pub pool: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            loss_mode: LossMode::Standard,
            lambda_char: 1.0,
            lambda_mse: 0.0,
            lambda_cos: 0.1,
            lambda_fft: 0.1,
            alpha_hf: 1.0,
            beta_lf: 0.2,
            lambda_struct: 1.0,
            lambda_light: 0.5,
            lambda_color: 0.3,
            lambda_tex: 0.5,
            pool: 4,
        }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let weights = [
            ("lambda_char", self.lambda_char),
            ("lambda_mse", self.lambda_mse),
            ("lambda_cos", self.lambda_cos),
            ("lambda_fft", self.lambda_fft),
            ("alpha_hf", self.alpha_hf),
            ("beta_lf", self.beta_lf),
            ("lambda_struct", self.lambda_struct),
            ("lambda_light", self.lambda_light),
            ("lambda_color", self.lambda_color),
            ("lambda_tex", self.lambda_tex),
        ];
        for (name, v) in weights {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(&format!("loss.{name}"), format!("must be a finite number ≥ 0, got {v}")));
            }
        }
        if self.pool == 0 || self.pool > 64 {
            return Err(invalid("loss.pool", format!("must be in 1..=64, got {}", self.pool)));
        }
        Ok(())
    }
}

/// Precision of the frozen transformer's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    /// bf16 on a GPU, f32 on a CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl ModelDtype {
    /// The dtype to load the model in. bf16 halves the memory of the frozen weights on a GPU at a cost a LoRA does
    /// not notice; CPUs have no fast bf16 matmul, so there f32 is both faster and exact.
    pub fn resolve(self, gpu: bool) -> ModelDtype {
        match self {
            ModelDtype::Auto if gpu => ModelDtype::Bf16,
            ModelDtype::Auto => ModelDtype::F32,
            concrete => concrete,
        }
    }
}

/// The frozen base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers folder or a ComfyUI single `.safetensors` file.
    pub path: String,
    #[serde(default)]
    pub dtype: ModelDtype,
    /// A diffusers `config.json` for a single file, whose hyper-parameters are otherwise inferred from the tensor
    /// shapes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Frozen LoRAs merged into the base weights at load (e.g. a Turbo "training adapter"); never trained,
    /// never saved in the trained LoRA. Left out of the file when empty, so that jobs without adapters keep
    /// their training hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<AdapterConfig>,
}

/// One frozen adapter of `model.adapters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// A LoRA file in any layout acrf reads (ComfyUI/diffusers, peft, kohya).
    pub path: String,
    #[serde(default = "one")]
    pub strength: f64,
    /// `sha256:<hex>` of the file. [`Config::load`] fills it in from the file when it is readable, so a
    /// checkpoint's settings name the adapter's content, not just its path, and a resume with another file
    /// is refused; a worker checks the file it loads against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn one() -> f64 {
    1.0
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The latents and caption embeddings, cached ahead of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A local folder or an object-store URL.
    pub path: String,
    /// The probability that a training slot's caption is replaced by the dataset's empty-prompt embedding,
    /// drawn per (seed, step, slot). Left out of the file at 0, so that jobs without it keep their training
    /// hash.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub caption_dropout: f64,
}

/// Regularisation against the base model: micro-batches of a second dataset trained toward the base model's
/// own prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreservationConfig {
    /// A cached dataset (from `acrf cache`), folder or URL.
    pub data: String,
    /// The weight of the preservation loss against the data loss.
    #[serde(default = "one")]
    pub weight: f64,
    /// The probability that a micro-batch of a step is joined by a preservation micro-batch.
    #[serde(default = "default_preservation_ratio")]
    pub ratio: f64,
}

fn default_preservation_ratio() -> f64 {
    0.25
}

impl PreservationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        require(!self.data.trim().is_empty(), "preservation.data", "must name a cached dataset folder or URL")?;
        non_negative("preservation.weight", self.weight)?;
        require(
            (0.0..=1.0).contains(&self.ratio),
            "preservation.ratio",
            format!("must be in [0, 1], got {}", self.ratio),
        )
    }
}

/// A linear of a transformer block that can carry an adapter, spelt as in the diffusers module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraTarget {
    #[serde(rename = "to_q")]
    ToQ,
    #[serde(rename = "to_k")]
    ToK,
    #[serde(rename = "to_v")]
    ToV,
    #[serde(rename = "to_out.0")]
    ToOut0,
    #[serde(rename = "w1")]
    W1,
    #[serde(rename = "w2")]
    W2,
    #[serde(rename = "w3")]
    W3,
    /// w1, w2 and w3 together, as the reference trainer names them.
    #[serde(rename = "feed_forward")]
    FeedForward,
}

impl LoraTarget {
    /// The linears themselves, in block order.
    const MODULES: [LoraTarget; 7] = [
        LoraTarget::ToQ,
        LoraTarget::ToK,
        LoraTarget::ToV,
        LoraTarget::ToOut0,
        LoraTarget::W1,
        LoraTarget::W2,
        LoraTarget::W3,
    ];

    /// The diffusers leaf name (`to_out.0`, `w1`, …).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::ToQ => "to_q",
            LoraTarget::ToK => "to_k",
            LoraTarget::ToV => "to_v",
            LoraTarget::ToOut0 => "to_out.0",
            LoraTarget::W1 => "w1",
            LoraTarget::W2 => "w2",
            LoraTarget::W3 => "w3",
            LoraTarget::FeedForward => "feed_forward",
        }
    }

    fn covers(self, module: LoraTarget) -> bool {
        self == module
            || (self == LoraTarget::FeedForward && matches!(module, LoraTarget::W1 | LoraTarget::W2 | LoraTarget::W3))
    }
}

/// A stack of transformer blocks. The reference trainer adapts `layers` only; `blocks = ["layers"]` matches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBlock {
    /// The blocks that refine the image tokens before the joint stream.
    NoiseRefiner,
    /// The blocks that refine the caption tokens before the joint stream.
    ContextRefiner,
    /// The joint image-and-caption blocks.
    Layers,
}

impl LoraBlock {
    /// The stack's module-name prefix.
    pub fn name(self) -> &'static str {
        match self {
            LoraBlock::NoiseRefiner => "noise_refiner",
            LoraBlock::ContextRefiner => "context_refiner",
            LoraBlock::Layers => "layers",
        }
    }
}

/// The adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r, the rank of every adapter.
    pub network_dim: usize,
    /// The adapter output is scaled by network_alpha / network_dim.
    pub network_alpha: f64,
    pub targets: Vec<LoraTarget>,
    pub blocks: Vec<LoraBlock>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            network_dim: 16,
            network_alpha: 16.0,
            targets: vec![LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0],
            blocks: vec![LoraBlock::NoiseRefiner, LoraBlock::ContextRefiner, LoraBlock::Layers],
        }
    }
}

impl LoraConfig {
    /// The linears that get an adapter, `feed_forward` expanded, each once and in block order, so that the adapter
    /// set does not depend on how the list was spelt.
    pub fn target_modules(&self) -> Vec<LoraTarget> {
        LoraTarget::MODULES.into_iter().filter(|&m| self.targets.iter().any(|t| t.covers(m))).collect()
    }

    /// The block stacks that get adapters, each once and in model order.
    pub fn target_blocks(&self) -> Vec<LoraBlock> {
        let mut blocks = self.blocks.clone();
        blocks.sort();
        blocks.dedup();
        blocks
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let rank = self.network_dim;
        require((1..=1024).contains(&rank), "lora.network_dim", format!("must be in 1..=1024, got {rank}"))?;
        positive("lora.network_alpha", self.network_alpha)?;
        require(!self.targets.is_empty(), "lora.targets", "must name at least one linear")?;
        require(!self.blocks.is_empty(), "lora.blocks", "must name at least one block stack")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Optimizer {
    #[default]
    AdamW,
    /// The reference trainer's default, accepted so that its configs load; trained as AdamW.
    AdamW8bit,
}

impl Optimizer {
    /// What to tell the user when the optimizer that runs is not the one named. bitsandbytes' 8-bit state saves
    /// memory in full fine-tuning; a LoRA's f32 state is a few hundred MB, so one exact optimizer is kept instead.
    pub fn substitution_note(self) -> Option<&'static str> {
        match self {
            Optimizer::AdamW => None,
            Optimizer::AdamW8bit => Some("AdamW8bit is trained as AdamW: LoRA optimizer state is small"),
        }
    }
}

/// The learning-rate schedules of diffusers' `get_scheduler`; the worker's `optim::LrSchedule` gives the formulas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    #[default]
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
}

/// The optimisation: length, batch, optimizer, schedule and the cadence of saves and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub epochs: u64,
    /// When > 0, the run is this many optimizer steps long and `epochs` is ignored.
    pub max_steps: u64,
    /// Samples per micro-batch on one worker.
    pub batch_size: usize,
    /// Micro-batches per worker per optimizer step.
    pub gradient_accumulation: usize,
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub scheduler: LrScheduler,
    pub lr_warmup_steps: u64,
    /// Restarts of `cosine_with_restarts`.
    pub lr_num_cycles: u32,
    /// The floor of the decaying schedules.
    pub lr_min: f64,
    /// Clip the global gradient L2 norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    /// Caption tokens fed to the transformer.
    pub max_sequence_length: usize,
    pub gradient_checkpointing: bool,
    /// 0 = no step-based saves.
    pub save_every_n_steps: u64,
    /// 0 = no epoch-based saves.
    pub save_every_n_epochs: u64,
    /// Optimizer steps in a row whose loss or gradient is not finite that are skipped before the run stops.
    pub max_nonfinite_steps: u32,
    pub log_every_n_steps: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            epochs: 10,
            max_steps: 0,
            batch_size: 1,
            gradient_accumulation: 1,
            learning_rate: 1e-4,
            optimizer: Optimizer::AdamW,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            scheduler: LrScheduler::Constant,
            lr_warmup_steps: 0,
            lr_num_cycles: 1,
            lr_min: 1e-6,
            max_grad_norm: 1.0,
            max_sequence_length: 512,
            gradient_checkpointing: true,
            save_every_n_steps: 0,
            save_every_n_epochs: 1,
            max_nonfinite_steps: 5,
            log_every_n_steps: 1,
        }
    }
}

impl TrainingConfig {
    /// The length of the run in optimizer steps, given how many an epoch has.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        if self.max_steps > 0 { self.max_steps } else { self.epochs.saturating_mul(steps_per_epoch) }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        require(
            self.epochs >= 1 || self.max_steps >= 1,
            "training.epochs",
            "must be ≥ 1 unless training.max_steps is set",
        )?;
        at_least_one("training.batch_size", self.batch_size as u64)?;
        at_least_one("training.gradient_accumulation", self.gradient_accumulation as u64)?;
        positive("training.learning_rate", self.learning_rate)?;
        non_negative("training.weight_decay", self.weight_decay)?;
        beta("training.adam_beta1", self.adam_beta1)?;
        beta("training.adam_beta2", self.adam_beta2)?;
        positive("training.adam_epsilon", self.adam_epsilon)?;
        at_least_one("training.lr_num_cycles", u64::from(self.lr_num_cycles))?;
        non_negative("training.lr_min", self.lr_min)?;
        require(
            self.lr_min <= self.learning_rate,
            "training.lr_min",
            format!("must not exceed training.learning_rate ({}), got {}", self.learning_rate, self.lr_min),
        )?;
        non_negative("training.max_grad_norm", self.max_grad_norm)?;
        at_least_one("training.max_sequence_length", self.max_sequence_length as u64)?;
        at_least_one("training.log_every_n_steps", self.log_every_n_steps)
    }
}

/// Which ops evaluate attention and the norms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeMode {
    /// The fused RMSNorm and the fused, chunked attention op with its recomputing backward: they keep a
    /// fraction of the plain path's memory for the backward, and on a CPU they are also faster (fewer passes
    /// over memory), so they are the default everywhere.
    #[default]
    Lean,
    /// Composed ops with candle's own backward, as the parity tests pin them to diffusers.
    Plain,
}

/// A memory size, written as `auto`, a byte count, or a number with a unit (`24GiB`, `80 GB`, `512MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceMemory {
    /// The GPU's own memory; no limit on a CPU, whose memory is the host's and shared with everything else.
    #[default]
    Auto,
    Bytes(u64),
}

impl std::str::FromStr for DeviceMemory {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "auto" {
            return Ok(DeviceMemory::Auto);
        }
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
        let (number, unit) = (&text[..split], text[split..].trim());
        let scale: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024f64.powi(2),
            "gib" => 1024f64.powi(3),
            "tib" => 1024f64.powi(4),
            _ => return Err(format!("unknown unit `{unit}` in `{text}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
        };
        match number.parse::<f64>() {
            Ok(n) if n > 0.0 && (n * scale).is_finite() => Ok(DeviceMemory::Bytes((n * scale).round() as u64)),
            _ => Err(format!("`{text}` is not `auto` or a positive size such as 24GiB")),
        }
    }
}

impl std::fmt::Display for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const GIB: u64 = 1 << 30;
        const MIB: u64 = 1 << 20;
        match *self {
            DeviceMemory::Auto => f.write_str("auto"),
            DeviceMemory::Bytes(b) if b % GIB == 0 => write!(f, "{}GiB", b / GIB),
            DeviceMemory::Bytes(b) if b % MIB == 0 => write!(f, "{}MiB", b / MIB),
            DeviceMemory::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl TryFrom<String> for DeviceMemory {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<DeviceMemory> for String {
    fn from(m: DeviceMemory) -> String {
        m.to_string()
    }
}

/// How the transformer evaluates attention and norms, and the device memory a run must fit in. None of these
/// change what is trained beyond rounding, so they may change between a checkpoint and its resume: a run that
/// no longer fits a smaller GPU continues with smaller chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeConfig {
    pub mode: ComputeMode,
    /// Attention heads evaluated together under the lean mode; 0 = all. One head at a time bounds the scores
    /// alive at once to one head's, at the cost of more, smaller matmuls.
    pub attention_head_chunk: usize,
    /// Query rows evaluated together under the lean mode; 0 = all. Lower it when one head's scores
    /// ([query rows × tokens] in f32) are too large.
    pub attention_query_chunk: usize,
    /// The memory `acrf train` checks the predicted peak against before it loads anything.
    pub device_memory: DeviceMemory,
    /// What the gradients of a step are summed in, over its micro-batches and over the ranks.
    pub accumulation: Accumulation,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        ComputeConfig {
            mode: ComputeMode::Lean,
            attention_head_chunk: 1,
            attention_query_chunk: 0,
            device_memory: DeviceMemory::Auto,
            accumulation: Accumulation::F64,
        }
    }
}

/// The precision of a step's gradient sums (and of the statistics that travel with them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accumulation {
    /// f32 gradients added in f64 come out the same in any order in practice (the sum of a few dozen f32
    /// values of one parameter rarely needs more than f64's 53 bits), so every world size, and every split
    /// of the global batch over ranks, gives bit for bit the same weights. It doubles the bytes of the
    /// all-reduce and of the summed gradients.
    #[default]
    F64,
    /// Half the bytes; sums whose order depends on the world size round differently, so layouts agree to
    /// f32 rounding only, and long runs drift apart by ~1e-4.
    F32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resume {
    /// Continue from the newest checkpoint under the run's output, if there is one.
    #[default]
    Auto,
    /// Always start from scratch.
    Never,
}

/// Which checkpoints are kept and whether a run continues from one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// The newest checkpoints kept; at least the one a resume needs.
    pub keep_last: usize,
    /// Also keep, for good, every checkpoint whose step is a multiple of this; 0 = none.
    pub keep_every: u64,
    pub resume: Resume,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { keep_last: 3, keep_every: 0, resume: Resume::Auto }
    }
}

/// How gradients are summed across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Collective {
    /// Chosen by each worker from its device: NCCL between GPUs, the ring between CPUs.
    #[default]
    Auto,
    /// One worker: nothing to sum.
    Local,
    /// Ring all-reduce over the workers' own connections.
    Ring,
    /// NCCL between GPUs (a build with the `cuda` feature).
    Nccl,
}

/// The coordinator and its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// Workers that must join before training starts.
    pub min_workers: usize,
    /// Workers admitted at most; 0 = `min_workers`.
    pub max_workers: usize,
    pub rendezvous_timeout_s: u64,
    pub heartbeat_interval_s: u64,
    /// A worker silent for this long is declared lost.
    pub heartbeat_timeout_s: u64,
    /// Every this many steps the workers compare a hash of their LoRA weights; 0 = never.
    pub consistency_check_steps: u64,
    pub collective: Collective,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            min_workers: 1,
            max_workers: 0,
            rendezvous_timeout_s: 300,
            heartbeat_interval_s: 5,
            heartbeat_timeout_s: 30,
            consistency_check_steps: 100,
            collective: Collective::Auto,
        }
    }
}

impl DistributedConfig {
    /// `max_workers` with its 0 resolved.
    pub fn effective_max_workers(&self) -> usize {
        if self.max_workers == 0 { self.min_workers } else { self.max_workers }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one("distributed.min_workers", self.min_workers as u64)?;
        require(
            self.max_workers == 0 || self.max_workers >= self.min_workers,
            "distributed.max_workers",
            format!("must be 0 or ≥ distributed.min_workers ({}), got {}", self.min_workers, self.max_workers),
        )?;
        at_least_one("distributed.rendezvous_timeout_s", self.rendezvous_timeout_s)?;
        at_least_one("distributed.heartbeat_interval_s", self.heartbeat_interval_s)?;
        require(
            self.heartbeat_timeout_s > self.heartbeat_interval_s,
            "distributed.heartbeat_timeout_s",
            format!(
                "must exceed distributed.heartbeat_interval_s ({}), got {}",
                self.heartbeat_interval_s, self.heartbeat_timeout_s
            ),
        )
    }
}

/// Sample images rendered during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    pub prompts: Vec<String>,
    /// 0 = no samples.
    pub every_n_steps: u64,
    /// Sampler steps: the Turbo setting the LoRA is meant for.
    pub steps: usize,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// The many-step reference the Turbo render is compared with (turbo drift); 0 measures no drift.
    pub reference_steps: usize,
    /// Also render each sample with `model.adapters` merged (the run's samples are always rendered on the
    /// plain base, as a user runs the LoRA).
    pub with_adapters: bool,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            prompts: Vec::new(),
            every_n_steps: 0,
            steps: 9,
            seed: 42,
            width: 1024,
            height: 1024,
            reference_steps: 30,
            with_adapters: false,
        }
    }
}

impl SampleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        require(
            self.every_n_steps == 0 || !self.prompts.is_empty(),
            "sample.prompts",
            "must hold at least one prompt when sample.every_n_steps is set",
        )?;
        at_least_one("sample.steps", self.steps as u64)?;
        // The VAE downsamples by 8 and the transformer patches latents 2 × 2.
        for (key, side) in [("sample.width", self.width), ("sample.height", self.height)] {
            require(side >= 16 && side % 16 == 0, key, format!("must be a positive multiple of 16, got {side}"))?;
        }
        Ok(())
    }
}

/// The fixed evaluation loss (`[eval]`): held-out items scored at one σ grid with one noise per (item, anchor),
/// whatever the job's own sampling, so jobs that sample σ differently are compared on the same yardstick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Items held out of training: a fraction of the dataset below 1, a count from 1 on; 0 = no evaluation.
    pub holdout: f64,
    /// Evaluate after every this many steps, and after the last; 0 = after the last only.
    pub every_n_steps: u64,
    /// K of the evaluation grid; 0 = the job's `acrf.turbo_steps`.
    pub turbo_steps: usize,
    /// The shift of the evaluation grid; 0 = the job's `acrf.shift`.
    pub shift: f64,
    /// Chooses the held-out items and seeds the evaluation noise, apart from the job's seed so that runs of
    /// other seeds are scored on the same items and noise.
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { holdout: 0.0, every_n_steps: 0, turbo_steps: 0, shift: 0.0, seed: 0 }
    }
}

impl EvalConfig {
    /// How many of `n_items` items are held out.
    pub fn holdout_count(&self, n_items: usize) -> usize {
        if self.holdout < 1.0 { (self.holdout * n_items as f64).round() as usize } else { self.holdout as usize }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let h = self.holdout;
        require(
            h.is_finite() && h >= 0.0 && (h < 1.0 || h.fract() == 0.0),
            "eval.holdout",
            format!("must be a fraction in [0, 1) or a whole number of items, got {h}"),
        )?;
        require(
            self.turbo_steps <= 1000,
            "eval.turbo_steps",
            format!("must be in 0..=1000, got {}", self.turbo_steps),
        )?;
        non_negative("eval.shift", self.shift)?;
        require(
            self.every_n_steps == 0 || h > 0.0,
            "eval.every_n_steps",
            "needs eval.holdout > 0: there is nothing to evaluate on",
        )
    }
}

/// The live status page of a running job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// Where the coordinator serves `/`, `/status` and `/metrics`. Loopback with port 0 (a free port, printed at
    /// start) by default, so nothing is exposed unless asked; `""` turns the page off.
    pub listen: String,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig { listen: "127.0.0.1:0".into() }
    }
}

impl StatusConfig {
    /// The address to serve on, `None` when the page is off.
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|e| {
            invalid(
                "status.listen",
                format!("must be an IP address and port, or \"\" for none, got {:?}: {e}", self.listen),
            )
        })
    }
}

/// S3 request addressing: `path` (`http://host/bucket/key`), which S3-compatible servers need, or
/// `virtual-hosted` (`http://bucket.host/key`), which AWS prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Addressing {
    Path,
    VirtualHosted,
}

/// How the job reaches object stores (`s3://`, `gs://`, `az://`), on top of the environment (`AWS_*`,
/// `GOOGLE_*`, `AZURE_*`, read first): a key set here wins over its variable, for every URL the job opens,
/// output and data alike. Credentials stay in the environment, so a job file can be shared; `options` takes
/// any other setting of the backend by object_store's key name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// An S3-compatible server (`http://127.0.0.1:9000`), or the GCS base URL / Azure endpoint.
    pub endpoint: Option<String>,
    /// S3 only.
    pub region: Option<String>,
    /// S3 only; unset = the environment's choice, path style by default.
    pub addressing: Option<Addressing>,
    /// Plain-HTTP endpoints, for servers on a private network.
    pub allow_http: Option<bool>,
    pub options: BTreeMap<String, String>,
}

impl StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.endpoint {
            require(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "storage.endpoint",
                format!("must be an http:// or https:// URL, got {endpoint:?}"),
            )?;
        }
        for key in self.options.keys() {
            require(!key.trim().is_empty(), "storage.options", "keys must not be empty")?;
        }
        Ok(())
    }
}

fn default_seed() -> u64 {
    42
}

fn default_run_name() -> String {
    "acrf".to_string()
}

/// A whole training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where checkpoints and the final LoRA go: a local folder or an object-store URL.
    pub output: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The run's folder under `output`.
    #[serde(default = "default_run_name")]
    pub run_name: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub acrf: AcrfConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub distributed: DistributedConfig,
    #[serde(default)]
    pub sample: SampleConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub compute: ComputeConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation: Option<PreservationConfig>,
}

/// Settings that only decide where, how often and by whom a run is saved, logged, sampled or coordinated, when it
/// gives up, or how its ops are laid out in memory: changing them between a checkpoint and its resume cannot change
/// the trained weights beyond rounding. Each entry is a dotted key or a whole section.
const NOT_TRAINING: [&str; 15] = [
    "output",
    "run_name",
    "training.save_every_n_steps",
    "training.save_every_n_epochs",
    "training.log_every_n_steps",
    "training.max_nonfinite_steps",
    "checkpoint",
    "distributed",
    "sample",
    "eval.every_n_steps",
    "eval.turbo_steps",
    "eval.shift",
    "status",
    "storage",
    "compute",
];

impl Config {
    /// A job with every optional setting at its default.
    pub fn new(output: impl Into<String>, model: impl Into<String>, data: impl Into<String>) -> Config {
        Config {
            output: output.into(),
            seed: default_seed(),
            run_name: default_run_name(),
            model: ModelConfig { path: model.into(), dtype: ModelDtype::Auto, config: None, adapters: Vec::new() },
            data: DataConfig { path: data.into(), caption_dropout: 0.0 },
            lora: LoraConfig::default(),
            acrf: AcrfConfig::default(),
            loss: LossConfig::default(),
            training: TrainingConfig::default(),
            checkpoint: CheckpointConfig::default(),
            distributed: DistributedConfig::default(),
            sample: SampleConfig::default(),
            eval: EvalConfig::default(),
            status: StatusConfig::default(),
            storage: StorageConfig::default(),
            compute: ComputeConfig::default(),
            preservation: None,
        }
    }

    /// Reads, parses and validates a job file. Relative local paths in it are relative to the file's folder,
    /// made absolute through that folder's canonical path, so that a job is the same job — with the same
    /// paths in its checkpoints' settings — whichever working directory and spelling of the file name it is
    /// started with.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = read_toml(path)?;
        config.validate()?;
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base =
            folder.canonicalize().map_err(|cause| ConfigError::Read { path: path.display().to_string(), cause })?;
        config.resolve_relative(&base);
        config.hash_adapters()?;
        Ok(config)
    }

    /// Records the sha256 of every adapter whose hash the job does not state, reading the file; a stated
    /// hash is left for the worker that loads the file to check (a coordinator need not see the files).
    pub fn hash_adapters(&mut self) -> Result<(), ConfigError> {
        for (i, adapter) in self.model.adapters.iter_mut().enumerate().filter(|(_, a)| a.sha256.is_none()) {
            let bytes = std::fs::read(&adapter.path).map_err(|e| {
                invalid(
                    &format!("model.adapters[{i}].path"),
                    format!("cannot read {}: {e} (state its `sha256` to start a job without the file)", adapter.path),
                )
            })?;
            adapter.sha256 = Some(format!("sha256:{}", hex::encode(Sha256::digest(&bytes))));
        }
        Ok(())
    }

    /// Makes the relative local paths (model, model config, data, output) relative to `base`; URLs and
    /// absolute paths are left alone.
    pub fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut String| {
            if !p.contains("://") && Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).display().to_string();
            }
        };
        fix(&mut self.output);
        fix(&mut self.model.path);
        fix(&mut self.data.path);
        if let Some(c) = self.model.config.as_mut() {
            fix(c);
        }
        for adapter in &mut self.model.adapters {
            fix(&mut adapter.path);
        }
        if let Some(p) = self.preservation.as_mut() {
            fix(&mut p.data);
        }
    }

    /// Parses and validates job text; `origin` names where it came from in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_toml(text, origin)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        require(!self.output.trim().is_empty(), "output", "must name a folder or URL")?;
        validate_run_name(&self.run_name)?;
        require(
            !self.model.path.trim().is_empty(),
            "model.path",
            "must name a diffusers folder or a .safetensors file",
        )?;
        if let Some(config) = &self.model.config {
            require(!config.trim().is_empty(), "model.config", "must name a config.json when set")?;
        }
        require(!self.data.path.trim().is_empty(), "data.path", "must name a cached dataset folder or URL")?;
        require(
            (0.0..=1.0).contains(&self.data.caption_dropout),
            "data.caption_dropout",
            format!("must be in [0, 1], got {}", self.data.caption_dropout),
        )?;
        for (i, adapter) in self.model.adapters.iter().enumerate() {
            require(!adapter.path.trim().is_empty(), &format!("model.adapters[{i}].path"), "must name a LoRA file")?;
            require(
                adapter.strength.is_finite(),
                &format!("model.adapters[{i}].strength"),
                format!("must be a finite number, got {}", adapter.strength),
            )?;
        }
        if let Some(p) = &self.preservation {
            p.validate()?;
        }
        self.lora.validate()?;
        self.acrf.validate()?;
        self.loss.validate()?;
        self.training.validate()?;
        at_least_one("checkpoint.keep_last", self.checkpoint.keep_last as u64)?;
        self.distributed.validate()?;
        self.sample.validate()?;
        self.eval.validate()?;
        self.status.address()?;
        self.storage.validate()
    }

    /// The effective job, every default written out, as TOML that parses back to the same job — except that
    /// the value of every credential in `[storage]` (see [`is_credential_key`]) reads [`REDACTED`]: this is
    /// the text that goes into files and onto terminals (checkpoints, `--print-config`), which outlive the
    /// job's secrets and travel further.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        let mut redacted = self.clone();
        for (key, value) in &mut redacted.storage.options {
            if is_credential_key(key) {
                *value = REDACTED.to_string();
            }
        }
        redacted.to_toml_string_with_credentials()
    }

    /// The job as TOML with its credentials as they are, for the one place that must carry them: the
    /// coordinator's assignment to its workers (over the pinned, encrypted control connection), and job files
    /// a caller writes to be run.
    pub fn to_toml_string_with_credentials(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Write(e.to_string()))
    }

    /// A hex SHA-256 of the settings that decide the trained weights (see [`Config::diff_training`]).
    pub fn training_hash(&self) -> String {
        let canonical = serde_json::to_string(&self.training_settings()).expect("JSON values serialise");
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }

    /// The dotted keys whose weight-deciding values differ between two jobs, sorted: a resume refuses a checkpoint
    /// unless this is empty. Keys that only steer saving, logging, sampling, retention and the workers are left out,
    /// and `lora.targets`/`lora.blocks` compare as the sets they select.
    pub fn diff_training(&self, other: &Config) -> Vec<String> {
        let (mine, theirs) = (self.training_settings(), other.training_settings());
        let mut keys: Vec<String> = mine.keys().chain(theirs.keys()).cloned().collect();
        keys.sort();
        keys.dedup();
        keys.retain(|k| mine.get(k) != theirs.get(k));
        keys
    }

    /// Applies one `section.key=value` override, as `--set` and sweeps give them, and validates the result. The
    /// value is read as a TOML value (`5e-5`, `true`, `["to_q", "w1"]`) and otherwise as a bare string (`style`).
    /// On error the job is left unchanged.
    pub fn set_dotted(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let path: Vec<&str> = key.split('.').collect();
        let Some((leaf, sections)) = path.split_last().filter(|_| path.iter().all(|p| !p.is_empty())) else {
            return Err(invalid(key, "must be a dotted key such as `training.learning_rate`"));
        };
        let mut root = toml::Table::try_from(&*self).map_err(|e| ConfigError::Write(e.to_string()))?;
        let mut table = &mut root;
        for section in sections {
            table = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Table::new().into())
                .as_table_mut()
                .ok_or_else(|| invalid(key, format!("`{section}` is a value, not a section")))?;
        }
        table.insert(leaf.to_string(), override_value(value));
        let updated: Config = root.try_into().map_err(|e: toml::de::Error| invalid(key, e.message()))?;
        updated.validate()?;
        *self = updated;
        Ok(())
    }

    /// The weight-deciding settings as dotted key → value, lists of targets and blocks in canonical form.
    fn training_settings(&self) -> BTreeMap<String, serde_json::Value> {
        let mut root = serde_json::to_value(self).expect("the config holds only strings, numbers, bools and lists");
        root["lora"]["targets"] = serde_json::to_value(self.lora.target_modules()).expect("enums serialise");
        root["lora"]["blocks"] = serde_json::to_value(self.lora.target_blocks()).expect("enums serialise");
        let mut flat = BTreeMap::new();
        flatten("", root, &mut flat);
        flat.retain(|key, _| {
            !NOT_TRAINING.iter().any(|p| key == p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
        });
        flat
    }
}

fn require(ok: bool, key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    if ok { Ok(()) } else { Err(invalid(key, message)) }
}

fn at_least_one(key: &str, v: u64) -> Result<(), ConfigError> {
    require(v >= 1, key, format!("must be ≥ 1, got {v}"))
}

fn positive(key: &str, v: f64) -> Result<(), ConfigError> {
    require(v.is_finite() && v > 0.0, key, format!("must be a finite number > 0, got {v}"))
}

fn non_negative(key: &str, v: f64) -> Result<(), ConfigError> {
    require(v.is_finite() && v >= 0.0, key, format!("must be a finite number ≥ 0, got {v}"))
}

fn beta(key: &str, v: f64) -> Result<(), ConfigError> {
    require((0.0..1.0).contains(&v), key, format!("must be in [0, 1), got {v}"))
}

/// Whether `segment` is safe as one folder (or object-key segment) name: it must not climb out of its parent, hide,
/// or mean different things on different file systems.
pub fn is_safe_segment(segment: &str) -> bool {
    let safe = segment.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    !segment.is_empty() && segment.len() <= 128 && safe && !segment.starts_with('.')
}

/// Whether `name` is safe as a run name, which becomes a folder under `output`: safe segments, `/`-separated so
/// that a sweep keeps its jobs together (`<sweep>/<job>`).
pub fn is_safe_run_name(name: &str) -> bool {
    name.len() <= 255 && name.split('/').all(is_safe_segment)
}

fn validate_run_name(name: &str) -> Result<(), ConfigError> {
    require(
        is_safe_run_name(name),
        "run_name",
        format!(
            "must be `/`-separated segments of 1 to 128 of A–Z, a–z, 0–9, `-`, `_`, `.`, none starting with `.`, \
             got {name:?}"
        ),
    )
}

fn flatten(prefix: &str, value: serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        leaf => {
            out.insert(prefix.to_string(), leaf);
        }
    }
}

/// A `--set` value: a TOML value when it is one, else the text itself, so that strings need no quotes.
fn override_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .filter(|t| t.len() == 1)
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// What a credential's value reads as in everything acrf writes or prints.
pub const REDACTED: &str = "<redacted>";

/// Whether a `[storage]` key (or a dotted `storage.options.<key>`) names a credential: one that mentions a
/// secret, password, token, credential or private key, or has `key` or `sas` as a `_`-separated word
/// (`aws_secret_access_key`, `account_key`, `sas_token`, `AZURE_STORAGE_ACCESS_KEY`). Erring towards
/// redacting costs a user only a `<redacted>` where a harmless value was.
pub fn is_credential_key(key: &str) -> bool {
    let key = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["secret", "password", "passwd", "token", "credential", "private"].iter().any(|word| key.contains(word))
        || key.split(['_', '-']).any(|word| word == "key" || word == "sas")
}

/// Reads and parses a TOML file, naming the file in every error.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|cause| ConfigError::Read { path: path.display().to_string(), cause })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text; `origin` names where it came from in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn unknown_loss_key_is_named() {
        let err = parse_toml::<LossConfig>("lambda_chr = 1.0", "job.toml").unwrap_err().to_string();
        assert!(err.contains("lambda_chr"), "{err}");
        assert!(err.contains("job.toml"), "{err}");
    }

    #[test]
    fn out_of_range_is_named() {
        let c = AcrfConfig { jitter_scale: -1.0, ..Default::default() };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("acrf.jitter_scale"), "{err}");
        let l = LossConfig { pool: 0, ..Default::default() };
        assert!(l.validate().unwrap_err().to_string().contains("loss.pool"));
    }

    const MINIMAL: &str = "output = \"out\"\n[model]\npath = \"model\"\n[data]\npath = \"data\"\n";

    fn job() -> Config {
        Config::new("out", "model", "data")
    }

    #[test]
    fn minimal_file_gets_every_default() {
        let c = Config::parse(MINIMAL, "job.toml").unwrap();
        assert_eq!(c, job());
        assert_eq!((c.seed, c.run_name.as_str()), (42, "acrf"));
        assert_eq!(c.model.dtype, ModelDtype::Auto);
        assert_eq!((c.lora.network_dim, c.lora.network_alpha), (16, 16.0));
        assert_eq!(c.lora.target_modules(), [LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0]);
        assert_eq!(c.lora.target_blocks(), [LoraBlock::NoiseRefiner, LoraBlock::ContextRefiner, LoraBlock::Layers]);
        let t = &c.training;
        assert_eq!((t.epochs, t.max_steps, t.batch_size, t.gradient_accumulation), (10, 0, 1, 1));
        assert_eq!((t.learning_rate, t.weight_decay, t.adam_beta1, t.adam_beta2), (1e-4, 0.01, 0.9, 0.999));
        assert_eq!((t.adam_epsilon, t.lr_min, t.max_grad_norm), (1e-8, 1e-6, 1.0));
        assert_eq!(
            (t.optimizer, t.scheduler, t.lr_warmup_steps, t.lr_num_cycles),
            (Optimizer::AdamW, LrScheduler::Constant, 0, 1)
        );
        assert_eq!((t.max_sequence_length, t.gradient_checkpointing), (512, true));
        assert_eq!(
            (t.save_every_n_steps, t.save_every_n_epochs, t.max_nonfinite_steps, t.log_every_n_steps),
            (0, 1, 5, 1)
        );
        assert_eq!((c.checkpoint.keep_last, c.checkpoint.keep_every, c.checkpoint.resume), (3, 0, Resume::Auto));
        let d = &c.distributed;
        assert_eq!((d.min_workers, d.effective_max_workers(), d.rendezvous_timeout_s), (1, 1, 300));
        assert_eq!((d.heartbeat_interval_s, d.heartbeat_timeout_s, d.consistency_check_steps), (5, 30, 100));
        assert_eq!(d.collective, Collective::Auto);
        let s = &c.sample;
        assert_eq!((s.prompts.len(), s.every_n_steps, s.steps, s.seed, s.width, s.height), (0, 0, 9, 42, 1024, 1024));
        assert_eq!(c.status.address().unwrap(), Some("127.0.0.1:0".parse().unwrap()));
    }

    #[test]
    fn required_keys_are_named() {
        for (text, key) in [
            ("[model]\npath = \"m\"\n[data]\npath = \"d\"\n", "output"),
            ("output = \"o\"\n[model]\ndtype = \"bf16\"\n[data]\npath = \"d\"\n", "path"),
            ("output = \"o\"\n[model]\npath = \"m\"\n", "data"),
        ] {
            let err = Config::parse(text, "job.toml").unwrap_err().to_string();
            assert!(err.contains(&format!("missing field `{key}`")), "{err}");
        }
    }

    #[test]
    fn unknown_key_in_every_section_is_named_with_file_and_line() {
        for section in [
            "",
            "model",
            "data",
            "lora",
            "acrf",
            "loss",
            "training",
            "checkpoint",
            "distributed",
            "sample",
            "status",
            "storage",
            "compute",
        ] {
            let text = match section {
                "" => format!("bogus_key = 1\n{MINIMAL}"),
                "model" | "data" => {
                    MINIMAL.replace(&format!("[{section}]\n"), &format!("[{section}]\nbogus_key = 1\n"))
                }
                _ => format!("{MINIMAL}[{section}]\nbogus_key = 1\n"),
            };
            let err = Config::parse(&text, "job.toml").unwrap_err().to_string();
            assert!(err.contains("job.toml") && err.contains("unknown field `bogus_key`"), "[{section}]: {err}");
            let line = text.lines().position(|l| l.starts_with("bogus_key")).unwrap() + 1;
            assert!(err.contains(&format!("line {line}")), "[{section}]: {err}");
        }
        let err = Config::parse(&format!("{MINIMAL}[trainng]\n"), "job.toml").unwrap_err().to_string();
        assert!(err.contains("unknown field `trainng`"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        for (line, expected) in [
            ("[training]\nbatch_size = \"two\"", "expected usize"),
            ("[training]\nlr_warmup_steps = -3", "expected u64"),
            ("[training]\nscheduler = \"cosine_annealing\"", "unknown variant `cosine_annealing`"),
            ("[training]\noptimizer = \"Lion\"", "unknown variant `Lion`"),
            ("[lora]\ntargets = [\"to_x\"]", "unknown variant `to_x`"),
            ("[lora]\nblocks = \"layers\"", "expected a sequence"),
            ("[model]\npath = \"m\"\ndtype = \"fp8\"", "unknown variant `fp8`"),
            ("[storage]\naddressing = \"dns\"", "unknown variant `dns`"),
            ("[storage]\noptions = { conditional_put = false }", "expected a string"),
        ] {
            let text = if line.starts_with("[model]") {
                MINIMAL.replace("[model]\npath = \"model\"", line)
            } else {
                format!("{MINIMAL}{line}\n")
            };
            let err = Config::parse(&text, "job.toml").unwrap_err().to_string();
            let key_line = line.lines().last().unwrap();
            assert!(err.contains(key_line) && err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn integers_are_accepted_for_floats() {
        let c = Config::parse(&format!("{MINIMAL}[lora]\nnetwork_alpha = 8\n"), "job.toml").unwrap();
        assert_eq!(c.lora.network_alpha, 8.0);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let cases = [
            ("output", "\"\""),
            ("run_name", "\"../escape\""),
            ("run_name", "\".hidden\""),
            ("run_name", "\"a//b\""),
            ("run_name", "\"a/../b\""),
            ("run_name", "\"/a\""),
            ("run_name", "\"a/\""),
            ("model.path", "\" \""),
            ("model.config", "\"\""),
            ("data.path", "\"\""),
            ("storage.endpoint", "\"127.0.0.1:9000\""),
            ("lora.network_dim", "0"),
            ("lora.network_dim", "1025"),
            ("lora.network_alpha", "0"),
            ("lora.network_alpha", "nan"),
            ("lora.targets", "[]"),
            ("lora.blocks", "[]"),
            ("acrf.turbo_steps", "0"),
            ("acrf.turbo_steps", "1"),
            ("acrf.turbo_steps", "1001"),
            ("loss.lambda_cos", "-1"),
            ("training.batch_size", "0"),
            ("training.gradient_accumulation", "0"),
            ("training.learning_rate", "0"),
            ("training.learning_rate", "-1e-4"),
            ("training.learning_rate", "nan"),
            ("training.learning_rate", "inf"),
            ("training.weight_decay", "-0.1"),
            ("training.adam_beta1", "1.0"),
            ("training.adam_beta2", "-0.5"),
            ("training.adam_epsilon", "0"),
            ("training.lr_num_cycles", "0"),
            ("training.lr_min", "-1e-6"),
            ("training.lr_min", "1e-3"),
            ("training.max_grad_norm", "-1"),
            ("training.max_sequence_length", "0"),
            ("training.log_every_n_steps", "0"),
            ("training.epochs", "0"),
            ("checkpoint.keep_last", "0"),
            ("distributed.min_workers", "0"),
            ("distributed.rendezvous_timeout_s", "0"),
            ("distributed.heartbeat_interval_s", "0"),
            ("distributed.heartbeat_timeout_s", "5"),
            ("sample.steps", "0"),
            ("sample.width", "1000"),
            ("sample.height", "0"),
            ("status.listen", "localhost"),
            ("eval.holdout", "-0.1"),
            ("eval.holdout", "2.5"),
            ("eval.every_n_steps", "10"),
            ("eval.turbo_steps", "1001"),
            ("eval.shift", "-1"),
        ];
        for (key, value) in cases {
            let mut c = job();
            let err = c.set_dotted(key, value).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
            assert_eq!(c, job(), "{key} = {value} changed the job");
        }
        let mut c = job();
        c.distributed.min_workers = 4;
        c.distributed.max_workers = 2;
        assert!(c.validate().unwrap_err().to_string().contains("`distributed.max_workers`"));
        let err = job().set_dotted("sample.every_n_steps", "100").unwrap_err().to_string();
        assert!(err.contains("`sample.prompts`"), "{err}");
    }

    #[test]
    fn edge_values_in_range_are_accepted() {
        let mut c = job();
        for (key, value) in [
            ("training.max_steps", "100"),
            ("training.epochs", "0"),
            ("training.lr_warmup_steps", "1000"),
            ("training.max_grad_norm", "0"),
            ("training.lr_min", "1e-4"),
            ("training.weight_decay", "0"),
            ("run_name", "sweep-3_lr5e-5.v2"),
            ("run_name", "sweep-3/unified_lr5e-5"),
            ("sample.prompts", "[\"a cat\"]"),
            ("sample.every_n_steps", "100"),
            ("distributed.max_workers", "8"),
            ("status.listen", "0.0.0.0:8080"),
            ("status.listen", "\"\""),
        ] {
            c.set_dotted(key, value).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        }
        assert_eq!(c.training.total_steps(50), 100);
        assert_eq!(job().training.total_steps(50), 500);
        assert_eq!(c.status.address().unwrap(), None);
    }

    fn customised() -> Config {
        let mut c = Config::new("s3://bucket/runs", "/models/z-image-turbo.safetensors", "/data/cache");
        c.seed = 7;
        c.run_name = "style-v2".into();
        c.model.dtype = ModelDtype::Bf16;
        c.model.config = Some("/models/config.json".into());
        c.lora.targets = vec![LoraTarget::FeedForward, LoraTarget::ToQ];
        c.lora.blocks = vec![LoraBlock::Layers];
        c.loss.loss_mode = LossMode::Unified;
        c.training.learning_rate = 5e-5;
        c.training.adam_epsilon = 1e-7;
        c.training.lr_min = 3.3e-7;
        c.training.scheduler = LrScheduler::CosineWithRestarts;
        c.training.optimizer = Optimizer::AdamW8bit;
        c.checkpoint.resume = Resume::Never;
        c.distributed.collective = Collective::Nccl;
        c.sample.prompts = vec!["a \"quoted\" cat".into(), "a dog\nover two lines".into()];
        c.sample.every_n_steps = 250;
        c.storage.endpoint = Some("http://127.0.0.1:9000".into());
        c.storage.addressing = Some(Addressing::VirtualHosted);
        c.storage.options.insert("aws_conditional_put".into(), "disabled".into());
        c
    }

    #[test]
    fn printed_config_parses_back_to_itself() {
        for c in [job(), customised()] {
            let text = c.to_toml_string().unwrap();
            assert_eq!(Config::parse(&text, "printed").unwrap(), c, "{text}");
        }
        let text = job().to_toml_string().unwrap();
        for key in ["seed = 42", "dtype = \"auto\"", "[acrf]", "pool = 4", "max_nonfinite_steps = 5", "[sample]"] {
            assert!(text.contains(key), "{key} missing from\n{text}");
        }
    }

    #[test]
    fn turbo_keys_are_validated_and_leave_jobs_without_them_unchanged() {
        let base = Config::new("out", "model", "data");
        let text = base.to_toml_string().unwrap();
        // Absent at their defaults, so a job that does not use them keeps its training hash.
        for key in ["caption_dropout", "[[model.adapters]]", "[preservation]"] {
            assert!(!text.contains(key), "{key} in {text}");
        }
        let mut c = base.clone();
        let err = c.set_dotted("data.caption_dropout", "1.5").unwrap_err().to_string();
        assert!(err.contains("data.caption_dropout") && err.contains("[0, 1]"), "{err}");
        c.set_dotted("data.caption_dropout", "0.2").unwrap();
        assert_eq!(base.diff_training(&c), ["data.caption_dropout"]);
        c.set_dotted("preservation", "{ data = \"pres\" }").unwrap();
        let p = c.preservation.clone().unwrap();
        assert_eq!((p.weight, p.ratio), (1.0, 0.25));
        let err = c.set_dotted("preservation.ratio", "2").unwrap_err().to_string();
        assert!(err.contains("preservation.ratio"), "{err}");
        c.set_dotted("sample.reference_steps", "0").unwrap();
        assert_eq!(
            base.diff_training(&c),
            ["data.caption_dropout", "preservation.data", "preservation.ratio", "preservation.weight"]
        );
        let err = c
            .set_dotted("model.adapters", "[{ path = \"/nonexistent/ta.safetensors\", strength = inf }]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.adapters[0].strength"), "{err}");
        c.set_dotted("model.adapters", "[{ path = \"/nonexistent/ta.safetensors\" }]").unwrap();
        let err = c.hash_adapters().unwrap_err().to_string();
        assert!(err.contains("model.adapters[0].path") && err.contains("sha256"), "{err}");
        c.model.adapters[0].sha256 = Some("sha256:00".into());
        c.hash_adapters().unwrap();
    }

    #[test]
    fn credentials_are_redacted_in_the_printed_config_only() {
        let mut c = customised();
        let secrets = [
            ("aws_secret_access_key", "AKIA-very-secret"),
            ("AWS_SESSION_TOKEN", "session-token-value"),
            ("azure_storage_account_key", "account-key-value"),
            ("azure_storage_sas_token", "sas-value"),
            ("google_service_account_key", "{\"private_key\": \"pem\"}"),
            ("client_secret", "client-secret-value"),
            ("proxy_password", "hunter2"),
        ];
        for (key, value) in secrets {
            c.storage.options.insert(key.into(), value.into());
        }
        let printed = c.to_toml_string().unwrap();
        for (key, value) in secrets {
            assert!(!printed.contains(value), "{key}'s value printed:\n{printed}");
        }
        assert_eq!(printed.matches(REDACTED).count(), secrets.len(), "{printed}");
        let back = Config::parse(&printed, "printed").unwrap();
        assert_eq!(back.storage.options["aws_conditional_put"], "disabled", "other options are kept");
        assert_eq!(back.storage.options["client_secret"], REDACTED);
        assert_eq!(back.training_hash(), c.training_hash());
        let carried = Config::parse(&c.to_toml_string_with_credentials().unwrap(), "assignment").unwrap();
        assert_eq!(carried, c);
    }

    /// The keys the README's config table documents: a row's first cell names keys in backticks, a section's
    /// further keys without it (`training.epochs` / `max_steps`) and variants after a slash
    /// (`loss.lambda_char/mse/cos/fft`, `adam_beta1/2`).
    fn readme_keys() -> BTreeSet<String> {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let mut keys = BTreeSet::new();
        for cell in readme.lines().filter(|l| l.starts_with("| `")).filter_map(|l| l.split('|').nth(1)) {
            let mut section = "";
            for named in cell.split('`').skip(1).step_by(2) {
                let name = match named.split_once('.') {
                    Some((s, name)) => {
                        section = s;
                        name
                    }
                    None => named,
                };
                let mut variants = name.split('/');
                let first = variants.next().unwrap_or_default();
                let dotted = |n: &str| if section.is_empty() { n.to_string() } else { format!("{section}.{n}") };
                keys.insert(dotted(first));
                for v in variants {
                    let full = if v.bytes().all(|b| b.is_ascii_digit()) {
                        format!("{}{v}", first.trim_end_matches(|c: char| c.is_ascii_digit()))
                    } else {
                        format!("{}_{v}", first.rsplit_once('_').map_or(first, |(p, _)| p))
                    };
                    keys.insert(dotted(&full));
                }
            }
        }
        keys
    }

    #[test]
    fn every_key_has_a_row_in_the_readme() {
        let mut flat = BTreeMap::new();
        flatten("", serde_json::to_value(job()).unwrap(), &mut flat);
        let documented = readme_keys();
        let missing: Vec<&String> = flat.keys().filter(|k| !documented.contains(*k)).collect();
        assert!(missing.is_empty(), "no row in the README's config table for {missing:?}");
    }

    #[test]
    fn credential_keys_are_recognised_by_their_words() {
        for key in [
            "aws_secret_access_key",
            "aws_access_key_id",
            "account_key",
            "sas_token",
            "azure_storage_sas_key",
            "AZURE_STORAGE_ACCESS_KEY",
            "bearer_token",
            "google_application_credentials",
            "private_key_pem",
            "db_passwd",
            "storage.options.aws_secret_access_key",
        ] {
            assert!(is_credential_key(key), "{key}");
        }
        for key in
            ["aws_conditional_put", "region", "endpoint", "azure_storage_account_name", "monkey", "sassy", "keys"]
        {
            assert!(!is_credential_key(key), "{key}");
        }
    }

    #[test]
    fn training_hash_ignores_bookkeeping_but_not_training() {
        let base = customised();
        let hash = base.training_hash();
        assert_eq!(hash.len(), 64);
        let mut same = base.clone();
        same.output = "/elsewhere".into();
        same.run_name = "renamed".into();
        same.training.save_every_n_steps = 10;
        same.training.save_every_n_epochs = 0;
        same.training.log_every_n_steps = 20;
        same.training.max_nonfinite_steps = 0;
        same.checkpoint.keep_last = 1;
        same.checkpoint.keep_every = 1000;
        same.distributed.min_workers = 4;
        same.distributed.collective = Collective::Ring;
        same.sample.steps = 4;
        same.status.listen = String::new();
        same.storage.region = Some("eu-west-1".into());
        same.storage.allow_http = Some(true);
        same.lora.targets = vec![LoraTarget::ToQ, LoraTarget::W1, LoraTarget::W2, LoraTarget::W3, LoraTarget::W3];
        same.lora.blocks = vec![LoraBlock::Layers, LoraBlock::Layers];
        assert_eq!(same.training_hash(), hash);
        assert!(base.diff_training(&same).is_empty());

        let mut lr = base.clone();
        lr.training.learning_rate = 6e-5;
        assert_ne!(lr.training_hash(), hash);
    }

    #[test]
    fn diff_lists_changed_training_keys() {
        let base = customised();
        let mut other = base.clone();
        other.output = "/elsewhere".into();
        other.training.learning_rate = 1e-4;
        other.loss.loss_mode = LossMode::Style;
        other.model.config = None;
        other.lora.targets.push(LoraTarget::ToK);
        assert_eq!(
            base.diff_training(&other),
            ["lora.targets", "loss.loss_mode", "model.config", "training.learning_rate"]
        );
        assert_eq!(other.diff_training(&base), base.diff_training(&other));
    }

    #[test]
    fn set_dotted_applies_typed_overrides() {
        let mut c = job();
        c.set_dotted("loss.loss_mode", "style").unwrap();
        c.set_dotted("training.learning_rate", "5e-5").unwrap();
        c.set_dotted("training.batch_size", "4").unwrap();
        c.set_dotted("training.gradient_checkpointing", "false").unwrap();
        c.set_dotted("training.scheduler", "\"cosine\"").unwrap();
        c.set_dotted("lora.targets", "[\"feed_forward\", \"to_q\"]").unwrap();
        c.set_dotted("model.config", "/models/config.json").unwrap();
        c.set_dotted("seed", "1234").unwrap();
        assert_eq!(c.loss.loss_mode, LossMode::Style);
        assert_eq!(c.training.learning_rate, 5e-5);
        assert_eq!(c.training.batch_size, 4);
        assert!(!c.training.gradient_checkpointing);
        assert_eq!(c.training.scheduler, LrScheduler::Cosine);
        assert_eq!(c.lora.target_modules(), [LoraTarget::ToQ, LoraTarget::W1, LoraTarget::W2, LoraTarget::W3]);
        assert_eq!(c.model.config.as_deref(), Some("/models/config.json"));
        assert_eq!(c.seed, 1234);
    }

    #[test]
    fn set_dotted_names_bad_keys_and_values() {
        for (key, value, expected) in [
            ("training.lerning_rate", "1e-4", "unknown field `lerning_rate`"),
            ("trainng.learning_rate", "1e-4", "unknown field `trainng`"),
            ("training.batch_size", "abc", "invalid type: string \"abc\", expected usize"),
            ("loss.loss_mode", "stlye", "unknown variant `stlye`"),
            ("training", "1", "expected struct TrainingConfig"),
            ("seed.x", "1", "`seed` is a value, not a section"),
            ("training..batch_size", "1", "dotted key"),
        ] {
            let mut c = job();
            let err = c.set_dotted(key, value).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")) && err.contains(expected), "{key}={value}: {err}");
            assert_eq!(c, job());
        }
    }

    #[test]
    fn adamw8bit_is_accepted_and_announced() {
        let c = Config::parse(&format!("{MINIMAL}[training]\noptimizer = \"AdamW8bit\"\n"), "job.toml").unwrap();
        assert_eq!(c.training.optimizer, Optimizer::AdamW8bit);
        assert!(c.training.optimizer.substitution_note().unwrap().contains("trained as AdamW"));
        assert_eq!(Optimizer::AdamW.substitution_note(), None);
    }

    #[test]
    fn auto_dtype_depends_on_the_device() {
        assert_eq!(ModelDtype::Auto.resolve(true), ModelDtype::Bf16);
        assert_eq!(ModelDtype::Auto.resolve(false), ModelDtype::F32);
        assert_eq!(ModelDtype::F16.resolve(false), ModelDtype::F16);
    }

    #[test]
    fn device_memory_reads_units_and_prints_back() {
        let gib = 1u64 << 30;
        for (text, expected) in [
            ("auto", DeviceMemory::Auto),
            ("24GiB", DeviceMemory::Bytes(24 * gib)),
            ("24 GiB", DeviceMemory::Bytes(24 * gib)),
            ("1.5gib", DeviceMemory::Bytes(3 * gib / 2)),
            ("80GB", DeviceMemory::Bytes(80_000_000_000)),
            ("512MiB", DeviceMemory::Bytes(512 << 20)),
            ("1000", DeviceMemory::Bytes(1000)),
        ] {
            let parsed: DeviceMemory = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string().parse::<DeviceMemory>(), Ok(parsed), "{text} prints back");
        }
        for bad in ["", "GiB", "-1GiB", "0", "24 GiBs", "lots"] {
            assert!(bad.parse::<DeviceMemory>().is_err(), "{bad} parsed");
        }
        let mut c = job();
        c.set_dotted("compute.device_memory", "24GiB").unwrap();
        assert_eq!(c.compute.device_memory, DeviceMemory::Bytes(24 * gib));
        let err = c.set_dotted("compute.device_memory", "24 potatoes").unwrap_err().to_string();
        assert!(err.contains("`compute.device_memory`") && err.contains("potatoes"), "{err}");
    }

    #[test]
    fn compute_settings_do_not_block_a_resume() {
        let mut other = job();
        other.compute.mode = ComputeMode::Plain;
        other.compute.attention_query_chunk = 1024;
        other.compute.device_memory = DeviceMemory::Bytes(1 << 34);
        other.compute.accumulation = Accumulation::F32;
        assert!(job().diff_training(&other).is_empty());
    }

    #[test]
    fn only_the_held_out_split_of_eval_is_a_training_setting() {
        let mut other = job();
        other.eval.holdout = 0.25;
        other.eval.every_n_steps = 10;
        other.eval.turbo_steps = 4;
        other.eval.shift = 1.0;
        assert_eq!(job().diff_training(&other), ["eval.holdout"]);
        other.eval.seed = 7;
        assert_eq!(job().diff_training(&other), ["eval.holdout", "eval.seed"]);
        assert_eq!(other.eval.holdout_count(32), 8);
        other.eval.holdout = 3.0;
        assert_eq!(other.eval.holdout_count(32), 3);
    }

    #[test]
    fn load_reads_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("acrf-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, MINIMAL).unwrap();
        let mut expected = job();
        expected.resolve_relative(&dir.canonicalize().unwrap());
        assert_eq!(Config::load(&good).unwrap(), expected, "relative paths are relative to the file");
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, format!("{MINIMAL}[lora]\nnetwork_dimm = 8\n")).unwrap();
        let err = Config::load(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("network_dimm") && err.contains("line 7"), "{err}");
        let missing = Config::load(&dir.join("missing.toml")).unwrap_err().to_string();
        assert!(missing.contains("missing.toml"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
