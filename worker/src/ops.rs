//! Differentiable building blocks that candle either lacks or gets wrong for training.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `layer_norm` have no backward and silently cut the
//! gradient, so the plain path here is built from ops whose backward exists. Matmul's backward also computes
//! the gradient of the (frozen) weight, which at full size is gigabytes of garbage per step, and a composed
//! op keeps every intermediate alive until the backward. The lean ops therefore compute their value without
//! a graph and attach a hand-written backward that returns only the gradients training needs.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor};

use crate::kernels::{self, Logits};

/// The backward of a value computed outside the graph from one input.
trait Grad1: Send + Sync + 'static {
    const NAME: &'static str;
    /// dL/dx from the input, the value and dL/dvalue, all detached.
    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor>;
}

/// The backward of a value computed outside the graph from three inputs.
trait Grad3: Send + Sync + 'static {
    const NAME: &'static str;
    /// The gradients of the inputs that `want` marks, from the inputs, the value and dL/dvalue, all detached;
    /// `None` for the others, which nothing reads.
    fn grads(&self, inputs: [&Tensor; 3], y: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]>;
}

/// The backward of a value computed outside the graph from two inputs.
trait Grad2: Send + Sync + 'static {
    const NAME: &'static str;
    /// The gradients of both inputs, from the inputs, the value and dL/dvalue, all detached.
    fn grads(&self, a: &Tensor, b: &Tensor, y: &Tensor, g: &Tensor) -> Result<[Tensor; 2]>;
}

/// A precomputed value entered into the graph as the output of a custom op whose backward is `R`.
///
/// A custom op must return fresh storage, so the value is copied once; the op takes it out of its slot when
/// candle runs the forward, so the graph keeps the copy alone rather than both. The backward sees detached
/// tensors: ops on the inputs would otherwise record a graph that keeps every temporary of the backward alive
/// until the inputs' own gradients are consumed.
struct Attach<R> {
    value: Mutex<Option<Tensor>>,
    rule: R,
}

impl<R> Attach<R> {
    fn new(value: Tensor, rule: R) -> Result<Self> {
        // Storage clones copy the whole buffer and ignore the layout, so the value must begin its buffer.
        let value = if value.is_contiguous() && value.layout().start_offset() == 0 {
            value
        } else {
            value.force_contiguous()?
        };
        Ok(Attach { value: Mutex::new(Some(value)), rule })
    }

    fn output<S: BackendStorage>(&self, name: &str, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        let value = self.value.lock().unwrap_or_else(PoisonError::into_inner).take();
        let value = value.ok_or_else(|| candle_core::Error::Msg(format!("{name}: the forward ran twice")))?;
        let (storage, layout) = value.storage_and_layout();
        let storage = pick(&storage)
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: the value is on another device than the op")))?;
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

fn cpu_storage(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage(s: &Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

impl<R: Grad1> CustomOp1 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(R::NAME, cuda_storage)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rule.grad(&x.detach(), &y.detach(), &g.detach())?))
    }
}

impl<R: Grad2> CustomOp2 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(R::NAME, cuda_storage)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.rule.grads(&a.detach(), &b.detach(), &y.detach(), &g.detach())?;
        Ok((a.track_op().then_some(ga), b.track_op().then_some(gb)))
    }
}

impl<R: Grad3> CustomOp3 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output(R::NAME, cuda_storage)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // candle would store a gradient for an untracked input too, where nothing reads it.
        let want = [a.track_op(), b.track_op(), c.track_op()];
        let [ga, gb, gc] = self.rule.grads([&a.detach(), &b.detach(), &c.detach()], &y.detach(), &g.detach(), want)?;
        Ok((ga, gb, gc))
    }
}

/// `value`, computed from `x` without a graph, with the backward `rule` towards `x`.
fn attach1<R: Grad1>(x: &Tensor, value: Tensor, rule: R) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Attach::new(value, rule)?)
}

/// `value`, computed from `a` and `b` without a graph, with the backward `rule` towards both.
fn attach2<R: Grad2>(a: &Tensor, b: &Tensor, value: Tensor, rule: R) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return Ok(value);
    }
    a.apply_op2(b, Attach::new(value, rule)?)
}

/// `value`, computed from `a`, `b` and `c` without a graph, with the backward `rule` towards all three.
fn attach3<R: Grad3>(a: &Tensor, b: &Tensor, c: &Tensor, value: Tensor, rule: R) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    a.apply_op3(b, c, Attach::new(value, rule)?)
}

/// `x · m` for x [B, S, K] and m [K, N], one sample at a time.
///
/// A broadcast matmul folds the batch into the rows of one GEMM, whose blocking (and so its rounding) depends
/// on the row count: the same sample would come out a few ulps different in a batch of 4 than in a batch of
/// 2, and those ulps grow through the blocks. Per sample, a sample's numbers depend only on the sample, so
/// accumulating micro-batches reproduces one large batch.
pub fn batch_invariant_matmul(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    match x.dims() {
        [b, _, _] if *b > 1 => Tensor::stack(&(0..*b).map(|i| x.get(i)?.matmul(m)).collect::<Result<Vec<_>>>()?, 0),
        _ => x.broadcast_matmul(m),
    }
}

/// `x · Wᵀ (+ b)` where W and b are frozen: the backward pass returns only dL/dx = g · W.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    attach1(x, linear_value(&x.detach(), w, b)?, LinearGrad { w: w.clone() })
}

fn linear_value(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = batch_invariant_matmul(x, &w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A frozen linear with a LoRA adapter, `x · Wᵀ (+ b) + s · (x Aᵀ) Bᵀ`, as one graph node. The adapter runs
/// in f32 and its output is added in x's dtype, as peft does.
///
/// Composed, the adapter is five graph nodes, each of which keeps its output for the backward and pays
/// candle's zero-fill-and-add per gradient it passes on; here the graph keeps x Aᵀ alone ([.., r], small)
/// and the backward is five matmuls.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let xd = x.detach();
    let xa = batch_invariant_matmul(&xd.to_dtype(DType::F32)?, &a.detach().t()?)?;
    let delta = (batch_invariant_matmul(&xa, &b.detach().t()?)? * scale)?.to_dtype(x.dtype())?;
    let y = (linear_value(&xd, w, bias)? + delta)?;
    attach3(x, a, b, y, LoraLinearGrad { w: w.clone(), xa, scale })
}

struct LoraLinearGrad {
    w: Tensor,
    /// x Aᵀ in f32.
    xa: Tensor,
    scale: f64,
}

impl Grad3 for LoraLinearGrad {
    const NAME: &'static str = "lora-linear";

    /// With gs = s·g in f32 and rows flattened over the batch: dx = g W + (gs B) A, dA = (gs B)ᵀ x,
    /// dB = gsᵀ (x Aᵀ).
    fn grads(&self, [x, a, b]: [&Tensor; 3], _y: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
        let rows = |t: &Tensor| t.reshape(((), t.dim(D::Minus1)?));
        let gs = (g.to_dtype(DType::F32)? * self.scale)?;
        let dxa = batch_invariant_matmul(&gs, b)?;
        let dx = match want[0] {
            true => {
                Some((batch_invariant_matmul(g, &self.w)? + batch_invariant_matmul(&dxa, a)?.to_dtype(g.dtype())?)?)
            }
            false => None,
        };
        let da = match want[1] {
            true => Some(rows(&dxa)?.t()?.matmul(&rows(&x.to_dtype(DType::F32)?)?)?),
            false => None,
        };
        let db = match want[2] {
            true => Some(rows(&gs)?.t()?.matmul(&rows(&self.xa)?)?),
            false => None,
        };
        Ok([dx, da, db])
    }
}

struct LinearGrad {
    w: Tensor,
}

impl Grad1 for LinearGrad {
    const NAME: &'static str = "frozen-linear";

    fn grad(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        batch_invariant_matmul(g, &self.w)
    }
}

/// RMSNorm over the last dimension with statistics in f32, as diffusers' `RMSNorm` does:
/// `x / sqrt(mean(x²) + eps) · weight`, cast back to the input dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let ms = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// [`rms_norm`] through candle's fused kernel, with an analytic backward towards `x` only.
///
/// The composed version keeps five f32 temporaries of x's size per norm for its backward and stores an
/// x-sized gradient for the broadcast frozen weight; this one keeps its output alone and recomputes the row
/// statistics in the backward.
///
/// `scale`, broadcast over the rows (adaLN's per-sample scale or gate), multiplies the output inside the same
/// op, so that its product is not kept as one more x-sized tensor with a gradient for the frozen scale.
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64, scale: Option<&Tensor>) -> Result<Tensor> {
    let y = rms_norm_value(&x.detach(), weight, eps)?;
    let y = match scale {
        Some(s) => y.broadcast_mul(s)?,
        None => y,
    };
    attach1(x, y, RmsNormGrad { w: weight.to_dtype(DType::F32)?, eps, scale: scale.map(Tensor::detach) })
}

/// [`rms_norm`]'s value through candle's fused kernel.
fn rms_norm_value(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    let unit = Tensor::ones(weight.dims1()?, DType::F32, x.device())?;
    // The weight multiplies after the cast back, as in diffusers, so half precision rounds as the composed
    // path does.
    candle_nn::ops::rms_norm(&xf, &unit, eps as f32)?.to_dtype(x.dtype())?.broadcast_mul(weight)
}

/// The qk-norm followed by the rotary embedding ([`rotary`]) as one graph node: the pair keeps one tensor
/// for the backward instead of two.
pub fn rms_norm_rotary(x: &Tensor, weight: &Tensor, eps: f64, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rotary = RotaryGrad { cos: cos.clone(), sin: sin.clone() };
    let value = rotary.rotate(&rms_norm_value(&x.detach(), weight, eps)?, false)?;
    let norm = RmsNormGrad { w: weight.to_dtype(DType::F32)?, eps, scale: None };
    attach1(x, value, NormRotaryGrad { norm, rotary })
}

struct NormRotaryGrad {
    norm: RmsNormGrad,
    rotary: RotaryGrad,
}

impl Grad1 for NormRotaryGrad {
    const NAME: &'static str = "rms-norm-rotary";

    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.norm.grad(x, y, &self.rotary.rotate(g, true)?)
    }
}

struct RmsNormGrad {
    /// The weight in f32.
    w: Tensor,
    eps: f64,
    scale: Option<Tensor>,
}

impl Grad1 for RmsNormGrad {
    const NAME: &'static str = "rms-norm";

    /// For y = x·r·w with r = (mean(x²) + eps)^(-1/2), ∂r/∂xⱼ = −r³·xⱼ/n, so
    /// dx = r·(g·w) − x·r³·mean(g·w·x); a scale multiplies g first.
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let g = match &self.scale {
            Some(s) => g.broadcast_mul(s)?,
            None => g.clone(),
        };
        let gw = g.to_dtype(DType::F32)?.broadcast_mul(&self.w)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let r3_dot = ((&gw * &xf)?.mean_keepdim(D::Minus1)? * r.powf(3.0)?)?;
        (gw.broadcast_mul(&r)? - xf.broadcast_mul(&r3_dot)?)?.to_dtype(x.dtype())
    }
}

/// Rotary embedding of `x` [B, S, H, D]: each pair (x₂ᵢ, x₂ᵢ₊₁) times e^{iθ}, with cos θ and sin θ given as
/// [B, S, 1, D/2] f32; computed in f32 and returned in x's dtype. Its backward is the rotation by −θ, so the
/// graph keeps nothing of the ten composed ops it takes.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rule = RotaryGrad { cos: cos.clone(), sin: sin.clone() };
    attach1(x, rule.rotate(&x.detach(), false)?, rule)
}

struct RotaryGrad {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryGrad {
    /// Rotation by θ, or by −θ when `inverse`.
    fn rotate(&self, x: &Tensor, inverse: bool) -> Result<Tensor> {
        let (b, s, h, d) = x.dims4()?;
        let pairs = x.to_dtype(DType::F32)?.reshape((b, s, h, d / 2, 2))?;
        let re = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let im = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let (re_cos, im_sin) = (re.broadcast_mul(&self.cos)?, im.broadcast_mul(&self.sin)?);
        let (re_sin, im_cos) = (re.broadcast_mul(&self.sin)?, im.broadcast_mul(&self.cos)?);
        let (out_re, out_im) =
            if inverse { ((re_cos + im_sin)?, (im_cos - re_sin)?) } else { ((re_cos - im_sin)?, (re_sin + im_cos)?) };
        Tensor::stack(&[out_re, out_im], 4)?.reshape((b, s, h, d))?.to_dtype(x.dtype())
    }
}

impl Grad1 for RotaryGrad {
    const NAME: &'static str = "rotary";

    fn grad(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        self.rotate(g, true)
    }
}

/// `x` times `s`, broadcast over the rows: adaLN's scale or gate.
///
/// As a composed product, candle also computes and keeps an x-sized gradient for the broadcast view of the
/// frozen `s`, which nothing reads.
pub fn scale_rows(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    attach1(x, x.detach().broadcast_mul(s)?, ScaleRowsGrad { s: s.detach() })
}

struct ScaleRowsGrad {
    s: Tensor,
}

impl Grad1 for ScaleRowsGrad {
    const NAME: &'static str = "scale-rows";

    fn grad(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        g.broadcast_mul(&self.s)
    }
}

/// SwiGLU's gate silu(a)·b as one graph node: composed, silu and the product keep two [.., ffn] tensors for
/// the backward and take four passes there; this keeps its inputs alone.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.detach(), b.detach());
    let value = match kernels::swiglu(&ad, &bd)? {
        Some(h) => h,
        None => (ad.silu()? * bd)?,
    };
    attach2(a, b, value, SwigluGrad)
}

struct SwigluGrad;

impl Grad2 for SwigluGrad {
    const NAME: &'static str = "swiglu";

    /// With σ = sigmoid(a): da = g·b·σ·(1 + a·(1 − σ)), db = g·silu(a).
    fn grads(&self, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<[Tensor; 2]> {
        if let Some((da, db)) = kernels::swiglu_grad(a, b, g)? {
            return Ok([da, db]);
        }
        let sigma = candle_nn::ops::sigmoid(a)?;
        let dsilu = (&sigma * ((a * (1.0 - &sigma)?)? + 1.0)?)?;
        Ok([(g * b)?.mul(&dsilu)?, (g * a.silu()?)?])
    }
}

/// LayerNorm without affine parameters over the last dimension (biased variance), statistics in f32.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// exp(x − rowmax(x)) and the row max; the max is a constant for autograd since softmax does not depend on it.
fn shifted_exp(xf: &Tensor) -> Result<(Tensor, Tensor)> {
    let max = xf.max_keepdim(D::Minus1)?.detach();
    Ok((xf.broadcast_sub(&max)?.exp()?, max))
}

/// Softmax over the last dimension in f32 from ops that all have a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let (e, _) = shifted_exp(&x.to_dtype(DType::F32)?)?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}

/// How attention is evaluated. Chunking bounds the score tensor that is alive at once to
/// [B, head_chunk, query_chunk, S]; the default is the plain composed path in one piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttentionOpts {
    /// Heads per chunk; 0 takes all heads at once.
    pub head_chunk: usize,
    /// Query rows per chunk; 0 takes all rows at once.
    pub query_chunk: usize,
    /// One op with a recomputing backward instead of composed ops. The composed path keeps every chunk's
    /// probabilities for the backward, so chunking it only helps without a graph (inference); the fused op
    /// keeps q, k, v, the output and one log-sum-exp per row, and recomputes a chunk's scores when needed.
    pub fused: bool,
}

/// softmax(q kᵀ·scale + mask) v for q, k, v [B, S, H, Dh] as the projections lay them out, the softmax in
/// f32; the output is [B, S, H, Dh] too. `mask` is an additive [B, 1, 1, S] with −∞ on keys that are batch
/// padding; every row must keep at least one key.
///
/// Taking the token-major layout saves the graph a head-major copy of each of q, k, v and the output: each
/// chunk gathers its heads anyway.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    opts: AttentionOpts,
) -> Result<Tensor> {
    let (_, s, h, _) = q.dims4()?;
    if opts.fused {
        return fused_attention(q, k, v, mask, scale, opts);
    }
    let [o] = over_grid((h, s), opts, [Over::TokenRows], |hr, qr| {
        let p = softmax_last_dim(&logits(&rows(q, hr, qr)?, &heads(k, hr)?, mask, scale)?)?;
        Ok([p.to_dtype(v.dtype())?.matmul(&heads(v, hr)?)?])
    })?;
    Ok(o)
}

fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    opts: AttentionOpts,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (_, s, h, _) = q.dims4()?;
    let [o, lse] = over_grid((h, s), opts, [Over::TokenRows, Over::Rows], |hr, qr| {
        let (p, lse) = softmax_with_lse(&rows(&qd, hr, qr)?, &heads(&kd, hr)?, mask, scale)?;
        Ok([p.to_dtype(vd.dtype())?.matmul(&heads(&vd, hr)?)?, lse])
    })?;
    attach3(q, k, v, o, AttentionGrad { lse, mask: mask.cloned(), scale, opts })
}

struct AttentionGrad {
    /// log Σ exp(logits) of every query row, head-major [B, H, S, 1] in f32: with it a chunk's
    /// probabilities are one exp of its recomputed logits.
    lse: Tensor,
    mask: Option<Tensor>,
    scale: f64,
    opts: AttentionOpts,
}

impl Grad3 for AttentionGrad {
    const NAME: &'static str = "attention";

    /// Per chunk, with P = exp(S − lse) and D = rowsum(dO ∘ O) = rowsum(P ∘ dP):
    /// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − D), dQ = scale·dS K, dK = scale·dSᵀ Q.
    fn grads(&self, [q, k, v]: [&Tensor; 3], o: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
        let (_, s, h, _) = q.dims4()?;
        let dtype = q.dtype();
        let grads = over_grid((h, s), self.opts, [Over::TokenRows, Over::TokenSum, Over::TokenSum], |hr, qr| {
            let (qc, kc, vc, gc) = (rows(q, hr, qr)?, heads(k, hr)?, heads(v, hr)?, rows(g, hr, qr)?);
            let raw = qc.matmul(&kc.t()?)?;
            let (mask, lse) = (self.mask.as_ref(), self.lse.narrow(1, hr.0, hr.1)?.narrow(2, qr.0, qr.1)?);
            let p = match kernels::probabilities(&Logits { raw: &raw, scale: self.scale, mask }, &lse)? {
                Some(p) => p,
                None => scale_and_mask(&raw, mask, self.scale)?.broadcast_sub(&lse)?.exp()?,
            };
            let dv = p.to_dtype(dtype)?.t()?.matmul(&gc)?;
            let dp = gc.matmul(&vc.t()?)?.to_dtype(DType::F32)?;
            let d = (gc.to_dtype(DType::F32)? * rows(o, hr, qr)?.to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)?;
            let ds = match kernels::softmax_grad(&p, &dp, &d, self.scale)? {
                Some(ds) => ds.to_dtype(dtype)?,
                None => ((p * dp.broadcast_sub(&d)?)?.to_dtype(dtype)? * self.scale)?,
            };
            Ok([ds.matmul(&kc)?, ds.t()?.matmul(&qc)?, dv])
        })?;
        Ok(std::array::from_fn(|i| want[i].then(|| grads[i].clone())))
    }
}

/// q kᵀ·scale in f32 plus the additive key mask.
fn logits(q: &Tensor, k: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    scale_and_mask(&q.matmul(&k.t()?)?, mask, scale)
}

/// raw·scale in f32 plus the additive key mask.
fn scale_and_mask(raw: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let s = (raw * scale)?.to_dtype(DType::F32)?;
    match mask {
        Some(m) => s.broadcast_add(m),
        None => Ok(s),
    }
}

/// softmax(q kᵀ·scale + mask) in f32 and the log-sum-exp of each row.
fn softmax_with_lse(q: &Tensor, k: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<(Tensor, Tensor)> {
    let raw = q.matmul(&k.t()?)?;
    if let Some(out) = kernels::softmax(&Logits { raw: &raw, scale, mask })? {
        return Ok(out);
    }
    let (e, max) = shifted_exp(&scale_and_mask(&raw, mask, scale)?)?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok((e.broadcast_div(&sum)?, (max + sum.log()?)?))
}

/// Heads `h` of a token-major [B, S, H, Dh] tensor as a contiguous head-major [B, h, S, Dh]: matmul cannot
/// stride over a batch of partial heads.
fn heads(t: &Tensor, (h0, nh): (usize, usize)) -> Result<Tensor> {
    t.narrow(2, h0, nh)?.transpose(1, 2)?.contiguous()
}

/// Heads `h` and rows `r` of a token-major [B, S, H, Dh] tensor, as a contiguous head-major [B, h, r, Dh].
fn rows(t: &Tensor, (h0, nh): (usize, usize), (r0, nr): (usize, usize)) -> Result<Tensor> {
    t.narrow(2, h0, nh)?.narrow(1, r0, nr)?.transpose(1, 2)?.contiguous()
}

/// How one head-major result [B, h, r, ..] of a chunk combines into the whole.
#[derive(Clone, Copy, PartialEq)]
enum Over {
    /// The chunk's rows of a head-major [B, H, S, ..] result.
    Rows,
    /// The chunk's rows of a token-major [B, S, H, ..] result.
    TokenRows,
    /// A contribution from the chunk's rows to a whole token-major result (key and value gradients).
    TokenSum,
}

/// Runs `f(heads, query rows)` on every chunk of the (head, query) grid, each as (start, len), and assembles
/// each of its results over the query blocks and the heads as `over` says.
fn over_grid<const N: usize>(
    (h, s): (usize, usize),
    opts: AttentionOpts,
    over: [Over; N],
    mut f: impl FnMut((usize, usize), (usize, usize)) -> Result<[Tensor; N]>,
) -> Result<[Tensor; N]> {
    let mut by_head: [Vec<Tensor>; N] = std::array::from_fn(|_| Vec::new());
    for hr in pieces(h, opts.head_chunk) {
        let mut by_query: [Vec<Tensor>; N] = std::array::from_fn(|_| Vec::new());
        for qr in pieces(s, opts.query_chunk) {
            for ((parts, t), over) in by_query.iter_mut().zip(f(hr, qr)?).zip(over) {
                match over {
                    Over::Rows | Over::TokenRows => parts.push(t),
                    Over::TokenSum => {
                        let sum = match parts.pop() {
                            Some(acc) => (acc + t)?,
                            None => t,
                        };
                        parts.push(sum);
                    }
                }
            }
        }
        for ((parts, joined), over) in by_query.into_iter().zip(by_head.iter_mut()).zip(over) {
            let head_major = join(parts, 2)?;
            joined.push(if over == Over::Rows { head_major } else { head_major.transpose(1, 2)? });
        }
    }
    let mut out = Vec::with_capacity(N);
    for (parts, over) in by_head.into_iter().zip(over) {
        out.push(join(parts, if over == Over::Rows { 1 } else { 2 })?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!("one result per slot")))
}

fn join(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 { Ok(parts.remove(0)) } else { Tensor::cat(&parts, dim) }
}

/// (start, len) pieces covering `0..total`, each at most `size` long; `size` 0 is one piece.
fn pieces(total: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let size = if size == 0 { total.max(1) } else { size };
    (0..total).step_by(size).map(move |start| (start, size.min(total - start)))
}

#[cfg(test)]
mod tests {
    use acrf_common::rng::{Key, domain, fill_normal_f32};
    use candle_core::{Device, Var};

    use super::*;

    fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
        let mut v = vec![0f32; shape.iter().product()];
        fill_normal_f32(Key::new(seed, domain::MODEL_INIT, 0, 0), &mut v);
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// max |a − b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn all_finite(t: &Tensor) -> Result<bool> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
    }

    /// Σ(f(inputs) · r) backpropagated: the value and the gradient of every input.
    fn value_and_grads(
        inputs: &[Tensor],
        dtype: DType,
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype)?)).collect::<Result<Vec<_>>>()?;
        let y = f(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
        let r = randn(99, y.dims())?.to_dtype(dtype)?;
        let store = (&y * r)?.sum_all()?.backward()?;
        let grads = vars.iter().map(|v| store.get(v.as_tensor()).cloned().expect("every input gets a gradient"));
        Ok((y, grads.collect()))
    }

    #[test]
    fn fused_rms_norm_matches_the_composed_one() -> Result<()> {
        let x = (randn(1, &[2, 5, 48])? * 3.0)?;
        let w = (randn(2, &[48])? + 1.0)?;
        // In bf16 both round once after the f32 statistics and once after the weight: the values are identical.
        for (dtype, value_tol, grad_tol) in [(DType::F32, 1e-5, 1e-5), (DType::BF16, 0.0, 1e-2)] {
            let w = w.to_dtype(dtype)?;
            let (y0, g0) = value_and_grads(std::slice::from_ref(&x), dtype, |t| rms_norm(&t[0], &w, 1e-5))?;
            let (y1, g1) = value_and_grads(std::slice::from_ref(&x), dtype, |t| rms_norm_fused(&t[0], &w, 1e-5, None))?;
            assert_eq!((y1.dtype(), g1[0].dtype()), (dtype, dtype));
            let (ey, eg) = (rel_err(&y1, &y0)?, rel_err(&g1[0], &g0[0])?);
            println!("{dtype:?}: value error {ey:.2e}, gradient error {eg:.2e}");
            assert!(ey <= value_tol && eg <= grad_tol, "{dtype:?}: value error {ey:e}, gradient error {eg:e}");
        }
        Ok(())
    }

    /// Each fused op against the same function composed of candle's ops, whose gradients candle's autodiff
    /// derives: values and the gradient of every tracked input agree to 1e-5 relative in f32.
    #[test]
    fn fused_ops_match_their_composed_versions() -> Result<()> {
        type Case<'a> = (
            &'a str,
            Vec<Tensor>,
            Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>,
            Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>,
        );
        let (w, bias) = (randn(20, &[7, 12])?, randn(21, &[7])?);
        let (a, b) = (randn(22, &[3, 12])?, randn(23, &[7, 3])?);
        let x = randn(24, &[2, 5, 12])?;
        let norm_w = (randn(25, &[12])? + 1.0)?;
        let s = randn(26, &[2, 1, 12])?;
        let angles = randn(27, &[2, 5, 1, 3])?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let rot = RotaryGrad { cos: cos.clone(), sin: sin.clone() };
        let heads = randn(28, &[2, 5, 2, 6])?;
        let composed_linear = |x: &Tensor| x.broadcast_matmul(&w.t()?)?.broadcast_add(&bias);
        let cases: Vec<Case> = vec![
            (
                "frozen_linear",
                vec![x.clone()],
                Box::new(|t| frozen_linear(&t[0], &w, Some(&bias))),
                Box::new(|t| composed_linear(&t[0])),
            ),
            (
                "lora_linear",
                vec![x.clone(), a.clone(), b.clone()],
                Box::new(|t| lora_linear(&t[0], &w, Some(&bias), &t[1], &t[2], 0.5)),
                Box::new(|t| {
                    let delta = t[0].broadcast_matmul(&t[1].t()?)?.broadcast_matmul(&t[2].t()?)?;
                    composed_linear(&t[0])? + (delta * 0.5)?
                }),
            ),
            (
                "rms_norm_fused with a scale",
                vec![x.clone()],
                Box::new(|t| rms_norm_fused(&t[0], &norm_w, 1e-5, Some(&s))),
                Box::new(|t| rms_norm(&t[0], &norm_w, 1e-5)?.broadcast_mul(&s)),
            ),
            ("scale_rows", vec![x.clone()], Box::new(|t| scale_rows(&t[0], &s)), Box::new(|t| t[0].broadcast_mul(&s))),
            (
                "swiglu",
                vec![randn(29, &[2, 5, 40])?, randn(30, &[2, 5, 40])?],
                Box::new(|t| swiglu(&t[0], &t[1])),
                Box::new(|t| t[0].silu()? * &t[1]),
            ),
            (
                "rotary",
                vec![heads.clone()],
                Box::new(|t| rotary(&t[0], &cos, &sin)),
                Box::new(|t| rot.rotate(&t[0], false)),
            ),
            (
                "rms_norm_rotary",
                vec![heads.clone()],
                Box::new(|t| rms_norm_rotary(&t[0], &norm_w.narrow(0, 0, 6)?, 1e-5, &cos, &sin)),
                Box::new(|t| rot.rotate(&rms_norm(&t[0], &norm_w.narrow(0, 0, 6)?, 1e-5)?, false)),
            ),
        ];
        for (name, inputs, fused, composed) in cases {
            let (y0, g0) = value_and_grads(&inputs, DType::F32, composed)?;
            let (y1, g1) = value_and_grads(&inputs, DType::F32, fused)?;
            let value = rel_err(&y1, &y0)?;
            let grad = g1.iter().zip(&g0).map(|(a, b)| rel_err(a, b)).try_fold(0f32, |m, e| e.map(|e| m.max(e)))?;
            println!("{name}: value error {value:.2e}, worst gradient error {grad:.2e}");
            assert!(value <= 1e-5 && grad <= 1e-5, "{name}: value error {value:e}, gradient error {grad:e}");
        }
        Ok(())
    }

    /// The composed norm's backward multiplies by the weight's broadcast view and stores a gradient for that
    /// view, x-sized, which nothing reads; the fused one leaves x's gradient alone in the store.
    #[test]
    fn fused_rms_norm_computes_no_weight_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(3, &[4, 16])?)?;
        let w = randn(4, &[16])?;
        let composed = rms_norm(x.as_tensor(), &w, 1e-5)?.sum_all()?.backward()?;
        let garbage: Vec<_> = composed.get_ids().filter(|&&id| id != x.as_tensor().id()).collect();
        assert_eq!(garbage.len(), 1, "the composed norm stores one gradient for the weight");
        assert_eq!(composed.get_id(*garbage[0]).map(|g| g.dims().to_vec()), Some(vec![4, 16]));
        let fused = rms_norm_fused(x.as_tensor(), &w, 1e-5, None)?.sum_all()?.backward()?;
        assert_eq!(fused.get_ids().collect::<Vec<_>>(), [&x.as_tensor().id()]);
        Ok(())
    }

    /// q, k, v [2, 11, 3, 8] (11 tokens, 3 heads) and a key mask that pads the second sample from 7 tokens.
    fn attention_case() -> Result<(Vec<Tensor>, Tensor)> {
        let qkv = (0..3).map(|i| randn(10 + i, &[2, 11, 3, 8])).collect::<Result<Vec<_>>>()?;
        let mask: Vec<f32> = (0..2 * 11).map(|i| if i >= 11 + 7 { f32::NEG_INFINITY } else { 0.0 }).collect();
        Ok((qkv, Tensor::from_vec(mask, (2, 1, 1, 11), &Device::Cpu)?))
    }

    #[test]
    fn chunked_and_fused_attention_match_the_plain_one() -> Result<()> {
        let (qkv, mask) = attention_case()?;
        let scale = 1.0 / 8f64.sqrt();
        let run = |opts: AttentionOpts| {
            value_and_grads(&qkv, DType::F32, |t| attention(&t[0], &t[1], &t[2], Some(&mask), scale, opts))
        };
        let (o0, g0) = run(AttentionOpts::default())?;
        let chunkings = [(0, 0), (1, 0), (2, 0), (0, 4), (0, 11), (2, 4), (1, 1)];
        let mut worst = (0f32, 0f32);
        for fused in [false, true] {
            for (head_chunk, query_chunk) in chunkings {
                let opts = AttentionOpts { head_chunk, query_chunk, fused };
                let (o, g) = run(opts)?;
                let err = rel_err(&o, &o0)?;
                worst.0 = worst.0.max(err);
                assert!(err <= 1e-6, "{opts:?}: output differs by {err:e}");
                for (name, (a, b)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g0)) {
                    assert!(all_finite(a)?, "{opts:?}: d{name} is not finite");
                    let err = rel_err(a, b)?;
                    worst.1 = worst.1.max(err);
                    assert!(err <= 1e-5, "{opts:?}: d{name} differs by {err:e}");
                }
            }
        }
        println!("worst relative error: output {:.2e}, gradients {:.2e}", worst.0, worst.1);
        Ok(())
    }

    #[test]
    fn fused_attention_runs_in_bf16() -> Result<()> {
        let (qkv, mask) = attention_case()?;
        let run = |dtype: DType, fused: bool| {
            let opts = AttentionOpts { head_chunk: 2, query_chunk: 4, fused };
            value_and_grads(&qkv, dtype, |t| attention(&t[0], &t[1], &t[2], Some(&mask), 0.35, opts))
        };
        let (o32, g32) = run(DType::F32, true)?;
        for fused in [false, true] {
            let (o, g) = run(DType::BF16, fused)?;
            assert_eq!(o.dtype(), DType::BF16);
            let err = rel_err(&o, &o32)?;
            println!("fused {fused}: bf16 output off by {err:.2e}");
            assert!(err <= 2e-2, "fused {fused}: bf16 output is off by {err:e}");
            for (a, b) in g.iter().zip(&g32) {
                assert_eq!(a.dtype(), DType::BF16);
                let err = rel_err(a, b)?;
                println!("fused {fused}: bf16 gradient off by {err:.2e}");
                assert!(err <= 2e-2, "fused {fused}: bf16 gradient is off by {err:e}");
            }
        }
        Ok(())
    }

    #[test]
    fn only_tracked_attention_inputs_get_gradients() -> Result<()> {
        let (qkv, mask) = attention_case()?;
        let q = Var::from_tensor(&qkv[0])?;
        let opts = AttentionOpts { head_chunk: 1, query_chunk: 4, fused: true };
        let store = attention(q.as_tensor(), &qkv[1], &qkv[2], Some(&mask), 0.35, opts)?.sum_all()?.backward()?;
        assert_eq!(store.get_ids().collect::<Vec<_>>(), [&q.as_tensor().id()]);
        Ok(())
    }

    #[test]
    fn untracked_inputs_build_no_graph() -> Result<()> {
        let (qkv, _) = attention_case()?;
        let opts = AttentionOpts { fused: true, ..AttentionOpts::default() };
        assert!(!attention(&qkv[0], &qkv[1], &qkv[2], None, 0.35, opts)?.track_op());
        assert!(!rms_norm_fused(&qkv[0], &randn(5, &[8])?, 1e-5, None)?.track_op());
        Ok(())
    }
}
