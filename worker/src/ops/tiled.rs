//! Attention on the CPU in tiles with an online softmax (FlashAttention-2's algorithm, in f32), so that its
//! memory is linear in the sequence length: a head's scores exist one 64 × 128 tile at a time, where the
//! chunked path holds a whole [rows, S] block of them.
//!
//! The same algorithm runs on the GPU (cuda/kernels.cu); this is its CPU form and its reference in the tests.
//! Every tile has a fixed shape (partial tiles are zero-padded and padding keys masked), so a sample's numbers
//! do not depend on how long the other samples of its batch are, and work per (sample, head) runs in a fixed
//! order, so the result does not depend on the thread count either.

use pulp::{Simd, WithSimd};
use rayon::prelude::*;

use crate::kernels::{exp, vectorized};

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 128;

/// [B, S, H, D] of q, k, v and o, all token-major and contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub s: usize,
    pub h: usize,
    pub d: usize,
}

impl Dims {
    /// Head `h` of sample `b`, rows `0..rows` (zero past S), packed as [rows, D].
    fn pack(&self, x: &[f32], b: usize, h: usize, rows: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * self.d];
        for (r, dst) in out.chunks_exact_mut(self.d).take(self.s).enumerate() {
            let at = ((b * self.s + r) * self.h + h) * self.d;
            dst.copy_from_slice(&x[at..at + self.d]);
        }
        out
    }

    /// Writes a packed head back into `out` [B, S, H, D].
    fn unpack(&self, packed: &[f32], b: usize, h: usize, out: &mut [f32]) {
        for (r, src) in packed.chunks_exact(self.d).take(self.s).enumerate() {
            let at = ((b * self.s + r) * self.h + h) * self.d;
            out[at..at + self.d].copy_from_slice(src);
        }
    }

    fn heads(&self) -> impl ParallelIterator<Item = (usize, usize)> + use<> {
        let h = self.h;
        (0..self.b * h).into_par_iter().map(move |i| (i / h, i % h))
    }
}

/// `dst` [m, n] (row stride n) = (`acc` ? dst : 0) + `beta` · lhs · rhs, with lhs(i, l) = lhs[i·lr + l·lc] and
/// rhs(l, j) = rhs[l·rr + j·rc].
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    acc: bool,
    lhs: &[f32],
    (lr, lc): (usize, usize),
    rhs: &[f32],
    (rr, rc): (usize, usize),
    beta: f32,
) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(lhs.len() > (m - 1) * lr + (k - 1) * lc, "matmul: lhs out of bounds");
    assert!(rhs.len() > (k - 1) * rr + (n - 1) * rc, "matmul: rhs out of bounds");
    // SAFETY: the asserts keep every index gemm forms inside the three slices; dst does not alias the inputs
    // (a &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            lhs.as_ptr(),
            lc as isize,
            lr as isize,
            rhs.as_ptr(),
            rc as isize,
            rr as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// softmax(q kᵀ·scale, keys past `lens[b]` masked) v and the log-sum-exp of every row ([B, H, S]).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, lens: &[usize], scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Dims { s, d, .. } = dims;
    let q_rows = s.div_ceil(BR) * BR;
    let heads: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = dims
        .heads()
        .map(|(b, h)| {
            let klen = lens[b];
            let k_rows = klen.div_ceil(BC) * BC;
            let (qp, kp, vp) = (dims.pack(q, b, h, q_rows), dims.pack(k, b, h, k_rows), dims.pack(v, b, h, k_rows));
            let mut o = vec![0f32; q_rows * d];
            let mut lse = vec![0f32; q_rows];
            let mut scores = vec![0f32; BR * BC];
            for i0 in (0..q_rows).step_by(BR) {
                let acc = &mut o[i0 * d..(i0 + BR) * d];
                let (mut m, mut l) = ([f32::NEG_INFINITY; BR], [0f32; BR]);
                for j0 in (0..k_rows).step_by(BC) {
                    matmul((BR, BC, d), &mut scores, false, &qp[i0 * d..], (d, 1), &kp[j0 * d..], (1, d), scale);
                    vectorized(OnlineSoftmax { scores: &mut scores, valid: klen - j0, m: &mut m, l: &mut l, acc, d });
                    matmul((BR, d, BC), acc, true, &scores, (BC, 1), &vp[j0 * d..], (d, 1), 1.0);
                }
                for (r, row) in acc.chunks_exact_mut(d).enumerate() {
                    let inv = 1.0 / l[r];
                    row.iter_mut().for_each(|x| *x *= inv);
                    lse[i0 + r] = m[r] + l[r].ln();
                }
            }
            (b, h, o, lse)
        })
        .collect();
    let mut o = vec![0f32; q.len()];
    let mut lse = vec![0f32; dims.b * dims.h * s];
    for (b, h, oh, lh) in heads {
        dims.unpack(&oh, b, h, &mut o);
        lse[(b * dims.h + h) * s..][..s].copy_from_slice(&lh[..s]);
    }
    (o, lse)
}

/// One key tile of the online softmax: the tile's scores become exp(score − running max), the running max and
/// sum of each row move on, and the row's output accumulator is rescaled to the new max.
struct OnlineSoftmax<'a> {
    scores: &'a mut [f32],
    /// Keys of the tile that are not padding.
    valid: usize,
    m: &'a mut [f32; BR],
    l: &'a mut [f32; BR],
    acc: &'a mut [f32],
    d: usize,
}

impl WithSimd for OnlineSoftmax<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let valid = self.valid.min(BC);
        for (r, row) in self.scores.chunks_exact_mut(BC).enumerate() {
            row[valid..].fill(f32::NEG_INFINITY);
            let max = row.iter().fold(self.m[r], |a, &b| a.max(b));
            let correction = exp(self.m[r] - max);
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = exp(*x - max);
                sum += *x;
            }
            self.l[r] = self.l[r] * correction + sum;
            self.m[r] = max;
            self.acc[r * self.d..(r + 1) * self.d].iter_mut().for_each(|x| *x *= correction);
        }
    }
}

/// The gradients (dq, dk, dv) of [`forward`] from its inputs, its output, its log-sum-exp and dL/do.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    dout: &[f32],
    lse: &[f32],
    dims: Dims,
    lens: &[usize],
    scale: f32,
) -> [Vec<f32>; 3] {
    let Dims { s, d, .. } = dims;
    let q_rows = s.div_ceil(BR) * BR;
    let heads: Vec<(usize, usize, [Vec<f32>; 3])> = dims
        .heads()
        .map(|(b, h)| {
            let klen = lens[b];
            let k_rows = klen.div_ceil(BC) * BC;
            let (qp, dop) = (dims.pack(q, b, h, q_rows), dims.pack(dout, b, h, q_rows));
            let (kp, vp) = (dims.pack(k, b, h, k_rows), dims.pack(v, b, h, k_rows));
            let op = dims.pack(o, b, h, q_rows);
            // A padding row (past S) gets lse = ∞, so its probabilities, and all it contributes, are 0.
            let mut rows_lse = vec![f32::INFINITY; q_rows];
            rows_lse[..s].copy_from_slice(&lse[(b * dims.h + h) * s..][..s]);
            let dvec: Vec<f32> = dop
                .chunks_exact(d)
                .zip(op.chunks_exact(d))
                .map(|(g, o)| g.iter().zip(o).map(|(g, o)| g * o).sum())
                .collect();
            let (mut dq, mut dk, mut dv) = (vec![0f32; q_rows * d], vec![0f32; k_rows * d], vec![0f32; k_rows * d]);
            let (mut p, mut ds) = (vec![0f32; BR * BC], vec![0f32; BR * BC]);
            for i0 in (0..q_rows).step_by(BR) {
                for j0 in (0..k_rows).step_by(BC) {
                    matmul((BR, BC, d), &mut p, false, &qp[i0 * d..], (d, 1), &kp[j0 * d..], (1, d), scale);
                    vectorized(Probabilities { p: &mut p, lse: &rows_lse[i0..i0 + BR], valid: klen - j0 });
                    // dV += Pᵀ dO
                    matmul((BC, d, BR), &mut dv[j0 * d..], true, &p, (1, BC), &dop[i0 * d..], (d, 1), 1.0);
                    // dP = dO Vᵀ, then dS = P ∘ (dP − D)
                    matmul((BR, BC, d), &mut ds, false, &dop[i0 * d..], (d, 1), &vp[j0 * d..], (1, d), 1.0);
                    vectorized(SoftmaxGrad { ds: &mut ds, p: &p, dvec: &dvec[i0..i0 + BR] });
                    // dQ += scale · dS K, dK += scale · dSᵀ Q
                    matmul((BR, d, BC), &mut dq[i0 * d..], true, &ds, (BC, 1), &kp[j0 * d..], (d, 1), scale);
                    matmul((BC, d, BR), &mut dk[j0 * d..], true, &ds, (1, BC), &qp[i0 * d..], (d, 1), scale);
                }
            }
            (b, h, [dq, dk, dv])
        })
        .collect();
    let mut out = [vec![0f32; q.len()], vec![0f32; q.len()], vec![0f32; q.len()]];
    for (b, h, grads) in heads {
        // dk and dv hold the rows up to the key length only: the rest of the head stays zero.
        for (packed, whole) in grads.iter().zip(out.iter_mut()) {
            dims.unpack(packed, b, h, whole);
        }
    }
    out
}

/// A tile's probabilities exp(score − lse), 0 for padding keys.
struct Probabilities<'a> {
    p: &'a mut [f32],
    lse: &'a [f32],
    valid: usize,
}

impl WithSimd for Probabilities<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        let valid = self.valid.min(BC);
        for (row, lse) in self.p.chunks_exact_mut(BC).zip(self.lse) {
            for x in row[..valid].iter_mut() {
                *x = exp(*x - lse);
            }
            row[valid..].fill(0.0);
        }
    }
}

/// dS = P ∘ (dP − D) in place of dP, with D = rowsum(dO ∘ O) per row.
struct SoftmaxGrad<'a> {
    ds: &'a mut [f32],
    p: &'a [f32],
    dvec: &'a [f32],
}

impl WithSimd for SoftmaxGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, _: S) {
        for ((ds, p), d) in self.ds.chunks_exact_mut(BC).zip(self.p.chunks_exact(BC)).zip(self.dvec) {
            for (x, p) in ds.iter_mut().zip(p) {
                *x = p * (*x - d);
            }
        }
    }
}
