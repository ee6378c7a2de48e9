//! The transformer's hyper-parameters, read from diffusers' `config.json` or inferred from a ComfyUI file.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// Tokens of both streams are padded to a multiple of this, with learned pad tokens (diffusers'
/// `SEQ_MULTI_OF`); the padding changes the outputs, so it is part of the model, not an optimisation.
pub const SEQ_MULTIPLE: usize = 32;

/// Width of the timestep embedding that drives adaLN, capped at 256 (diffusers' `ADALN_EMBED_DIM`).
pub const ADALN_EMBED_DIM: usize = 256;

/// Hidden width of the timestep MLP.
pub const T_EMBED_MID: usize = 1024;

/// Sinusoid size of the timestep embedding.
pub const T_FREQ_DIM: usize = 256;

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
        let cfg: ZImageConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
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
        if self.n_heads == 0 || self.dim % self.n_heads != 0 {
            return Err(format!("dim {} is not divisible by n_heads {}", self.dim, self.n_heads));
        }
        if self.n_kv_heads != self.n_heads {
            return Err(format!("n_kv_heads {} != n_heads {}: grouped attention is not supported", self.n_kv_heads, self.n_heads));
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

    /// Total parameters of the base model.
    pub fn parameter_count(&self) -> usize {
        let (d, a) = (self.dim, self.adaln_dim());
        let block = 4 * d * d + 3 * d * self.ffn_dim() + 4 * d + 2 * self.head_dim();
        let modulation = a * 4 * d + 4 * d;
        let blocks = (self.n_layers + 2 * self.n_refiner_layers) * block + (self.n_layers + self.n_refiner_layers) * modulation;
        let t_embed = T_FREQ_DIM * T_EMBED_MID + T_EMBED_MID + T_EMBED_MID * a + a;
        let embed = self.cap_feat_dim + self.cap_feat_dim * d + d + self.patch_dim() * d + d + 2 * d;
        let final_layer = d * self.patch_dim() + self.patch_dim() + a * d + d;
        blocks + t_embed + embed + final_layer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo_has_six_billion_parameters() {
        let n = ZImageConfig::z_image_turbo().parameter_count();
        assert!((6.10e9..6.20e9).contains(&(n as f64)), "{n}");
    }
}
