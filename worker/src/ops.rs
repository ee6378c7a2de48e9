//! Differentiable building blocks that candle either lacks or gets wrong for training.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `layer_norm` have no backward and silently cut the
//! gradient, so everything here is built from ops whose backward exists. Matmul's backward also computes
//! the gradient of the (frozen) weight, which at full size is gigabytes of garbage per step: the frozen
//! linear below attaches only the input gradient.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, DType, Layout, Result, Shape, Tensor};

/// `x · Wᵀ` where W is frozen: the backward pass returns only dL/dx = g · W.
///
/// The product is computed once without a graph, then passed through an op whose backward knows W.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = x.detach().broadcast_matmul(&w.t()?)?.contiguous()?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, AttachInputGrad { w: w.clone() })
}

/// Frozen linear with bias: `x · Wᵀ + b`.
pub fn frozen_linear_b(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    frozen_linear(x, w)?.broadcast_add(b)
}

struct AttachInputGrad {
    w: Tensor,
}

impl CustomOp2 for AttachInputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((y.try_clone(yl)?, yl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.broadcast_matmul(&self.w)?), None))
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

/// LayerNorm without affine parameters over the last dimension (biased variance), statistics in f32.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let centered = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// Softmax over the last dimension in f32 from ops that all have a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let shifted = xf.broadcast_sub(&xf.max_keepdim(D::Minus1)?.detach())?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
}
