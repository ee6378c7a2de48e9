//! Separable linear maps over the two spatial axes, as dense per-axis matrices applied with matmuls.
//!
//! The orthonormal DFT, the low band (adaptive average pool, then bilinear upsample back) and SSIM's
//! zero-padded Gaussian blur are each a fixed matrix along H and one along W. candle has no FFT, no bilinear
//! resize with PyTorch's `align_corners = false` rule and no differentiable fused blur, but its matmul has a
//! backward pass, and at latent sizes (a few hundred at most) a dense matmul is cheap and batches over all
//! samples and channels at once. The matrices depend only on the axis length, so they are built once (in f64)
//! per map, length, dtype and device and cached.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use candle_core::{D, DType, Device, DeviceLocation, Result, Tensor, bail};

/// SSIM's Gaussian window: 11 taps, σ = 1.5.
const GAUSS_TAPS: usize = 11;
const GAUSS_SIGMA: f64 = 1.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AxisMap {
    /// The orthonormal DFT as n cosine rows stacked over n negated-sine rows (real and imaginary parts).
    Dft,
    /// The low band along one axis: PyTorch's adaptive average pool to ⌊n/pool⌋, then its bilinear upsample
    /// (`align_corners = false`) back to n.
    LowPass { pool: usize },
    /// Convolution with the normalised Gaussian window, zero padding, same length.
    Gaussian,
}

impl AxisMap {
    /// The matrix of the map for an axis of length `n`, row-major, as (outputs, entries) with n columns.
    fn matrix(self, n: usize) -> Result<(usize, Vec<f64>)> {
        match self {
            AxisMap::Dft => Ok((2 * n, dft(n))),
            AxisMap::LowPass { pool } => Ok((n, low_pass(n, pool)?)),
            AxisMap::Gaussian => Ok((n, gaussian_blur(n))),
        }
    }
}

/// `[C; −S]` with `C[k, j] = cos(2πkj/n)/√n`, `S[k, j] = sin(2πkj/n)/√n`: the orthonormal DFT `C − iS`.
fn dft(n: usize) -> Vec<f64> {
    let scale = (n as f64).sqrt().recip();
    let mut m = vec![0.0; 2 * n * n];
    for k in 0..n {
        for j in 0..n {
            // k·j is reduced mod n first so that the angle stays in [0, 2π) and keeps full precision.
            let angle = std::f64::consts::TAU * ((k * j) % n) as f64 / n as f64;
            m[k * n + j] = angle.cos() * scale;
            m[(n + k) * n + j] = -angle.sin() * scale;
        }
    }
    m
}

/// `U·P` [n, n]: the upsample of [`bilinear_upsample`] after the pool of [`adaptive_avg_pool`].
fn low_pass(n: usize, pool: usize) -> Result<Vec<f64>> {
    if pool == 0 || n / pool == 0 {
        bail!("loss.pool = {pool} does not fit a latent side of {n}: the low band would be empty");
    }
    let out = n / pool;
    let (p, u) = (adaptive_avg_pool(n, out), bilinear_upsample(out, n));
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        for k in 0..out {
            let uik = u[i * out + k];
            if uik != 0.0 {
                for j in 0..n {
                    m[i * n + j] += uik * p[k * n + j];
                }
            }
        }
    }
    Ok(m)
}

/// [out, n]: PyTorch's `adaptive_avg_pool` bins, `floor(i·n/out) .. ceil((i+1)·n/out)` (they overlap when
/// out does not divide n).
fn adaptive_avg_pool(n: usize, out: usize) -> Vec<f64> {
    let mut m = vec![0.0; out * n];
    for i in 0..out {
        let (start, end) = (i * n / out, ((i + 1) * n).div_ceil(out));
        for j in start..end {
            m[i * n + j] = 1.0 / (end - start) as f64;
        }
    }
    m
}

/// [n, inp]: PyTorch's bilinear `interpolate(size = n, align_corners = False)` along one axis. Source
/// coordinates are `(i + ½)·inp/n − ½`, clamped below at 0; the right neighbour is clamped to the last input.
fn bilinear_upsample(inp: usize, n: usize) -> Vec<f64> {
    let scale = inp as f64 / n as f64;
    let mut m = vec![0.0; n * inp];
    for i in 0..n {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = if i0 + 1 < inp { i0 + 1 } else { i0 };
        let w1 = (src - i0 as f64).clamp(0.0, 1.0);
        m[i * inp + i0] += 1.0 - w1;
        m[i * inp + i1] += w1;
    }
    m
}

/// [n, n]: banded, `m[i, j] = g[j − i + 5]`; taps that fall outside the axis read the zero padding and are
/// dropped, not renormalised.
fn gaussian_blur(n: usize) -> Vec<f64> {
    let half = GAUSS_TAPS / 2;
    let taps: Vec<f64> = (0..GAUSS_TAPS)
        .map(|k| (-((k as f64 - half as f64).powi(2)) / (2.0 * GAUSS_SIGMA * GAUSS_SIGMA)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        for j in i.saturating_sub(half)..(i + half + 1).min(n) {
            m[i * n + j] = taps[j + half - i] / total;
        }
    }
    m
}

/// The per-axis matrices already built, transposed for right-multiplication.
#[derive(Debug, Default)]
pub(super) struct AxisMaps {
    cache: Mutex<HashMap<(AxisMap, usize, DType, DeviceLocation), Tensor>>,
}

impl AxisMaps {
    /// `Mᵀ` [n, outputs], contiguous, so that `x · Mᵀ` applies the map along the last axis of x.
    fn transposed(&self, map: AxisMap, n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let key = (map, n, dtype, device.location());
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        // Two CUDA `Device` handles on one GPU share a location but not a stream; tensors of one cannot be
        // mixed with the other's, so a hit counts only on the very same device.
        if let Some(m) = cache.get(&key).filter(|m| m.device().same_device(device)) {
            return Ok(m.clone());
        }
        let (rows, data) = map.matrix(n)?;
        let m =
            Tensor::from_vec(data, (rows, n), &Device::Cpu)?.t()?.to_dtype(dtype)?.to_device(device)?.contiguous()?;
        cache.insert(key, m.clone());
        Ok(m)
    }

    /// Applies `map` along both of the last two axes of `x` [..., H, W]: `M_H · X · M_Wᵀ` per image.
    ///
    /// Each side is one 2-D matmul over all leading dimensions folded into rows (the H side after a
    /// transpose), which avoids materialising the matrix once per image as a batched matmul would. The result
    /// is a transposed view.
    pub(super) fn apply(&self, map: AxisMap, x: &Tensor) -> Result<Tensor> {
        let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        let along_w = x.contiguous()?.broadcast_matmul(&self.transposed(map, w, x.dtype(), x.device())?)?;
        along_w
            .transpose(D::Minus2, D::Minus1)?
            .contiguous()?
            .broadcast_matmul(&self.transposed(map, h, x.dtype(), x.device())?)?
            .transpose(D::Minus2, D::Minus1)
    }

    /// The orthonormal 2-D DFT over the last two axes, as (real, imaginary) parts.
    pub(super) fn dft2(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (h, w) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        // With A = C − iS along each axis, A·X·Aᵀ has the four real blocks C·X·Cᵀ, C·X·(−S)ᵀ, (−S)·X·Cᵀ and
        // (−S)·X·(−S)ᵀ of one real product.
        let f = self.apply(AxisMap::Dft, x)?;
        let block = |r: usize, c: usize| f.narrow(D::Minus2, r * h, h)?.narrow(D::Minus1, c * w, w);
        let re = (block(0, 0)? - block(1, 1)?)?;
        let im = (block(0, 1)? + block(1, 0)?)?;
        Ok((re, im))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, irregular test values.
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    /// Applies a map to [2, 3, h, w] test values in f64; returns (input, output) as flat vectors.
    fn apply_to_values(map: AxisMap, h: usize, w: usize) -> Result<(Vec<f64>, Tensor)> {
        let x = values(6 * h * w, (h * 31 + w) as u64);
        let t = Tensor::from_vec(x.clone(), (2, 3, h, w), &Device::Cpu)?;
        Ok((x, AxisMaps::default().apply(map, &t)?))
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn dft_matches_naive_dft() -> Result<()> {
        for (h, w) in [(4, 4), (5, 7), (12, 20)] {
            let x = values(6 * h * w, 7);
            let t = Tensor::from_vec(x.clone(), (2, 3, h, w), &Device::Cpu)?;
            let (re, im) = AxisMaps::default().dft2(&t)?;
            let (re, im) = (re.flatten_all()?.to_vec1::<f64>()?, im.flatten_all()?.to_vec1::<f64>()?);
            let (mut re_ref, mut im_ref) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            for img in 0..6 {
                for k in 0..h {
                    for l in 0..w {
                        let (mut sr, mut si) = (0.0, 0.0);
                        for a in 0..h {
                            for b in 0..w {
                                let phase =
                                    -std::f64::consts::TAU * ((k * a) as f64 / h as f64 + (l * b) as f64 / w as f64);
                                let v = x[img * h * w + a * w + b];
                                sr += v * phase.cos();
                                si += v * phase.sin();
                            }
                        }
                        let norm = ((h * w) as f64).sqrt();
                        re_ref[img * h * w + k * w + l] = sr / norm;
                        im_ref[img * h * w + k * w + l] = si / norm;
                    }
                }
            }
            assert!(max_diff(&re, &re_ref) < 1e-12, "re {h}x{w}");
            assert!(max_diff(&im, &im_ref) < 1e-12, "im {h}x{w}");
        }
        Ok(())
    }

    /// torch.nn.functional.adaptive_avg_pool2d, written out from its definition.
    fn pool_reference(x: &[f64], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
        let mut out = vec![0.0; oh * ow];
        for i in 0..oh {
            let (h0, h1) = ((i * h) as f64 / oh as f64, ((i + 1) * h) as f64 / oh as f64);
            let (h0, h1) = (h0.floor() as usize, h1.ceil() as usize);
            for j in 0..ow {
                let (w0, w1) = ((j * w) as f64 / ow as f64, ((j + 1) * w) as f64 / ow as f64);
                let (w0, w1) = (w0.floor() as usize, w1.ceil() as usize);
                let mut sum = 0.0;
                for a in h0..h1 {
                    for b in w0..w1 {
                        sum += x[a * w + b];
                    }
                }
                out[i * ow + j] = sum / ((h1 - h0) * (w1 - w0)) as f64;
            }
        }
        out
    }

    /// torch.nn.functional.interpolate(mode = "bilinear", align_corners = False, size = (h, w)), written out
    /// from PyTorch's `upsample_bilinear2d` kernel.
    fn upsample_reference(x: &[f64], ih: usize, iw: usize, h: usize, w: usize) -> Vec<f64> {
        let source = |dst: usize, inp: usize, out: usize| {
            let real = (inp as f64 / out as f64 * (dst as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (real.floor() as usize).min(inp - 1);
            let lambda = (real - i0 as f64).clamp(0.0, 1.0);
            (i0, if i0 < inp - 1 { i0 + 1 } else { i0 }, lambda)
        };
        let mut out = vec![0.0; h * w];
        for i in 0..h {
            let (y0, y1, ly) = source(i, ih, h);
            for j in 0..w {
                let (x0, x1, lx) = source(j, iw, w);
                out[i * w + j] = (1.0 - ly) * ((1.0 - lx) * x[y0 * iw + x0] + lx * x[y0 * iw + x1])
                    + ly * ((1.0 - lx) * x[y1 * iw + x0] + lx * x[y1 * iw + x1]);
            }
        }
        out
    }

    #[test]
    fn low_pass_matches_pytorch_pool_then_upsample() -> Result<()> {
        for (h, w, pool) in [(12, 20, 4), (12, 20, 2), (7, 5, 4), (7, 5, 2), (13, 9, 3), (16, 16, 1)] {
            let (x, low) = apply_to_values(AxisMap::LowPass { pool }, h, w)?;
            let low = low.flatten_all()?.to_vec1::<f64>()?;
            let (oh, ow) = (h / pool, w / pool);
            let reference: Vec<f64> = x
                .chunks(h * w)
                .flat_map(|img| upsample_reference(&pool_reference(img, h, w, oh, ow), oh, ow, h, w))
                .collect();
            let err = max_diff(&low, &reference);
            assert!(err < 1e-12, "{h}x{w} pool {pool}: {err}");
        }
        Ok(())
    }

    #[test]
    fn pool_larger_than_side_is_an_error() {
        let t = Tensor::zeros((1, 1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        let err = AxisMaps::default().apply(AxisMap::LowPass { pool: 4 }, &t).unwrap_err().to_string();
        assert!(err.contains("loss.pool"), "{err}");
    }

    #[test]
    fn gaussian_matches_zero_padded_convolution() -> Result<()> {
        let (h, w) = (9, 14);
        let (x, blurred) = apply_to_values(AxisMap::Gaussian, h, w)?;
        let blurred = blurred.flatten_all()?.to_vec1::<f64>()?;
        let g: Vec<f64> = (0..11).map(|k| (-((k as f64 - 5.0).powi(2)) / 4.5).exp()).collect();
        let total: f64 = g.iter().sum::<f64>().powi(2);
        let mut reference = vec![0.0; x.len()];
        for img in 0..6 {
            for i in 0..h as i64 {
                for j in 0..w as i64 {
                    let mut sum = 0.0;
                    for a in 0..11i64 {
                        for b in 0..11i64 {
                            let (y, z) = (i + a - 5, j + b - 5);
                            if (0..h as i64).contains(&y) && (0..w as i64).contains(&z) {
                                sum += g[a as usize] * g[b as usize] * x[img * h * w + (y as usize) * w + z as usize];
                            }
                        }
                    }
                    reference[img * h * w + (i as usize) * w + j as usize] = sum / total;
                }
            }
        }
        assert!(max_diff(&blurred, &reference) < 1e-12);
        Ok(())
    }

    #[test]
    fn matrices_are_cached_per_length_and_dtype() -> Result<()> {
        let maps = AxisMaps::default();
        let a = maps.transposed(AxisMap::Gaussian, 8, DType::F32, &Device::Cpu)?;
        let b = maps.transposed(AxisMap::Gaussian, 8, DType::F32, &Device::Cpu)?;
        assert_eq!(a.id(), b.id());
        let c = maps.transposed(AxisMap::Gaussian, 8, DType::F64, &Device::Cpu)?;
        assert_eq!(c.dtype(), DType::F64);
        Ok(())
    }
}
