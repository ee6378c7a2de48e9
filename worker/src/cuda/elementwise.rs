//! The fused element-wise ops of a block and their backwards, on bf16 or f32 storage.

use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::launch::{Fresh, cuda_parts, device_of, function, view};

/// Runs `f` with the element type of `dtype`: bf16 or f32, the two the kernels are built for.
macro_rules! typed {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            _ => unreachable!("checked by `applies`"),
        }
    };
}

/// The common device and dtype of `tensors` if every one is a contiguous CUDA tensor of a kernel dtype.
fn applies<'a>(tensors: &[&'a Tensor]) -> Option<(&'a CudaDevice, DType)> {
    let first = tensors.first()?;
    let (dev, dtype) = (device_of(first)?, first.dtype());
    if !matches!(dtype, DType::BF16 | DType::F32) {
        return None;
    }
    let same =
        tensors.iter().all(|t| t.dtype() == dtype && t.is_contiguous() && t.device().same_device(first.device()));
    same.then_some((dev, dtype))
}

/// The storage types the element-wise kernels are built for, with their kernels' names.
trait Elem: CudaDType + DeviceRepr {
    const NORM_FWD: &'static str;
    const NORM_BWD: &'static str;
    const ROPE_FWD: &'static str;
    const ROPE_BWD: &'static str;
    const SWIGLU_FWD: &'static str;
    const SWIGLU_BWD: &'static str;
}

macro_rules! elem {
    ($t:ty, $s:literal) => {
        impl Elem for $t {
            const NORM_FWD: &'static str = concat!("rms_norm_fwd_", $s);
            const NORM_BWD: &'static str = concat!("rms_norm_bwd_", $s);
            const ROPE_FWD: &'static str = concat!("rms_norm_rope_fwd_", $s);
            const ROPE_BWD: &'static str = concat!("rms_norm_rope_bwd_", $s);
            const SWIGLU_FWD: &'static str = concat!("swiglu_fwd_", $s);
            const SWIGLU_BWD: &'static str = concat!("swiglu_bwd_", $s);
        }
    };
}
elem!(bf16, "bf16");
elem!(f32, "f32");

/// Rows of x per row of the per-sample scale [B, 1, n]; `None` if they do not divide.
fn per_sample(rows: usize, n: usize, scale: Option<&Tensor>) -> Option<usize> {
    let Some(s) = scale else { return Some(rows) };
    let samples = s.elem_count() / n;
    (samples > 0 && s.elem_count() == samples * n && rows.is_multiple_of(samples)).then(|| rows / samples)
}

/// One block of threads per row for the row kernels: a multiple of 32, at most 256.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// Blocks of 8 warps, one warp per row.
fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn flat(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// RMSNorm of the rows of `x` [.., n] times `w` [n], times the per-sample `scale` [B, 1, n] (adaLN's scale or
/// gate) if given, plus `residual` (x's shape) if given; rounded as the composed ops round.
pub fn rms_norm(
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f64,
) -> Result<Option<Fresh>> {
    let mut all = vec![x, w];
    all.extend(scale);
    all.extend(residual);
    let Some((dev, dtype)) = applies(&all) else { return Ok(None) };
    let n = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / n;
    let Some(per_sample) = per_sample(rows, n, scale) else { return Ok(None) };
    typed!(dtype, norm_fwd(dev, x, w, scale, residual, eps, n, rows, per_sample)).map(Some)
}

#[allow(clippy::too_many_arguments)]
fn norm_fwd<T: Elem>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    residual: Option<&Tensor>,
    eps: f64,
    n: usize,
    rows: usize,
    per_sample: usize,
) -> Result<Fresh> {
    let f = function(dev, T::NORM_FWD, 0)?;
    let (xs, xl) = cuda_parts(x).expect("checked");
    let (ws, wl) = cuda_parts(w).expect("checked");
    let ss = scale.and_then(cuda_parts);
    let rs = residual.and_then(cuda_parts);
    let (xv, wv) = (view::<T>(&xs, &xl)?, view::<T>(&ws, &wl)?);
    let sv = ss.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
    let rv = rs.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
    // SAFETY: every element is written by the kernel before it is read.
    let mut out = unsafe { dev.alloc::<T>(rows * n) }?;
    let null = 0u64;
    let (n32, per, eps) = (n as i32, per_sample as i32, eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&xv).arg(&wv);
    match &sv {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    match &rv {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&mut out).arg(&n32).arg(&per).arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(n), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments match the kernel's signature; the buffers hold rows·n (x, out, residual), n (w)
    // and rows/per_sample·n (scale) elements.
    unsafe { b.launch(cfg) }.w()?;
    Ok(Fresh::new(out, dev, x.shape().clone()))
}

/// dL/dx of [`rms_norm`] (without the residual, whose gradient is `g` itself).
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    g: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let mut all = vec![x, w, g];
    all.extend(scale);
    let Some((dev, dtype)) = applies(&all) else { return Ok(None) };
    let n = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / n;
    let Some(per_sample) = per_sample(rows, n, scale) else { return Ok(None) };
    typed!(dtype, norm_bwd(dev, x, w, scale, g, eps, n, rows, per_sample)).map(|f| Some(f.tensor()))
}

#[allow(clippy::too_many_arguments)]
fn norm_bwd<T: Elem>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    scale: Option<&Tensor>,
    g: &Tensor,
    eps: f64,
    n: usize,
    rows: usize,
    per_sample: usize,
) -> Result<Fresh> {
    let f = function(dev, T::NORM_BWD, 0)?;
    let (xs, xl) = cuda_parts(x).expect("checked");
    let (ws, wl) = cuda_parts(w).expect("checked");
    let (gs, gl) = cuda_parts(g).expect("checked");
    let ss = scale.and_then(cuda_parts);
    let (xv, wv, gv) = (view::<T>(&xs, &xl)?, view::<T>(&ws, &wl)?, view::<T>(&gs, &gl)?);
    let sv = ss.as_ref().map(|(s, l)| view::<T>(s, l)).transpose()?;
    // SAFETY: written in full by the kernel.
    let mut out = unsafe { dev.alloc::<T>(rows * n) }?;
    let null = 0u64;
    let (n32, per, eps) = (n as i32, per_sample as i32, eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&xv).arg(&wv);
    match &sv {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&gv).arg(&mut out).arg(&n32).arg(&per).arg(&eps);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (row_threads(n), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as in `norm_fwd`.
    unsafe { b.launch(cfg) }.w()?;
    Ok(Fresh::new(out, dev, x.shape().clone()))
}

/// The qk-norm of each head of `x` [B, S, H, hd] and then its rotation by the angles whose cos and sin are
/// given as [B, S, 1, hd/2] f32.
pub fn rms_norm_rope(x: &Tensor, w: &Tensor, cos: &Tensor, sin: &Tensor, eps: f64) -> Result<Option<Fresh>> {
    let Some((dev, dtype)) = applies(&[x, w]) else { return Ok(None) };
    if !rope_tables_fit(x, cos, sin)? {
        return Ok(None);
    }
    typed!(dtype, rope_fwd(dev, x, w, cos, sin, eps)).map(Some)
}

/// cos and sin are contiguous f32 tables of x's batch and length on its device.
fn rope_tables_fit(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<bool> {
    let (b, s, _, hd) = x.dims4()?;
    let ok = |t: &Tensor| {
        t.dtype() == DType::F32
            && t.is_contiguous()
            && t.dims() == [b, s, 1, hd / 2]
            && t.device().same_device(x.device())
    };
    Ok(hd % 2 == 0 && ok(cos) && ok(sin))
}

fn rope_fwd<T: Elem>(dev: &CudaDevice, x: &Tensor, w: &Tensor, cos: &Tensor, sin: &Tensor, eps: f64) -> Result<Fresh> {
    let (_, _, h, hd) = x.dims4()?;
    let rows = x.elem_count() / hd;
    let f = function(dev, T::ROPE_FWD, 0)?;
    let (xs, xl) = cuda_parts(x).expect("checked");
    let (ws, wl) = cuda_parts(w).expect("checked");
    let (cs, cl) = cuda_parts(cos).expect("checked");
    let (ss, sl) = cuda_parts(sin).expect("checked");
    let (xv, wv) = (view::<T>(&xs, &xl)?, view::<T>(&ws, &wl)?);
    let (cv, sv) = (view::<f32>(&cs, &cl)?, view::<f32>(&ss, &sl)?);
    // SAFETY: written in full by the kernel.
    let mut out = unsafe { dev.alloc::<T>(rows * hd) }?;
    let (rows64, h32, hd32, eps) = (rows as i64, h as i32, hd as i32, eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&xv).arg(&wv).arg(&cv).arg(&sv).arg(&mut out).arg(&rows64).arg(&h32).arg(&hd32).arg(&eps);
    // SAFETY: x and out hold rows·hd elements, w hd, the tables rows/H·hd/2.
    unsafe { b.launch(warp_rows(rows)) }.w()?;
    Ok(Fresh::new(out, dev, x.shape().clone()))
}

/// dL/dx of [`rms_norm_rope`].
pub fn rms_norm_rope_backward(
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let Some((dev, dtype)) = applies(&[x, w, g]) else { return Ok(None) };
    if !rope_tables_fit(x, cos, sin)? {
        return Ok(None);
    }
    typed!(dtype, rope_bwd(dev, x, w, cos, sin, g, eps)).map(|f| Some(f.tensor()))
}

fn rope_bwd<T: Elem>(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    g: &Tensor,
    eps: f64,
) -> Result<Fresh> {
    let (_, _, h, hd) = x.dims4()?;
    let rows = x.elem_count() / hd;
    let f = function(dev, T::ROPE_BWD, 0)?;
    let (xs, xl) = cuda_parts(x).expect("checked");
    let (ws, wl) = cuda_parts(w).expect("checked");
    let (cs, cl) = cuda_parts(cos).expect("checked");
    let (ss, sl) = cuda_parts(sin).expect("checked");
    let (gs, gl) = cuda_parts(g).expect("checked");
    let (xv, wv, gv) = (view::<T>(&xs, &xl)?, view::<T>(&ws, &wl)?, view::<T>(&gs, &gl)?);
    let (cv, sv) = (view::<f32>(&cs, &cl)?, view::<f32>(&ss, &sl)?);
    // SAFETY: written in full by the kernel.
    let mut out = unsafe { dev.alloc::<T>(rows * hd) }?;
    let (rows64, h32, hd32, eps) = (rows as i64, h as i32, hd as i32, eps as f32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&xv).arg(&wv).arg(&cv).arg(&sv).arg(&gv).arg(&mut out).arg(&rows64).arg(&h32).arg(&hd32).arg(&eps);
    // SAFETY: as in `rope_fwd`, with g shaped as x.
    unsafe { b.launch(warp_rows(rows)) }.w()?;
    Ok(Fresh::new(out, dev, x.shape().clone()))
}

/// SwiGLU's gate silu(a)·b.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Option<Fresh>> {
    let Some((dev, dtype)) = applies(&[a, b]) else { return Ok(None) };
    if a.shape() != b.shape() {
        return Ok(None);
    }
    typed!(dtype, swiglu_fwd(dev, a, b)).map(Some)
}

fn swiglu_fwd<T: Elem>(dev: &CudaDevice, a: &Tensor, b: &Tensor) -> Result<Fresh> {
    let n = a.elem_count();
    let f = function(dev, T::SWIGLU_FWD, 0)?;
    let (as_, al) = cuda_parts(a).expect("checked");
    let (bs, bl) = cuda_parts(b).expect("checked");
    let (av, bv) = (view::<T>(&as_, &al)?, view::<T>(&bs, &bl)?);
    // SAFETY: written in full by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    let n64 = n as i64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&av).arg(&bv).arg(&mut out).arg(&n64);
    // SAFETY: a, b and out hold n elements.
    unsafe { l.launch(flat(n)) }.w()?;
    Ok(Fresh::new(out, dev, a.shape().clone()))
}

/// SwiGLU's (dL/da, dL/db) from dL/dh.
pub fn swiglu_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let Some((dev, dtype)) = applies(&[a, b, g]) else { return Ok(None) };
    if a.shape() != b.shape() || a.shape() != g.shape() {
        return Ok(None);
    }
    typed!(dtype, swiglu_bwd(dev, a, b, g)).map(|(da, db)| Some((da.tensor(), db.tensor())))
}

fn swiglu_bwd<T: Elem>(dev: &CudaDevice, a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Fresh, Fresh)> {
    let n = a.elem_count();
    let f = function(dev, T::SWIGLU_BWD, 0)?;
    let (as_, al) = cuda_parts(a).expect("checked");
    let (bs, bl) = cuda_parts(b).expect("checked");
    let (gs, gl) = cuda_parts(g).expect("checked");
    let (av, bv, gv) = (view::<T>(&as_, &al)?, view::<T>(&bs, &bl)?, view::<T>(&gs, &gl)?);
    // SAFETY: written in full by the kernel.
    let (mut da, mut db) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
    let n64 = n as i64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&av).arg(&bv).arg(&gv).arg(&mut da).arg(&mut db).arg(&n64);
    // SAFETY: every buffer holds n elements.
    unsafe { l.launch(flat(n)) }.w()?;
    Ok((Fresh::new(da, dev, a.shape().clone()), Fresh::new(db, dev, a.shape().clone())))
}
