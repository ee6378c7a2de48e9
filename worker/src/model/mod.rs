//! The Z-Image single-stream DiT (`ZImageTransformer2DModel`), written to match diffusers exactly and to
//! train LoRA adapters on it.
//!
//! Data flow: timestep → adaLN embedding; each latent is patchified (2×2), embedded and padded to a multiple
//! of 32 tokens with the learned `x_pad_token`; each caption is RMS-normed, embedded and padded with
//! `cap_pad_token`; the noise refiner runs on the image tokens, the context refiner on the caption tokens;
//! both are joined per sample as [image, caption] and run through the main layers; the final layer and
//! unpatchify return one output per sample. Batch padding (samples of different lengths) is masked; pad-token
//! rows are not, exactly as in diffusers, because the released model was trained that way.

mod block;
pub(crate) mod config;
mod rope;
mod weights;

use std::collections::HashMap;

use candle_core::{D, DType, Device, Result, Tensor, TensorId, Var};

pub use crate::ops::{AttentionOpts, KeyMask};
pub use block::{Block, ComputeOpts, Linear, RmsNorm};
pub use config::{ModelError, SEQ_MULTIPLE, T_EMBED_MID, T_FREQ_DIM, ZImageConfig};
pub use rope::{Pos, Rope};
pub use weights::{ModelSource, WeightFiles, random_tensors, random_weights, write_comfy_file, write_diffusers_folder};

use crate::lora::{Lora, LoraView};
use crate::ops;
use crate::profile::{self, Site};
use crate::timing::{Phase, Stopwatch};

/// Everything about a batch that does not depend on trainable weights: embeddings, RoPE tables, masks and
/// lengths. Computed once per forward without a graph, shared by the plain and the checkpointed pass.
pub struct Prepared {
    /// The timestep embedding, [B, 1, adaln_dim]: one row per sample, so every matmul on it runs per sample
    /// and a sample's numbers do not depend on how many others share its batch.
    adaln: Tensor,
    x: Tensor,
    cap: Tensor,
    x_rope: Rope,
    cap_rope: Rope,
    uni_rope: Rope,
    x_mask: Option<KeyMask>,
    cap_mask: Option<KeyMask>,
    uni_mask: Option<KeyMask>,
    x_lens: Vec<usize>,
    cap_lens: Vec<usize>,
    /// (F, H, W) of each latent.
    sizes: Vec<[usize; 3]>,
}

/// The result of one forward + backward: the loss value and one gradient per LoRA tensor, in
/// [`Lora::vars`] order.
pub struct Gradients {
    pub loss: Tensor,
    pub grads: Vec<Tensor>,
}

pub struct ZImageTransformer {
    cfg: ZImageConfig,
    t_mlp0: Linear,
    t_mlp2: Linear,
    x_embedder: Linear,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    final_linear: Linear,
    final_ada: Linear,
    dtype: DType,
    device: Device,
    pub compute: ComputeOpts,
}

impl ZImageTransformer {
    /// Loads and checks every weight; any missing, extra or misshaped tensor is an error naming it.
    pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> std::result::Result<Self, ModelError> {
        Self::load_merged(source, dtype, device, std::collections::BTreeMap::new())
    }

    /// [`ZImageTransformer::load`] with f32 `deltas` (by diffusers tensor name) merged into their weights
    /// before the rounding to `dtype`: how frozen adapters join the base (`crate::adapters`).
    pub fn load_merged(
        source: &ModelSource,
        dtype: DType,
        device: &Device,
        deltas: std::collections::BTreeMap<String, Tensor>,
    ) -> std::result::Result<Self, ModelError> {
        let mut wf = source.open(dtype, device)?;
        wf.merge(deltas);
        let model = Self::new(&source.config, &mut wf, dtype, device)?;
        wf.finish()?;
        Ok(model)
    }

    pub fn new(
        cfg: &ZImageConfig,
        wf: &mut WeightFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        cfg.validate().map_err(ModelError::Config)?;
        let (d, a) = (cfg.dim, cfg.adaln_dim());
        let blocks = |wf: &mut WeightFiles, stack: &str, n: usize, modulated: bool| {
            (0..n)
                .map(|i| Block::new(wf, &format!("{stack}.{i}"), cfg, modulated))
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        Ok(ZImageTransformer {
            t_mlp0: Linear::new(wf, "t_embedder.mlp.0", T_FREQ_DIM, config::T_EMBED_MID, true)?,
            t_mlp2: Linear::new(wf, "t_embedder.mlp.2", config::T_EMBED_MID, a, true)?,
            x_embedder: Linear::new(wf, "all_x_embedder.2-1", cfg.patch_dim(), d, true)?,
            cap_norm: RmsNorm::new(wf, "cap_embedder.0", cfg.cap_feat_dim, cfg.norm_eps)?,
            cap_linear: Linear::new(wf, "cap_embedder.1", cfg.cap_feat_dim, d, true)?,
            x_pad_token: wf.get("x_pad_token", &[1, d])?,
            cap_pad_token: wf.get("cap_pad_token", &[1, d])?,
            noise_refiner: blocks(wf, "noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks(wf, "context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks(wf, "layers", cfg.n_layers, true)?,
            final_linear: Linear::new(wf, "all_final_layer.2-1.linear", d, cfg.patch_dim(), true)?,
            final_ada: Linear::new(wf, "all_final_layer.2-1.adaLN_modulation.1", a, d, true)?,
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            compute: ComputeOpts::default(),
        })
    }

    /// Every base tensor. None is a `Var`: only LoRA tensors are trainable.
    pub fn frozen_tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.x_pad_token.clone(), self.cap_pad_token.clone()];
        for l in [&self.t_mlp0, &self.t_mlp2, &self.x_embedder, &self.cap_linear, &self.final_linear, &self.final_ada] {
            l.tensors(&mut out);
        }
        self.cap_norm.tensors(&mut out);
        for b in self.noise_refiner.iter().chain(&self.context_refiner).chain(&self.layers) {
            b.tensors(&mut out);
        }
        out
    }

    pub fn config(&self) -> &ZImageConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Raw model outputs for latents [C, F, H, W], model times `t` [B] (1 − σ) and captions [L, cap_dim].
    /// The output is the *negated* velocity (spec §1); see `flow::velocity_from_model`.
    pub fn forward(&self, latents: &[Tensor], t: &Tensor, captions: &[Tensor], lora: &LoraView) -> Result<Vec<Tensor>> {
        let p = self.prepare(latents, t, captions)?;
        let (x, cap) = self.refine(&p, lora)?;
        let mut u = self.merge(&p, &x, &cap)?;
        for block in &self.layers {
            u = block.forward(&u, p.uni_mask.as_ref(), &p.uni_rope, &p.adaln, lora, self.compute)?;
        }
        self.head(&p, &u)
    }

    /// Forward, `loss_fn` on the outputs, and backward into the LoRA tensors.
    ///
    /// With `checkpoint`, the forward keeps only each block's input and no graph; the backward recomputes one
    /// block at a time and backpropagates the surrogate Σ(y · ∂L/∂y), so at most one block's graph is alive.
    /// Both paths give the same gradients (the recompute runs the same ops on the same values). The forward,
    /// recompute and backward time is charged to `watch`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        latents: &[Tensor],
        t: &Tensor,
        captions: &[Tensor],
        lora: &Lora,
        checkpoint: bool,
        loss_fn: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>,
        watch: &mut Stopwatch,
    ) -> Result<Gradients> {
        let vars = lora.vars();
        profile::pass(Phase::Forward);
        if !checkpoint {
            let outs = self.forward(latents, t, captions, &lora.view(true, 1.0))?;
            let loss = head_loss(loss_fn, &outs)?;
            watch.lap(Phase::Forward)?;
            profile::pass(Phase::Backward);
            let store = loss.backward()?;
            let grads = vars.iter().map(|(_, v)| grad_or_zeros(&store, v)).collect::<Result<_>>()?;
            profile::end_pass();
            watch.lap(Phase::Backward)?;
            return Ok(Gradients { loss: loss.detach(), grads });
        }

        let p = self.prepare(latents, t, captions)?;
        let frozen = lora.view(false, 1.0);
        // A refiner without adapters needs no backward, so neither its inputs nor its output are kept.
        let adapted =
            |stack: &str| lora.modules.keys().any(|m| m.strip_prefix(stack).is_some_and(|r| r.starts_with('.')));
        let (noise, context) = (adapted("noise_refiner"), adapted("context_refiner"));
        let run = |blocks: &[Block], x: &Tensor, mask: Option<&KeyMask>, rope: &Rope, keep: bool| {
            let mut inputs = Vec::with_capacity(blocks.len());
            let mut h = x.clone();
            for b in blocks {
                if keep {
                    inputs.push(h.clone());
                }
                h = b.forward(&h, mask, rope, &p.adaln, &frozen, self.compute)?;
            }
            Ok::<_, candle_core::Error>((inputs, h))
        };
        let (x_in, x) = run(&self.noise_refiner, &p.x, p.x_mask.as_ref(), &p.x_rope, noise)?;
        let (c_in, cap) = run(&self.context_refiner, &p.cap, p.cap_mask.as_ref(), &p.cap_rope, context)?;
        let (u_in, u) = run(&self.layers, &self.merge(&p, &x, &cap)?, p.uni_mask.as_ref(), &p.uni_rope, true)?;
        let refined = (noise || context).then_some((x, cap));

        // The loss is detached once its gradient is out, so the head's graph is not kept through the blocks'
        // backward.
        let (loss, mut gu) = {
            let u_var = Var::from_tensor(&u)?;
            let loss = head_loss(loss_fn, &self.head(&p, u_var.as_tensor())?)?;
            watch.lap(Phase::Forward)?;
            profile::pass(Phase::Backward);
            let store = {
                let _span = profile::span(Site::EmbedHead);
                loss.backward()?
            };
            (loss.detach(), grad_or_zeros(&store, &u_var)?)
        };
        drop(u);
        watch.lap(Phase::Backward)?;

        let tracked = lora.view(true, 1.0);
        let mut found: HashMap<TensorId, Tensor> = HashMap::new();
        let mut back = |blocks: &[Block], inputs: &[Tensor], mut g: Tensor, mask: Option<&KeyMask>, rope: &Rope| {
            for (b, input) in blocks.iter().zip(inputs).rev() {
                let xv = Var::from_tensor(input)?;
                profile::pass(Phase::Recompute);
                let y = b.forward(xv.as_tensor(), mask, rope, &p.adaln, &tracked, self.compute)?;
                watch.lap(Phase::Recompute)?;
                profile::pass(Phase::Backward);
                let store = (y * &g)?.sum_all()?.backward()?;
                for (_, v) in &vars {
                    if let Some(gv) = store.get(v.as_tensor()) {
                        found.insert(v.as_tensor().id(), gv.clone());
                    }
                }
                g = grad_or_zeros(&store, &xv)?;
                watch.lap(Phase::Backward)?;
            }
            Ok::<Tensor, candle_core::Error>(g)
        };
        gu = back(&self.layers, &u_in, gu, p.uni_mask.as_ref(), &p.uni_rope)?;
        drop(u_in);
        if let Some((x, cap)) = refined {
            let (xv, cv) = (Var::from_tensor(&x)?, Var::from_tensor(&cap)?);
            let store = (self.merge(&p, xv.as_tensor(), cv.as_tensor())? * &gu)?.sum_all()?.backward()?;
            let (gx, gc) = (grad_or_zeros(&store, &xv)?, grad_or_zeros(&store, &cv)?);
            drop(store);
            if noise {
                back(&self.noise_refiner, &x_in, gx, p.x_mask.as_ref(), &p.x_rope)?;
            }
            if context {
                back(&self.context_refiner, &c_in, gc, p.cap_mask.as_ref(), &p.cap_rope)?;
            }
        }
        profile::end_pass();
        let grads = vars
            .iter()
            .map(|(_, v)| match found.remove(&v.as_tensor().id()) {
                Some(g) => Ok(g),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<Result<_>>()?;
        Ok(Gradients { loss, grads })
    }

    fn refine(&self, p: &Prepared, lora: &LoraView) -> Result<(Tensor, Tensor)> {
        let mut x = p.x.clone();
        for block in &self.noise_refiner {
            x = block.forward(&x, p.x_mask.as_ref(), &p.x_rope, &p.adaln, lora, self.compute)?;
        }
        let mut cap = p.cap.clone();
        for block in &self.context_refiner {
            cap = block.forward(&cap, p.cap_mask.as_ref(), &p.cap_rope, &p.adaln, lora, self.compute)?;
        }
        Ok((x, cap))
    }

    /// Embeds and pads the batch. Nothing here is trainable, so no graph is built.
    pub fn prepare(&self, latents: &[Tensor], t: &Tensor, captions: &[Tensor]) -> Result<Prepared> {
        let _span = profile::span(Site::EmbedHead);
        let n = latents.len();
        if n == 0 || captions.len() != n || t.dims() != [n] {
            candle_core::bail!("batch mismatch: {} latents, {} captions, t of shape {:?}", n, captions.len(), t.dims());
        }
        let adaln = self.timestep_embedding(t)?;
        let pad_to = |len: usize| len.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE;

        let mut caps = Vec::with_capacity(n);
        let mut cap_pos = Vec::with_capacity(n);
        for (i, c) in captions.iter().enumerate() {
            let (len, feat) = c.dims2()?;
            if feat != self.cfg.cap_feat_dim || len == 0 {
                candle_core::bail!("caption {i} has shape {:?}, expected [L > 0, {}]", c.dims(), self.cfg.cap_feat_dim);
            }
            let padded = pad_to(len);
            let emb = self.cap_linear.forward(
                &self.cap_norm.forward(&c.to_dtype(self.dtype)?, self.compute.fused_norm)?,
                &LoraView::none(),
            )?;
            caps.push(Tensor::cat(&[emb, self.cap_pad_token.repeat((padded - len, 1))?], 0)?);
            cap_pos.push((0..padded).map(|j| [1 + j, 0, 0]).collect::<Vec<Pos>>());
        }

        let mut xs = Vec::with_capacity(n);
        let mut x_pos = Vec::with_capacity(n);
        let mut sizes = Vec::with_capacity(n);
        let ph = self.cfg.patch();
        for (i, lat) in latents.iter().enumerate() {
            let (c, f, h, w) = lat.dims4()?;
            if c != self.cfg.in_channels || h % ph != 0 || w % ph != 0 {
                candle_core::bail!(
                    "latent {i} has shape {:?}, expected [{}, F, H, W] with H and W divisible by {ph}",
                    lat.dims(),
                    self.cfg.in_channels
                );
            }
            sizes.push([f, h, w]);
            let tokens = self.patchify(&lat.to_dtype(self.dtype)?)?;
            let len = tokens.dim(0)?;
            let padded = pad_to(len);
            let emb = self.x_embedder.forward(&tokens, &LoraView::none())?;
            xs.push(Tensor::cat(&[emb, self.x_pad_token.repeat((padded - len, 1))?], 0)?);
            let frame0 = caps[i].dim(0)? + 1;
            let (hh, ww) = (h / ph, w / ph);
            let mut pos: Vec<Pos> = (0..f * hh * ww).map(|k| [frame0 + k / (hh * ww), (k / ww) % hh, k % ww]).collect();
            pos.resize(padded, [0, 0, 0]);
            x_pos.push(pos);
        }

        let x_lens: Vec<usize> = xs.iter().map(|x| x.dim(0)).collect::<Result<_>>()?;
        let cap_lens: Vec<usize> = caps.iter().map(|c| c.dim(0)).collect::<Result<_>>()?;
        let uni_lens: Vec<usize> = x_lens.iter().zip(&cap_lens).map(|(a, b)| a + b).collect();
        let uni_pos: Vec<Vec<Pos>> =
            x_pos.iter().zip(&cap_pos).map(|(x, c)| x.iter().chain(c.iter()).copied().collect()).collect();
        let max = |l: &[usize]| l.iter().copied().max().unwrap_or(0);
        Ok(Prepared {
            x: self.pad_batch(&xs)?,
            cap: self.pad_batch(&caps)?,
            x_rope: Rope::new(&self.cfg, &x_pos, max(&x_lens), &self.device)?,
            cap_rope: Rope::new(&self.cfg, &cap_pos, max(&cap_lens), &self.device)?,
            uni_rope: Rope::new(&self.cfg, &uni_pos, max(&uni_lens), &self.device)?,
            x_mask: KeyMask::new(&x_lens, &self.device)?,
            cap_mask: KeyMask::new(&cap_lens, &self.device)?,
            uni_mask: KeyMask::new(&uni_lens, &self.device)?,
            x_lens,
            cap_lens,
            sizes,
            adaln,
        })
    }

    /// Joins each sample's refined image and caption tokens as [image, caption], padded across the batch.
    /// Differentiable: the checkpointed backward runs it with a graph.
    pub fn merge(&self, p: &Prepared, x: &Tensor, cap: &Tensor) -> Result<Tensor> {
        let rows = (0..p.x_lens.len())
            .map(|i| Tensor::cat(&[x.get(i)?.narrow(0, 0, p.x_lens[i])?, cap.get(i)?.narrow(0, 0, p.cap_lens[i])?], 0))
            .collect::<Result<Vec<_>>>()?;
        self.pad_batch(&rows)
    }

    /// Final layer on the unified tokens, then each sample's image tokens back to [C, F, H, W].
    pub fn head(&self, p: &Prepared, u: &Tensor) -> Result<Vec<Tensor>> {
        let _span = profile::span(Site::EmbedHead);
        let scale = (self.final_ada.forward(&p.adaln.silu()?, &LoraView::none())? + 1.0)?;
        let h = ops::layer_norm_no_affine(u, 1e-6)?.broadcast_mul(&scale)?;
        let out = self.final_linear.forward(&h, &LoraView::none())?;
        let ph = self.cfg.patch();
        p.sizes
            .iter()
            .enumerate()
            .map(|(i, &[f, hh, ww])| {
                let (ht, wt) = (hh / ph, ww / ph);
                out.get(i)?
                    .narrow(0, 0, f * ht * wt)?
                    .reshape(vec![f, ht, wt, ph, ph, self.cfg.in_channels])?
                    .permute([5, 0, 1, 3, 2, 4])?
                    .contiguous()?
                    .reshape((self.cfg.in_channels, f, hh, ww))
            })
            .collect()
    }

    /// [C, F, H, W] → [F·(H/2)·(W/2), 2·2·C], channel-last within each patch as diffusers orders it (the
    /// frame patch is 1, so its axis is left out).
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (c, f, h, w) = x.dims4()?;
        let p = self.cfg.patch();
        x.reshape(vec![c, f, h / p, p, w / p, p])?
            .permute([1, 2, 4, 3, 5, 0])?
            .contiguous()?
            .reshape((f * (h / p) * (w / p), p * p * c))
    }

    /// The adaLN input: sinusoid of `t · t_scale` (cos half first), then the MLP.
    ///
    /// The frequencies are computed in f32 step by step as torch does: the arguments reach 1000 rad, where one
    /// ulp of difference in a frequency moves cos by ~1e-4, so "more precise" f64 frequencies would drift
    /// from the reference rather than towards it.
    fn timestep_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let half = T_FREQ_DIM / 2;
        let freqs: Vec<f32> = (0..half).map(|j| ((-(10000f64.ln()) as f32 * j as f32) / half as f32).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, 1, half), &self.device)?;
        let ts = (t.to_dtype(DType::F32)? * self.cfg.t_scale)?.reshape((t.dim(0)?, 1, 1))?;
        let args = ts.broadcast_mul(&freqs)?;
        let emb = Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(self.dtype)?;
        let hidden = self.t_mlp0.forward(&emb, &LoraView::none())?.silu()?;
        self.t_mlp2.forward(&hidden, &LoraView::none())
    }

    fn pad_batch(&self, rows: &[Tensor]) -> Result<Tensor> {
        let max = rows.iter().map(|r| r.dim(0)).collect::<Result<Vec<_>>>()?.into_iter().max().unwrap_or(0);
        let padded = rows
            .iter()
            .map(|r| {
                let len = r.dim(0)?;
                if len == max { Ok(r.clone()) } else { r.pad_with_zeros(0, 0, max - len) }
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&padded, 0)
    }
}

/// The loss of the model's outputs, charged to the head's site.
fn head_loss(loss_fn: &mut dyn FnMut(&[Tensor]) -> Result<Tensor>, outs: &[Tensor]) -> Result<Tensor> {
    let _span = profile::span(Site::EmbedHead);
    loss_fn(outs)
}

fn grad_or_zeros(store: &candle_core::backprop::GradStore, v: &Var) -> Result<Tensor> {
    match store.get(v.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => v.as_tensor().zeros_like(),
    }
}
