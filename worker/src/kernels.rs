//! CPU kernels for the elementwise work around attention and the feed-forward, in f32.
//!
//! Composed from candle ops, a softmax row is ten passes over memory and each `exp` is a scalar libm call:
//! on a small model that is a third of a CPU step, more than its matmuls. Here each piece is one pass with a
//! polynomial `exp` that the compiler vectorises, compiled for AVX-512 or AVX2 and picked at run time
//! (`pulp`). Every function returns `None` where it does not apply (another device or dtype); the caller then
//! runs the composed ops, which remain the reference and the GPU path.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor};
use pulp::{Simd, WithSimd};

/// Lanes of the accumulators of row reductions: independent partial sums let the compiler vectorise what
/// would otherwise be one serial chain.
const LANES: usize = 16;

/// e^x to within 2 ulp; 0 below the smallest normal result (so −∞ gives 0), +∞ above 88.376 (a little
/// before f32's true overflow at 88.72, where 2ⁿ would leave the exponent's range).
///
/// Cody–Waite reduction x = n·ln 2 + r, |r| ≤ ln 2 / 2, and Cephes' degree-5 polynomial for e^r; 2^n is
/// built in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_55;
    const MAX: f32 = 88.376;
    let c = x.clamp(MIN, MAX);
    let n = (c * std::f32::consts::LOG2_E).round();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, c));
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    let y = e * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else {
        y
    }
}

#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.max(*v);
        }
    }
    tail.iter().chain(&acc).fold(f32::NEG_INFINITY, |m, v| m.max(*v))
}

#[inline(always)]
fn row_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// The contiguous f32 data of `t`, if it lives on the CPU.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => Some(f(&data[layout.start_offset()..][..t.elem_count()])),
        _ => None,
    }
}

/// The contiguous f32 data of every tensor of `ts`, if all live on the CPU.
pub(crate) fn with_f32_all<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| (t.storage_and_layout(), t.elem_count(), t.is_contiguous())).collect();
    let slices = guards
        .iter()
        .map(|((storage, layout), n, contiguous)| match (&**storage, contiguous) {
            (Storage::Cpu(CpuStorage::F32(data)), true) => Some(&data[layout.start_offset()..][..*n]),
            _ => None,
        })
        .collect::<Option<Vec<&[f32]>>>()?;
    Some(f(&slices))
}

/// Runs `op` with the widest vector instructions the CPU has.
pub(crate) fn vectorized<Op: WithSimd>(op: Op) -> Op::Output {
    pulp::Arch::new().dispatch(op)
}

/// A tensor of `values` in the shape and on the device of `like`.
fn tensor_like(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, like.shape(), like.device())
}

/// Attention logits of one chunk: raw q·kᵀ scores [B, .., rows, keys], the scale, and the additive key mask
/// [B, 1, 1, keys].
pub struct Logits<'a> {
    pub raw: &'a Tensor,
    pub scale: f64,
    pub mask: Option<&'a Tensor>,
}

impl Logits<'_> {
    /// Calls `f` on the rows of the CPU data.
    fn with<R>(&self, f: impl FnOnce(Rows) -> R) -> Option<R> {
        let dims = self.raw.dims();
        let keys = *dims.last()?;
        let per_sample = self.raw.elem_count() / dims[0] / keys;
        let scale = self.scale as f32;
        with_f32(self.raw, |raw| match self.mask {
            Some(m) => with_f32(m, |mask| f(Rows { raw, mask: Some(mask), keys, per_sample, scale })),
            None => Some(f(Rows { raw, mask: None, keys, per_sample, scale })),
        })
        .flatten()
    }
}

/// The logits of a chunk as flat CPU rows: `per_sample` rows of `keys` share one mask row.
struct Rows<'a> {
    raw: &'a [f32],
    mask: Option<&'a [f32]>,
    keys: usize,
    per_sample: usize,
    scale: f32,
}

impl Rows<'_> {
    /// Row `i` of raw·scale + mask, into `out`.
    #[inline(always)]
    fn logits(&self, i: usize, out: &mut [f32]) {
        let n = self.keys;
        let raw = &self.raw[i * n..][..n];
        match self.mask {
            Some(m) => {
                let m = &m[(i / self.per_sample) * n..][..n];
                for ((o, r), m) in out.iter_mut().zip(raw).zip(m) {
                    *o = r * self.scale + m;
                }
            }
            None => {
                for (o, r) in out.iter_mut().zip(raw) {
                    *o = r * self.scale;
                }
            }
        }
    }
}

/// softmax(raw·scale + mask) over the keys, and each row's log-sum-exp [.., rows, 1].
pub fn softmax(l: &Logits) -> Result<Option<(Tensor, Tensor)>> {
    let out = l.with(|rows| {
        let mut p = vec![0f32; rows.raw.len()];
        let mut lse = vec![0f32; rows.raw.len() / rows.keys];
        vectorized(Softmax { rows, p: &mut p, lse: &mut lse });
        (p, lse)
    });
    let Some((p, lse)) = out else { return Ok(None) };
    let mut lse_shape = l.raw.dims().to_vec();
    *lse_shape.last_mut().expect("logits have a key axis") = 1;
    Ok(Some((tensor_like(p, l.raw)?, Tensor::from_vec(lse, lse_shape, l.raw.device())?)))
}

struct Softmax<'a> {
    rows: Rows<'a>,
    p: &'a mut [f32],
    lse: &'a mut [f32],
}

impl WithSimd for Softmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        for (i, p) in self.p.chunks_exact_mut(self.rows.keys).enumerate() {
            self.rows.logits(i, p);
            let max = row_max(p);
            for v in p.iter_mut() {
                *v = exp(*v - max);
            }
            let sum = row_sum(p);
            let inv = 1.0 / sum;
            for v in p.iter_mut() {
                *v *= inv;
            }
            self.lse[i] = max + sum.ln();
        }
    }
}

/// The probabilities exp(raw·scale + mask − lse) of a chunk whose log-sum-exp per row is known.
pub fn probabilities(l: &Logits, lse: &Tensor) -> Result<Option<Tensor>> {
    let out = l.with(|rows| {
        with_f32(lse, |lse| {
            let mut p = vec![0f32; rows.raw.len()];
            vectorized(Probabilities { rows, lse, p: &mut p });
            p
        })
    });
    out.flatten().map(|p| tensor_like(p, l.raw)).transpose()
}

struct Probabilities<'a> {
    rows: Rows<'a>,
    lse: &'a [f32],
    p: &'a mut [f32],
}

impl WithSimd for Probabilities<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        for (i, p) in self.p.chunks_exact_mut(self.rows.keys).enumerate() {
            self.rows.logits(i, p);
            let lse = self.lse[i];
            for v in p.iter_mut() {
                *v = exp(*v - lse);
            }
        }
    }
}

/// dS = scale · P ∘ (dP − D) of a chunk, with D [.., rows, 1] = rowsum(dO ∘ O) = rowsum(P ∘ dP).
pub fn softmax_grad(p: &Tensor, dp: &Tensor, d: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let keys = p.dims().last().copied().unwrap_or(1).max(1);
    let out = with_f32(p, |p| {
        with_f32(dp, |dp| {
            with_f32(d, |d| {
                let mut ds = vec![0f32; p.len()];
                vectorized(SoftmaxGrad { p, dp, d, keys, scale: scale as f32, ds: &mut ds });
                ds
            })
        })
    });
    out.flatten().flatten().map(|ds| tensor_like(ds, p)).transpose()
}

struct SoftmaxGrad<'a> {
    p: &'a [f32],
    dp: &'a [f32],
    d: &'a [f32],
    keys: usize,
    scale: f32,
    ds: &'a mut [f32],
}

impl WithSimd for SoftmaxGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let n = self.keys;
        let rows = self.p.chunks_exact(n).zip(self.dp.chunks_exact(n)).zip(self.ds.chunks_exact_mut(n));
        for (((p, dp), ds), d) in rows.zip(self.d) {
            for ((o, p), dp) in ds.iter_mut().zip(p).zip(dp) {
                *o = p * (dp - d) * self.scale;
            }
        }
    }
}

/// SwiGLU's value silu(a)·b, with silu(a) = a / (1 + e^−a).
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            let mut h = vec![0f32; a.len()];
            vectorized(Swiglu { a, b, h: &mut h });
            h
        })
    });
    out.flatten().map(|h| tensor_like(h, a)).transpose()
}

struct Swiglu<'a> {
    a: &'a [f32],
    b: &'a [f32],
    h: &'a mut [f32],
}

impl WithSimd for Swiglu<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        for ((h, a), b) in self.h.iter_mut().zip(self.a).zip(self.b) {
            *h = a / (1.0 + exp(-a)) * b;
        }
    }
}

/// SwiGLU's gradients (dL/da, dL/db) from dL/dh: with σ = 1 / (1 + e^−a), d silu/da = σ·(1 + a·(1 − σ)).
pub fn swiglu_grad(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let out = with_f32(a, |a| {
        with_f32(b, |b| {
            with_f32(g, |g| {
                let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
                vectorized(SwigluGrad { a, b, g, da: &mut da, db: &mut db });
                (da, db)
            })
        })
    });
    out.flatten().flatten().map(|(da, db)| Ok((tensor_like(da, a)?, tensor_like(db, a)?))).transpose()
}

struct SwigluGrad<'a> {
    a: &'a [f32],
    b: &'a [f32],
    g: &'a [f32],
    da: &'a mut [f32],
    db: &'a mut [f32],
}

impl WithSimd for SwigluGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let outs = self.da.iter_mut().zip(self.db.iter_mut());
        for ((((da, db), a), b), g) in outs.zip(self.a).zip(self.b).zip(self.g) {
            let sigma = 1.0 / (1.0 + exp(-a));
            *da = g * b * sigma * (1.0 + a * (1.0 - sigma));
            *db = g * a * sigma;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_saturates() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want / f32::EPSILON as f64);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!((exp(f32::NEG_INFINITY), exp(-100.0), exp(100.0)), (0.0, 0.0, f32::INFINITY));
        assert!(exp(f32::NAN).is_nan());
    }

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut v = vec![0f32; shape.iter().product()];
        acrf_common::rng::fill_normal_f32(acrf_common::rng::Key::new(seed, 0, 0, 0), &mut v);
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn softmax_pieces_match_candle_ops() -> Result<()> {
        let raw = (randn(&[2, 3, 5, 37], 1)? * 4.0)?;
        let mask: Vec<f32> = (0..2 * 37).map(|i| if i >= 37 + 30 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (2, 1, 1, 37), &Device::Cpu)?;
        let l = Logits { raw: &raw, scale: 0.3, mask: Some(&mask) };
        let logits = (&raw * 0.3)?.broadcast_add(&mask)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let (p, lse) = softmax(&l)?.expect("f32 on the CPU");
        assert!(max_diff(&p, &e.broadcast_div(&sum)?)? <= 1e-6);
        assert!(max_diff(&lse, &(max + sum.log()?)?)? <= 1e-5);
        assert!(max_diff(&probabilities(&l, &lse)?.expect("f32 on the CPU"), &p)? <= 1e-6);
        let dp = randn(&[2, 3, 5, 37], 2)?;
        let d = randn(&[2, 3, 5, 1], 3)?;
        let want = ((&p * dp.broadcast_sub(&d)?)? * 0.3)?;
        assert!(max_diff(&softmax_grad(&p, &dp, &d, 0.3)?.expect("f32 on the CPU"), &want)? <= 1e-6);
        assert!(softmax(&Logits { raw: &raw.to_dtype(DType::BF16)?, scale: 0.3, mask: None })?.is_none());
        Ok(())
    }

    #[test]
    fn swiglu_matches_candle_ops() -> Result<()> {
        let (a, b, g) = ((randn(&[3, 70], 4)? * 3.0)?, randn(&[3, 70], 5)?, randn(&[3, 70], 6)?);
        let h = swiglu(&a, &b)?.expect("f32 on the CPU");
        assert!(max_diff(&h, &(a.silu()? * &b)?)? <= 1e-5);
        let sigma = (a.neg()?.exp()? + 1.0)?.recip()?;
        let dsilu = (&sigma * ((&a * (1.0 - &sigma)?)? + 1.0)?)?;
        let (da, db) = swiglu_grad(&a, &b, &g)?.expect("f32 on the CPU");
        assert!(max_diff(&da, &(&g * &b)?.mul(&dsilu)?)? <= 1e-5);
        assert!(max_diff(&db, &(&g * a.silu()?)?)? <= 1e-5);
        Ok(())
    }
}
