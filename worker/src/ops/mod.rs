//! Differentiable building blocks that candle either lacks or gets wrong for training.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `layer_norm` have no backward and silently cut the
//! gradient, so the plain path here is built from ops whose backward exists. Matmul's backward also computes
//! the gradient of the (frozen) weight, which at full size is gigabytes of garbage per step, and a composed
//! op keeps every intermediate alive until the backward. The lean ops therefore compute their value without
//! a graph and attach a hand-written backward that returns only the gradients training needs.

use candle_core::{D, DType, Result, Tensor};

mod attention;
mod graph;
mod tiled;

pub use attention::{AttentionOpts, KeyMask, attention};
use graph::{Grad1, Grad2, Grad3, Value, attach1, attach2, attach3};

use crate::kernels;
use crate::profile::{self, Site};

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

/// A frozen linear with a LoRA adapter, `x · Wᵀ (+ b) + (s · x Aᵀ) Bᵀ`, as one graph node. The adapter runs
/// in f32 and its output is added in x's dtype, as peft does.
///
/// Composed, the adapter is five graph nodes, each of which keeps its output for the backward and pays
/// candle's zero-fill-and-add per gradient it passes on; here the graph keeps s · x Aᵀ alone ([.., r], small)
/// and the backward is five matmuls. The scale s multiplies the rank-r activations, not the model-wide
/// output or its gradient, which saves two passes over [.., d_out] f32 per adapter.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let xd = x.detach();
    let base = linear_value(&xd, w, bias)?;
    // The span ends before the node is made, so that the backward is charged to the linear's own site.
    let (xs, delta) = {
        let _span = profile::span(Site::Lora);
        let xs = (batch_invariant_matmul(&xd.to_dtype(DType::F32)?, &a.detach().t()?)? * scale)?;
        let delta = batch_invariant_matmul(&xs, &b.detach().t()?)?.to_dtype(x.dtype())?;
        (xs, delta)
    };
    let y = (base + delta)?;
    attach3(x, a, b, y, LoraLinearGrad { w: w.clone(), xs, scale })
}

struct LoraLinearGrad {
    w: Tensor,
    /// s · x Aᵀ in f32.
    xs: Tensor,
    scale: f64,
}

impl Grad3 for LoraLinearGrad {
    const NAME: &'static str = "lora-linear";

    /// With g in f32 and rows flattened over the batch, and dxa = s · g B: dx = g W + dxa A, dA = dxaᵀ x,
    /// dB = gᵀ (s · x Aᵀ).
    fn grads(&self, [x, a, b]: [&Tensor; 3], _y: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
        let rows = |t: &Tensor| t.reshape(((), t.dim(D::Minus1)?));
        let base = if want[0] { Some(batch_invariant_matmul(g, &self.w)?) } else { None };
        let _span = profile::span(Site::Lora);
        let gf = g.to_dtype(DType::F32)?;
        let dxa = (batch_invariant_matmul(&gf, b)? * self.scale)?;
        let dx = match base {
            Some(base) => Some((base + batch_invariant_matmul(&dxa, a)?.to_dtype(g.dtype())?)?),
            None => None,
        };
        let da = match want[1] {
            true => Some(rows(&dxa)?.t()?.matmul(&rows(&x.to_dtype(DType::F32)?)?)?),
            false => None,
        };
        let db = match want[2] {
            true => Some(rows(&gf)?.t()?.matmul(&rows(&self.xs)?)?),
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

/// An RMSNorm weight in the forms the ops need, made once at load rather than at every call: as loaded (the
/// model dtype, which the output is multiplied by), in f32 (the CPU backward's), and a unit weight of the same
/// size for candle's fused kernel, which runs without the weight so that half precision rounds as the
/// composed path does.
#[derive(Clone)]
pub struct NormWeight {
    w: Tensor,
    w32: Tensor,
    unit: Tensor,
}

impl NormWeight {
    pub fn new(w: &Tensor) -> Result<Self> {
        let unit = Tensor::ones(w.dims1()?, DType::F32, w.device())?;
        Ok(NormWeight { w: w.clone(), w32: w.to_dtype(DType::F32)?, unit })
    }

    /// The weight as loaded.
    pub fn tensor(&self) -> &Tensor {
        &self.w
    }
}

/// [`rms_norm`] as one op with an analytic backward towards `x` only.
///
/// The composed version keeps five f32 temporaries of x's size per norm for its backward and stores an
/// x-sized gradient for the broadcast frozen weight; this one keeps its output alone and recomputes the row
/// statistics in the backward.
///
/// `scale`, broadcast over the rows (adaLN's per-sample scale or gate), multiplies the output inside the same
/// op, so that its product is not kept as one more x-sized tensor with a gradient for the frozen scale. On a
/// GPU the whole op is one kernel (`cuda::rms_norm`).
pub fn rms_norm_fused(x: &Tensor, weight: &NormWeight, eps: f64, scale: Option<&Tensor>) -> Result<Tensor> {
    let rule = RmsNormGrad { w: weight.clone(), eps, scale: scale.map(Tensor::detach) };
    attach1(x, norm_value(&x.detach(), weight, eps, scale, None)?, rule)
}

/// `residual + rms_norm_fused(x, …)`, the end of each half of a block, as one graph node (one kernel on a
/// GPU).
pub fn rms_norm_residual(
    residual: &Tensor,
    x: &Tensor,
    weight: &NormWeight,
    eps: f64,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    let value = norm_value(&x.detach(), weight, eps, scale, Some(&residual.detach()))?;
    let norm = RmsNormGrad { w: weight.clone(), eps, scale: scale.map(Tensor::detach) };
    attach2(residual, x, value, ResidualNormGrad { norm })
}

/// The normed, weighted and scaled rows of `x`, plus `residual` if given.
fn norm_value(
    x: &Tensor,
    weight: &NormWeight,
    eps: f64,
    scale: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Value> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::rms_norm(x, &weight.w, scale, residual, eps)? {
        return Ok(Value::Fresh(y));
    }
    let y = rms_norm_value(x, weight, eps)?;
    let y = match scale {
        Some(s) => y.broadcast_mul(s)?,
        None => y,
    };
    Ok(Value::Tensor(match residual {
        Some(r) => (r + y)?,
        None => y,
    }))
}

/// [`rms_norm`]'s value through candle's fused kernel.
fn rms_norm_value(x: &Tensor, weight: &NormWeight, eps: f64) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    // The weight multiplies after the cast back, as in diffusers, so half precision rounds as the composed
    // path does.
    candle_nn::ops::rms_norm(&xf, &weight.unit, eps as f32)?.to_dtype(x.dtype())?.broadcast_mul(&weight.w)
}

/// The qk-norm followed by the rotary embedding ([`rotary`]) as one graph node: the pair keeps one tensor
/// for the backward instead of two. On a GPU it is one kernel each way.
pub fn rms_norm_rotary(x: &Tensor, weight: &NormWeight, eps: f64, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rotary = RotaryGrad { cos: cos.clone(), sin: sin.clone() };
    let norm = RmsNormGrad { w: weight.clone(), eps, scale: None };
    let xd = x.detach();
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cuda::rms_norm_rope(&xd, &weight.w, cos, sin, eps)? {
        return attach1(x, Value::Fresh(y), NormRotaryGrad { norm, rotary });
    }
    let value = rotary.rotate(&rms_norm_value(&xd, weight, eps)?, false)?;
    attach1(x, value, NormRotaryGrad { norm, rotary })
}

struct NormRotaryGrad {
    norm: RmsNormGrad,
    rotary: RotaryGrad,
}

impl Grad1 for NormRotaryGrad {
    const NAME: &'static str = "rms-norm-rotary";

    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dx) = crate::cuda::rms_norm_rope_backward(
            x,
            &self.norm.w.w,
            &self.rotary.cos,
            &self.rotary.sin,
            g,
            self.norm.eps,
        )? {
            return Ok(dx);
        }
        self.norm.grad(x, y, &self.rotary.rotate(g, true)?)
    }
}

struct RmsNormGrad {
    w: NormWeight,
    eps: f64,
    scale: Option<Tensor>,
}

impl Grad1 for RmsNormGrad {
    const NAME: &'static str = "rms-norm";

    /// For y = x·r·w with r = (mean(x²) + eps)^(-1/2), ∂r/∂xⱼ = −r³·xⱼ/n, so
    /// dx = r·(g·w) − x·r³·mean(g·w·x); a scale multiplies g first.
    fn grad(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(dx) = crate::cuda::rms_norm_backward(x, &self.w.w, self.scale.as_ref(), g, self.eps)? {
            return Ok(dx);
        }
        let xf = x.to_dtype(DType::F32)?;
        let g = match &self.scale {
            Some(s) => g.broadcast_mul(s)?,
            None => g.clone(),
        };
        let gw = g.to_dtype(DType::F32)?.broadcast_mul(&self.w.w32)?;
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let r3_dot = ((&gw * &xf)?.mean_keepdim(D::Minus1)? * r.powf(3.0)?)?;
        (gw.broadcast_mul(&r)? - xf.broadcast_mul(&r3_dot)?)?.to_dtype(x.dtype())
    }
}

/// The backward of [`rms_norm_residual`]'s single node: the residual passes the gradient through.
struct ResidualNormGrad {
    norm: RmsNormGrad,
}

impl Grad2 for ResidualNormGrad {
    const NAME: &'static str = "rms-norm-residual";

    fn grads(&self, _residual: &Tensor, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<[Tensor; 2]> {
        Ok([g.clone(), self.norm.grad(x, y, g)?])
    }
}

/// Rotary embedding of `x` [B, S, H, D]: each pair (x₂ᵢ, x₂ᵢ₊₁) times e^{iθ}, with cos θ and sin θ given as
/// [B, S, 1, D/2] f32; computed in f32 and returned in x's dtype. Its backward is the rotation by −θ, so the
/// graph keeps nothing of the ten composed ops it takes.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rule = RotaryGrad { cos: cos.clone(), sin: sin.clone() };
    attach1(x, rule.rotate(&x.detach(), false)?, rule)
}

/// [`rotary`] composed of candle ops, whose backward candle derives: the reference of the fused versions.
pub fn rotary_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    RotaryGrad { cos: cos.clone(), sin: sin.clone() }.rotate(x, false)
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
/// the backward and take four passes there; this keeps its inputs alone. One kernel each way on a GPU.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.detach(), b.detach());
    #[cfg(feature = "cuda")]
    if let Some(h) = crate::cuda::swiglu(&ad, &bd)? {
        return attach2(a, b, Value::Fresh(h), SwigluGrad);
    }
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
        #[cfg(feature = "cuda")]
        if let Some((da, db)) = crate::cuda::swiglu_backward(a, b, g)? {
            return Ok([da, db]);
        }
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

/// Helpers of the op tests here and in `attention`.
#[cfg(test)]
pub(crate) mod testing {
    use acrf_common::rng::{Key, domain, fill_normal_f32};
    use candle_core::{DType, Device, Result, Tensor, Var};

    pub fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
        let mut v = vec![0f32; shape.iter().product()];
        fill_normal_f32(Key::new(seed, domain::MODEL_INIT, 0, 0), &mut v);
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// max |a − b| / max |b|.
    pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    pub fn all_finite(t: &Tensor) -> Result<bool> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
    }

    /// Σ(f(inputs) · r) backpropagated: the value and the gradient of every input.
    pub fn value_and_grads(
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
}

#[cfg(test)]
mod tests {
    use candle_core::Var;

    use super::testing::{randn, rel_err, value_and_grads};
    use super::*;

    #[test]
    fn fused_rms_norm_matches_the_composed_one() -> Result<()> {
        let x = (randn(1, &[2, 5, 48])? * 3.0)?;
        let w = (randn(2, &[48])? + 1.0)?;
        // In bf16 both round once after the f32 statistics and once after the weight: the values are identical.
        for (dtype, value_tol, grad_tol) in [(DType::F32, 1e-5, 1e-5), (DType::BF16, 0.0, 1e-2)] {
            let w = w.to_dtype(dtype)?;
            let (y0, g0) = value_and_grads(std::slice::from_ref(&x), dtype, |t| rms_norm(&t[0], &w, 1e-5))?;
            let nw = NormWeight::new(&w)?;
            let (y1, g1) =
                value_and_grads(std::slice::from_ref(&x), dtype, |t| rms_norm_fused(&t[0], &nw, 1e-5, None))?;
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
                Box::new(|t| rms_norm_fused(&t[0], &NormWeight::new(&norm_w)?, 1e-5, Some(&s))),
                Box::new(|t| rms_norm(&t[0], &norm_w, 1e-5)?.broadcast_mul(&s)),
            ),
            (
                "rms_norm_residual",
                vec![x.clone(), randn(31, &[2, 5, 12])?],
                Box::new(|t| rms_norm_residual(&t[1], &t[0], &NormWeight::new(&norm_w)?, 1e-5, Some(&s))),
                Box::new(|t| &t[1] + rms_norm(&t[0], &norm_w, 1e-5)?.broadcast_mul(&s)?),
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
                Box::new(|t| rms_norm_rotary(&t[0], &NormWeight::new(&norm_w.narrow(0, 0, 6)?)?, 1e-5, &cos, &sin)),
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
        let fused = rms_norm_fused(x.as_tensor(), &NormWeight::new(&w)?, 1e-5, None)?.sum_all()?.backward()?;
        assert_eq!(fused.get_ids().collect::<Vec<_>>(), [&x.as_tensor().id()]);
        Ok(())
    }

    #[test]
    fn untracked_inputs_build_no_graph() -> Result<()> {
        let x = randn(5, &[2, 11, 3, 8])?;
        assert!(!rms_norm_fused(&x, &NormWeight::new(&randn(6, &[8])?)?, 1e-5, None)?.track_op());
        assert!(!swiglu(&x, &x)?.track_op());
        Ok(())
    }
}
