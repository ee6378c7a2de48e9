//! Three-axis rotary position embedding (frame, height, width), rotating interleaved pairs of each head.
//!
//! Angles are built in f64 and rounded to f32 before cos/sin, and the rotation runs in f32 whatever the model
//! dtype, as diffusers does; the tables for one batch are built on the host once and shared by every block.

use candle_core::{Device, Result, Tensor};

use super::config::ZImageConfig;

/// A token's position on the three axes.
pub type Pos = [usize; 3];

/// cos/sin of every token's angles, [B, S, 1, head_dim/2], zero on batch padding.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Tables for `positions[b]` (one list per sample), padded with zeros to `len` tokens.
    pub fn new(cfg: &ZImageConfig, positions: &[Vec<Pos>], len: usize, device: &Device) -> Result<Rope> {
        let half: usize = cfg.axes_dims.iter().sum::<usize>() / 2;
        let freqs: Vec<Vec<f64>> = cfg
            .axes_dims
            .iter()
            .map(|&d| (0..d / 2).map(|j| 1.0 / cfg.rope_theta.powf((2 * j) as f64 / d as f64)).collect())
            .collect();
        let mut cos = vec![0f32; positions.len() * len * half];
        let mut sin = vec![0f32; positions.len() * len * half];
        for (b, sample) in positions.iter().enumerate() {
            for (s, pos) in sample.iter().enumerate() {
                let mut o = (b * len + s) * half;
                for (axis, f) in freqs.iter().enumerate() {
                    if pos[axis] >= cfg.axes_lens[axis] {
                        candle_core::bail!(
                            "RoPE position {} on axis {axis} exceeds axes_lens {:?}: image or caption too long",
                            pos[axis],
                            cfg.axes_lens
                        );
                    }
                    for &fj in f {
                        let angle = (pos[axis] as f64 * fj) as f32;
                        cos[o] = angle.cos();
                        sin[o] = angle.sin();
                        o += 1;
                    }
                }
            }
        }
        let shape = (positions.len(), len, 1, half);
        Ok(Rope { cos: Tensor::from_vec(cos, shape, device)?, sin: Tensor::from_vec(sin, shape, device)? })
    }

    /// Rotates pairs (x₂ᵢ, x₂ᵢ₊₁) of `x` [B, S, H, head_dim] as the complex product with e^{iθ}.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rotary(x, &self.cos, &self.sin)
    }

    /// The qk-norm `norm` (weight `w`, `eps`) and then the rotation, as one op.
    pub fn apply_normed(&self, x: &Tensor, w: &crate::ops::NormWeight, eps: f64) -> Result<Tensor> {
        crate::ops::rms_norm_rotary(x, w, eps, &self.cos, &self.sin)
    }

    /// Rows `start..start+len` of every sample.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Rope> {
        Ok(Rope { cos: self.cos.narrow(1, start, len)?, sin: self.sin.narrow(1, start, len)? })
    }
}
