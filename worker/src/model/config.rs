//! The transformer's hyper-parameters, read from diffusers' `config.json` or inferred from a ComfyUI file.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no Z-Image model at {0}")]
    NotFound(String),
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("model config: {0}")]
    Config(String),
    #[error("tensor `{key}` is missing (expected shape {expected:?}) in {files}")]
    MissingKey { key: String, expected: Vec<usize>, files: String },
    #[error("tensor `{key}` (shape {found:?}) in {files} is not part of the model")]
    ExtraKey { key: String, found: Vec<usize>, files: String },
    #[error("tensor `{key}` in {files} has shape {found:?}, the model expects {expected:?}")]
    Shape { key: String, expected: Vec<usize>, found: Vec<usize>, files: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Tokens of both streams are padded to a multiple of this, with learned pad tokens (diffusers'
/// `SEQ_MULTI_OF`); the padding changes the outputs, so it is part of the model, not an optimisation.
pub const SEQ_MULTIPLE: usize = 32;

/// Width of the timestep embedding that drives adaLN, capped at 256 (diffusers' `ADALN_EMBED_DIM`).
pub const ADALN_EMBED_DIM: usize = 256;

/// Hidden width of the timestep MLP.
pub const T_EMBED_MID: usize = 1024;

/// Sinusoid size of the timestep embedding.
pub const T_FREQ_DIM: usize = 256;

/// The widest `dim`, `cap_feat_dim` and `in_channels` a config may have (Z-Image Turbo: 3840, 2560, 16).
pub const MAX_WIDTH: usize = 1 << 16;

/// The most blocks a stack may have (Z-Image Turbo: 30 and 2).
pub const MAX_LAYERS: usize = 1 << 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZImageConfig {
    #[serde(default = "default_patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "default_f_patch")]
    pub all_f_patch_size: Vec<usize>,
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
    /// Set only by the Omni variant, which this trainer does not support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub siglip_feat_dim: Option<usize>,
}

fn default_patch() -> Vec<usize> {
    vec![2]
}

fn default_f_patch() -> Vec<usize> {
    vec![1]
}

impl ZImageConfig {
    /// Z-Image Turbo as released (6.15B parameters).
    pub fn z_image_turbo() -> Self {
        ZImageConfig {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1536, 512, 512],
            siglip_feat_dim: None,
        }
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Self, ModelError> {
        let cfg: ZImageConfig = serde_json::from_str(text).map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
        cfg.validate().map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.siglip_feat_dim.is_some() {
            return Err("siglip_feat_dim is set: Z-Image Omni is not supported".into());
        }
        if self.all_patch_size != [2] || self.all_f_patch_size != [1] {
            return Err(format!(
                "only patch size 2 with frame patch 1 is supported, got {:?}/{:?}",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        // Far above any released model, and low enough that every size derived from them (a block's
        // parameters, the whole model's) fits in a u64: a config file's numbers are not trusted.
        for (field, value, max) in [
            ("dim", self.dim, MAX_WIDTH),
            ("cap_feat_dim", self.cap_feat_dim, MAX_WIDTH),
            ("in_channels", self.in_channels, MAX_WIDTH),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_refiner_layers", self.n_refiner_layers, MAX_LAYERS),
        ] {
            if value > max {
                return Err(format!("{field} {value} is over {max}"));
            }
        }
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!("dim {} is not divisible by n_heads {}", self.dim, self.n_heads));
        }
        if self.n_kv_heads != self.n_heads {
            return Err(format!(
                "n_kv_heads {} != n_heads {}: grouped attention is not supported",
                self.n_kv_heads, self.n_heads
            ));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return Err("axes_dims and axes_lens must have three entries (frame, height, width)".into());
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim() || self.axes_dims.iter().any(|d| d % 2 != 0) {
            return Err(format!(
                "axes_dims {:?} must be even and sum to the head dim {}",
                self.axes_dims,
                self.head_dim()
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// SwiGLU hidden width, `int(dim / 3 * 8)` as diffusers computes it.
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    pub fn patch(&self) -> usize {
        self.all_patch_size[0]
    }

    pub fn patch_dim(&self) -> usize {
        self.patch() * self.patch() * self.all_f_patch_size[0] * self.in_channels
    }

    /// Names of every block, in execution order of the three stacks.
    pub fn block_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        names.extend((0..self.n_refiner_layers).map(|i| format!("noise_refiner.{i}")));
        names.extend((0..self.n_refiner_layers).map(|i| format!("context_refiner.{i}")));
        names.extend((0..self.n_layers).map(|i| format!("layers.{i}")));
        names
    }

    /// Every linear a LoRA may target: (module name, in features, out features).
    pub fn linear_modules(&self) -> Vec<(String, usize, usize)> {
        let (d, h) = (self.dim, self.ffn_dim());
        let mut out = Vec::new();
        for block in self.block_names() {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                out.push((format!("{block}.attention.{proj}"), d, d));
            }
            out.push((format!("{block}.feed_forward.w1"), d, h));
            out.push((format!("{block}.feed_forward.w2"), h, d));
            out.push((format!("{block}.feed_forward.w3"), d, h));
        }
        out
    }

    /// Every tensor of the base model in diffusers naming, with its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, a, hd) = (self.dim, self.adaln_dim(), self.head_dim());
        let mut out: Vec<(String, Vec<usize>)> = vec![
            ("t_embedder.mlp.0.weight".into(), vec![T_EMBED_MID, T_FREQ_DIM]),
            ("t_embedder.mlp.0.bias".into(), vec![T_EMBED_MID]),
            ("t_embedder.mlp.2.weight".into(), vec![a, T_EMBED_MID]),
            ("t_embedder.mlp.2.bias".into(), vec![a]),
            ("all_x_embedder.2-1.weight".into(), vec![d, self.patch_dim()]),
            ("all_x_embedder.2-1.bias".into(), vec![d]),
            ("cap_embedder.0.weight".into(), vec![self.cap_feat_dim]),
            ("cap_embedder.1.weight".into(), vec![d, self.cap_feat_dim]),
            ("cap_embedder.1.bias".into(), vec![d]),
            ("x_pad_token".into(), vec![1, d]),
            ("cap_pad_token".into(), vec![1, d]),
            ("all_final_layer.2-1.linear.weight".into(), vec![self.patch_dim(), d]),
            ("all_final_layer.2-1.linear.bias".into(), vec![self.patch_dim()]),
            ("all_final_layer.2-1.adaLN_modulation.1.weight".into(), vec![d, a]),
            ("all_final_layer.2-1.adaLN_modulation.1.bias".into(), vec![d]),
        ];
        for (name, fan_in, fan_out) in self.linear_modules() {
            out.push((format!("{name}.weight"), vec![fan_out, fan_in]));
        }
        for block in self.block_names() {
            for norm in ["attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"] {
                out.push((format!("{block}.{norm}.weight"), vec![d]));
            }
            if self.qk_norm {
                out.push((format!("{block}.attention.norm_q.weight"), vec![hd]));
                out.push((format!("{block}.attention.norm_k.weight"), vec![hd]));
            }
            if !block.starts_with("context_refiner") {
                out.push((format!("{block}.adaLN_modulation.0.weight"), vec![4 * d, a]));
                out.push((format!("{block}.adaLN_modulation.0.bias"), vec![4 * d]));
            }
        }
        out
    }

    /// Total parameters of the base model.
    pub fn parameter_count(&self) -> usize {
        self.tensor_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_configs_are_refused_before_anything_is_sized_by_them() {
        let base = ZImageConfig::z_image_turbo();
        let huge = [
            ZImageConfig { n_layers: usize::MAX, ..base.clone() },
            ZImageConfig { dim: 128 << 40, n_heads: 1 << 40, n_kv_heads: 1 << 40, ..base.clone() },
            ZImageConfig { cap_feat_dim: 1 << 40, ..base.clone() },
        ];
        for (cfg, field) in huge.iter().zip(["n_layers", "dim", "cap_feat_dim"]) {
            let err = ZImageConfig::from_json(&serde_json::to_string(cfg).unwrap(), "config.json").unwrap_err();
            assert!(err.to_string().contains(&format!("config.json: {field} ")), "{err}");
        }
    }

    #[test]
    fn turbo_has_six_billion_parameters() {
        let n = ZImageConfig::z_image_turbo().parameter_count();
        assert!((6.10e9..6.20e9).contains(&(n as f64)), "{n}");
    }
}
