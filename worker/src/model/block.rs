//! One Z-Image transformer block: qk-normed attention with 3-axis RoPE and a SwiGLU feed-forward, each
//! wrapped in RMSNorm sandwiches, modulated by the timestep (adaLN scale and tanh gates) except in the
//! context refiner.

use acrf_common::config::{ComputeConfig, ComputeMode};
use candle_core::{D, Result, Tensor};

type LoadResult<T> = std::result::Result<T, ModelError>;

use super::config::{ModelError, ZImageConfig};
use super::rope::Rope;
use super::weights::WeightFiles;
use crate::lora::LoraView;
use crate::ops::{self, AttentionOpts, KeyMask, NormWeight};
use crate::profile::{self, Site};

/// A frozen linear that may carry a LoRA adapter, found by its diffusers module name.
pub struct Linear {
    name: String,
    site: Site,
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    pub fn new(wf: &mut WeightFiles, name: &str, fan_in: usize, fan_out: usize, bias: bool) -> LoadResult<Self> {
        let w = wf.get(&format!("{name}.weight"), &[fan_out, fan_in])?;
        let b = if bias { Some(wf.get(&format!("{name}.bias"), &[fan_out])?) } else { None };
        Ok(Linear { name: name.to_string(), site: Site::of_linear(name), w, b })
    }

    pub fn forward(&self, x: &Tensor, lora: &LoraView) -> Result<Tensor> {
        let _span = profile::span(self.site);
        match lora.adapter(&self.name) {
            Some((a, b, scale)) => ops::lora_linear(x, &self.w, self.b.as_ref(), a, b, scale),
            None => ops::frozen_linear(x, &self.w, self.b.as_ref()),
        }
    }

    pub fn tensors(&self, out: &mut Vec<Tensor>) {
        out.push(self.w.clone());
        out.extend(self.b.clone());
    }
}

pub struct RmsNorm {
    w: NormWeight,
    eps: f64,
}

impl RmsNorm {
    pub fn new(wf: &mut WeightFiles, name: &str, dim: usize, eps: f64) -> LoadResult<Self> {
        Ok(RmsNorm { w: NormWeight::new(&wf.get(&format!("{name}.weight"), &[dim])?)?, eps })
    }

    pub fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        self.forward_scaled(x, fused, None)
    }

    /// The norm times `scale`, broadcast over the rows (adaLN's scale or gate).
    pub fn forward_scaled(&self, x: &Tensor, fused: bool, scale: Option<&Tensor>) -> Result<Tensor> {
        let _span = profile::span(Site::Norm);
        if fused {
            return ops::rms_norm_fused(x, &self.w, self.eps, scale);
        }
        let y = ops::rms_norm(x, self.w.tensor(), self.eps)?;
        match scale {
            Some(s) => ops::scale_rows(&y, s),
            None => Ok(y),
        }
    }

    /// `residual` plus the norm of `x` times `scale`: the end of each half of a block.
    fn forward_residual(&self, residual: &Tensor, x: &Tensor, fused: bool, scale: Option<&Tensor>) -> Result<Tensor> {
        let _span = profile::span(Site::Norm);
        if fused {
            return ops::rms_norm_residual(residual, x, &self.w, self.eps, scale);
        }
        residual + self.forward_scaled(x, false, scale)?
    }

    /// The norm and then `rope`'s rotation.
    fn forward_rotary(&self, x: &Tensor, fused: bool, rope: &Rope) -> Result<Tensor> {
        let _span = profile::span(Site::QkNormRope);
        if fused { rope.apply_normed(x, &self.w, self.eps) } else { rope.apply(&self.forward(x, false)?) }
    }

    pub fn tensors(&self, out: &mut Vec<Tensor>) {
        out.push(self.w.tensor().clone());
    }
}

/// How the blocks evaluate attention and norms. The default is the plain composed path that the parity tests
/// pin to diffusers; the lean pieces give the same values and gradients with less memory kept for the
/// backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ComputeOpts {
    pub attention: AttentionOpts,
    /// RMSNorm through candle's fused kernel with an analytic backward that skips the frozen weight.
    pub fused_norm: bool,
}

impl ComputeOpts {
    /// Every lean piece on, attention in tiles where a kernel exists and otherwise one head at a time: at
    /// 1024² (S ≈ 4350) one head's f32 scores are 76 MB where all 30 heads' are 2.3 GB, and the query rows
    /// stay whole so each head costs few launches.
    pub fn lean() -> Self {
        let attention = AttentionOpts { head_chunk: 1, query_chunk: 0, fused: true, tiled: true };
        ComputeOpts { attention, fused_norm: true }
    }

    /// What a job's `[compute]` section asks for.
    pub fn from_config(c: &ComputeConfig) -> Self {
        match c.mode {
            ComputeMode::Plain => ComputeOpts::default(),
            ComputeMode::Lean => {
                let attention = AttentionOpts {
                    head_chunk: c.attention_head_chunk,
                    query_chunk: c.attention_query_chunk,
                    fused: true,
                    tiled: true,
                };
                ComputeOpts { attention, ..ComputeOpts::lean() }
            }
        }
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Option<RmsNorm>,
    norm_k: Option<RmsNorm>,
    n_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(wf: &mut WeightFiles, prefix: &str, cfg: &ZImageConfig) -> LoadResult<Self> {
        let (d, hd) = (cfg.dim, cfg.head_dim());
        let p = |n: &str| format!("{prefix}.attention.{n}");
        // diffusers builds the qk-norm with a fixed eps of 1e-5, independent of `norm_eps`.
        let qk_norm = |wf: &mut WeightFiles, n: &str| -> LoadResult<Option<RmsNorm>> {
            if cfg.qk_norm { Ok(Some(RmsNorm::new(wf, &p(n), hd, 1e-5)?)) } else { Ok(None) }
        };
        Ok(Attention {
            to_q: Linear::new(wf, &p("to_q"), d, d, false)?,
            to_k: Linear::new(wf, &p("to_k"), d, d, false)?,
            to_v: Linear::new(wf, &p("to_v"), d, d, false)?,
            to_out: Linear::new(wf, &p("to_out.0"), d, d, false)?,
            norm_q: qk_norm(wf, "norm_q")?,
            norm_k: qk_norm(wf, "norm_k")?,
            n_heads: cfg.n_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&KeyMask>,
        rope: &Rope,
        lora: &LoraView,
        opts: ComputeOpts,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let heads = |t: Tensor| t.reshape((b, s, self.n_heads, self.head_dim));
        let (q, k) = (heads(self.to_q.forward(x, lora)?)?, heads(self.to_k.forward(x, lora)?)?);
        let v = heads(self.to_v.forward(x, lora)?)?;
        let (q, k) = match (&self.norm_q, &self.norm_k) {
            (Some(nq), Some(nk)) => {
                (nq.forward_rotary(&q, opts.fused_norm, rope)?, nk.forward_rotary(&k, opts.fused_norm, rope)?)
            }
            _ => {
                let _span = profile::span(Site::QkNormRope);
                (rope.apply(&q)?, rope.apply(&k)?)
            }
        };
        // diffusers masks only batch padding: pad-token rows attend and are attended to.
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let o = {
            let _span = profile::span(Site::Attention);
            ops::attention(&q, &k, &v, mask, scale, opts.attention)?
        };
        self.to_out.forward(&o.reshape((b, s, self.n_heads * self.head_dim))?, lora)
    }

    fn tensors(&self, out: &mut Vec<Tensor>) {
        for l in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            l.tensors(out);
        }
        for n in self.norm_q.iter().chain(&self.norm_k) {
            n.tensors(out);
        }
    }
}

struct FeedForward {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForward {
    fn new(wf: &mut WeightFiles, prefix: &str, cfg: &ZImageConfig) -> LoadResult<Self> {
        let (d, h) = (cfg.dim, cfg.ffn_dim());
        let p = |n: &str| format!("{prefix}.feed_forward.{n}");
        Ok(FeedForward {
            w1: Linear::new(wf, &p("w1"), d, h, false)?,
            w2: Linear::new(wf, &p("w2"), h, d, false)?,
            w3: Linear::new(wf, &p("w3"), d, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor, lora: &LoraView) -> Result<Tensor> {
        let (a, b) = (self.w1.forward(x, lora)?, self.w3.forward(x, lora)?);
        let gated = {
            let _span = profile::span(Site::FeedForward);
            ops::swiglu(&a, &b)?
        };
        self.w2.forward(&gated, lora)
    }

    fn tensors(&self, out: &mut Vec<Tensor>) {
        for l in [&self.w1, &self.w2, &self.w3] {
            l.tensors(out);
        }
    }
}

pub struct Block {
    attention: Attention,
    feed_forward: FeedForward,
    attention_norm1: RmsNorm,
    attention_norm2: RmsNorm,
    ffn_norm1: RmsNorm,
    ffn_norm2: RmsNorm,
    ada_ln: Option<Linear>,
    dim: usize,
}

impl Block {
    pub fn new(wf: &mut WeightFiles, prefix: &str, cfg: &ZImageConfig, modulated: bool) -> LoadResult<Self> {
        let norm = |wf: &mut WeightFiles, n: &str| RmsNorm::new(wf, &format!("{prefix}.{n}"), cfg.dim, cfg.norm_eps);
        Ok(Block {
            attention: Attention::new(wf, prefix, cfg)?,
            feed_forward: FeedForward::new(wf, prefix, cfg)?,
            attention_norm1: norm(wf, "attention_norm1")?,
            attention_norm2: norm(wf, "attention_norm2")?,
            ffn_norm1: norm(wf, "ffn_norm1")?,
            ffn_norm2: norm(wf, "ffn_norm2")?,
            ada_ln: if modulated {
                Some(Linear::new(wf, &format!("{prefix}.adaLN_modulation.0"), cfg.adaln_dim(), 4 * cfg.dim, true)?)
            } else {
                None
            },
            dim: cfg.dim,
        })
    }

    /// Every frozen tensor of the block.
    pub fn tensors(&self, out: &mut Vec<Tensor>) {
        self.attention.tensors(out);
        self.feed_forward.tensors(out);
        for n in [&self.attention_norm1, &self.attention_norm2, &self.ffn_norm1, &self.ffn_norm2] {
            n.tensors(out);
        }
        if let Some(a) = &self.ada_ln {
            a.tensors(out);
        }
    }

    /// `x` [B, S, D]; `adaln` [B, 1, adaln_dim] for modulated blocks.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&KeyMask>,
        rope: &Rope,
        adaln: &Tensor,
        lora: &LoraView,
        opts: ComputeOpts,
    ) -> Result<Tensor> {
        let norm = |n: &RmsNorm, x: &Tensor| n.forward(x, opts.fused_norm);
        let residual = |n: &RmsNorm, r: &Tensor, x: &Tensor, s| n.forward_residual(r, x, opts.fused_norm, s);
        let Some(ada_ln) = &self.ada_ln else {
            let attn = self.attention.forward(&norm(&self.attention_norm1, x)?, mask, rope, lora, opts)?;
            let x = residual(&self.attention_norm2, x, &attn, None)?;
            let ffn = self.feed_forward.forward(&norm(&self.ffn_norm1, &x)?, lora)?;
            return residual(&self.ffn_norm2, &x, &ffn, None);
        };
        let modulation = profile::span(Site::Modulation);
        let m = ada_ln.forward(adaln, &LoraView::none())?;
        let chunk = |i: usize| m.narrow(D::Minus1, i * self.dim, self.dim);
        let (scale_msa, gate_msa) = ((chunk(0)? + 1.0)?, chunk(1)?.tanh()?);
        let (scale_mlp, gate_mlp) = ((chunk(2)? + 1.0)?, chunk(3)?.tanh()?);
        drop(modulation);
        let scaled = |n: &RmsNorm, x: &Tensor, s: &Tensor| n.forward_scaled(x, opts.fused_norm, Some(s));
        let attn = self.attention.forward(&scaled(&self.attention_norm1, x, &scale_msa)?, mask, rope, lora, opts)?;
        let x = residual(&self.attention_norm2, x, &attn, Some(&gate_msa))?;
        let ffn = self.feed_forward.forward(&scaled(&self.ffn_norm1, &x, &scale_mlp)?, lora)?;
        residual(&self.ffn_norm2, &x, &ffn, Some(&gate_mlp))
    }
}
