//! softmax(q kᵀ·scale + mask) v with a backward, three ways: composed candle ops (the reference), one op over
//! chunks of heads and query rows with a recomputing backward, and tiles with an online softmax, which never
//! hold more than a tile of scores (FlashAttention-2's algorithm: `tiled` on the CPU, cuda/kernels.cu on a GPU).

use candle_core::{D, DType, Device, Result, Tensor};

use super::graph::{Grad3, Value, attach3};
use super::tiled::{self, Dims};
use crate::kernels::{self, Logits, with_f32_all};

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

/// How attention is evaluated. The default is the plain composed path in one piece.
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
    /// The fused op in tiles with an online softmax where a kernel exists for the tensors (f32 on the CPU;
    /// bf16 with head size 32, 64 or 128 on a GPU), so that no [rows, S] block of scores is ever held: memory
    /// linear in the sequence length. Elsewhere the chunks above apply.
    pub tiled: bool,
}

/// The keys of each sample that are batch padding, for a batch whose samples differ in length.
#[derive(Clone)]
pub struct KeyMask {
    /// Additive, [B, 1, 1, S] f32: 0 on a sample's own keys, −∞ on padding (the composed and chunked paths').
    additive: Tensor,
    /// Each sample's length (the CPU tiles').
    lens: Vec<usize>,
    /// The lengths as [B] u32 on the device (the GPU kernels').
    #[cfg(feature = "cuda")]
    device_lens: Tensor,
}

impl KeyMask {
    /// The mask of samples of `lens` tokens padded to the longest; `None` when none is padded.
    pub fn new(lens: &[usize], device: &Device) -> Result<Option<KeyMask>> {
        let max = lens.iter().copied().max().unwrap_or(0);
        if lens.iter().all(|&l| l == max) {
            return Ok(None);
        }
        let additive: Vec<f32> =
            lens.iter().flat_map(|&l| (0..max).map(move |j| if j < l { 0.0 } else { f32::NEG_INFINITY })).collect();
        Ok(Some(KeyMask {
            additive: Tensor::from_vec(additive, (lens.len(), 1, 1, max), device)?,
            lens: lens.to_vec(),
            #[cfg(feature = "cuda")]
            device_lens: Tensor::from_vec(lens.iter().map(|&l| l as u32).collect(), lens.len(), device)?,
        }))
    }

    /// The additive form, [B, 1, 1, S].
    pub fn additive(&self) -> &Tensor {
        &self.additive
    }
}

/// softmax(q kᵀ·scale + mask) v for q, k, v [B, S, H, Dh] as the projections lay them out, the softmax in
/// f32; the output is [B, S, H, Dh] too. `mask` marks the keys that are batch padding.
///
/// Taking the token-major layout saves the graph a head-major copy of each of q, k, v and the output: each
/// chunk gathers its heads anyway.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&KeyMask>,
    scale: f64,
    opts: AttentionOpts,
) -> Result<Tensor> {
    if opts.fused
        && opts.tiled
        && let Some(o) = tiled_attention(q, k, v, mask, scale)?
    {
        return Ok(o);
    }
    let (_, s, h, _) = q.dims4()?;
    let mask = mask.map(KeyMask::additive);
    if opts.fused {
        return fused_attention(q, k, v, mask, scale, opts);
    }
    let [o] = over_grid((h, s), opts, [Over::TokenRows], |hr, qr| {
        let p = softmax_last_dim(&logits(&rows(q, hr, qr)?, &heads(k, hr)?, mask, scale)?)?;
        Ok([p.to_dtype(v.dtype())?.matmul(&heads(v, hr)?)?])
    })?;
    Ok(o)
}

/// The tiled op where a kernel exists for the tensors, `None` elsewhere.
fn tiled_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&KeyMask>, scale: f64) -> Result<Option<Tensor>> {
    let (qd, kd, vd) = (q.detach().contiguous()?, k.detach().contiguous()?, v.detach().contiguous()?);
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let lens = mask.map(|m| &m.device_lens);
        let Some(f) = crate::cuda::attention_forward(&qd, &kd, &vd, lens, scale)? else { return Ok(None) };
        let rule = TiledGrad { lse: f.lse, mask: mask.cloned(), scale };
        return attach3(q, k, v, Value::Fresh(f.o), rule).map(Some);
    }
    let (b, s, h, d) = q.dims4()?;
    let lens = tile_lens(mask, b, s);
    let dims = Dims { b, s, h, d };
    let out = with_f32_all(&[&qd, &kd, &vd], |t| tiled::forward(t[0], t[1], t[2], dims, &lens, scale as f32));
    let Some((o, lse)) = out else { return Ok(None) };
    let lse = Tensor::from_vec(lse, (b, h, s), q.device())?;
    let rule = TiledGrad { lse, mask: mask.cloned(), scale };
    attach3(q, k, v, Value::Tensor(Tensor::from_vec(o, q.shape(), q.device())?), rule).map(Some)
}

/// Each sample's key count: its length under a mask, all S without one.
fn tile_lens(mask: Option<&KeyMask>, b: usize, s: usize) -> Vec<usize> {
    mask.map_or_else(|| vec![s; b], |m| m.lens.clone())
}

struct TiledGrad {
    /// log Σ exp(logits) of every query row, head-major [B, H, S] f32.
    lse: Tensor,
    mask: Option<KeyMask>,
    scale: f64,
}

impl Grad3 for TiledGrad {
    const NAME: &'static str = "tiled-attention";

    fn grads(&self, [q, k, v]: [&Tensor; 3], o: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]> {
        let (q, k, v, o, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, o.contiguous()?, g.contiguous()?);
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let lens = self.mask.as_ref().map(|m| &m.device_lens);
            let grads = crate::cuda::attention_backward(&q, &k, &v, &o, &g, &self.lse, lens, self.scale, want[0])?;
            let Some((dq, dk, dv)) = grads else {
                candle_core::bail!("tiled attention: no GPU backward for its forward")
            };
            return Ok([dq, want[1].then_some(dk), want[2].then_some(dv)]);
        }
        let (b, s, h, d) = q.dims4()?;
        let lens = tile_lens(self.mask.as_ref(), b, s);
        let dims = Dims { b, s, h, d };
        let grads = with_f32_all(&[&q, &k, &v, &o, &g, &self.lse], |t| {
            tiled::backward(t[0], t[1], t[2], t[3], t[4], t[5], dims, &lens, self.scale as f32)
        });
        let Some(grads) = grads else {
            candle_core::bail!("tiled attention: its backward on the CPU takes f32 tensors")
        };
        let mut out = [None, None, None];
        for (i, grad) in grads.into_iter().enumerate() {
            if want[i] {
                out[i] = Some(Tensor::from_vec(grad, q.shape(), q.device())?);
            }
        }
        Ok(out)
    }
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
    use candle_core::{Device, Var};

    use super::*;
    use crate::ops::testing::{all_finite, randn, rel_err, value_and_grads};

    /// q, k, v [2, S, 3, 8] (3 heads) and a key mask that pads the second sample to S from `short` tokens.
    fn attention_case(s: usize, short: usize) -> Result<(Vec<Tensor>, KeyMask)> {
        let qkv = (0..3).map(|i| randn(10 + i, &[2, s, 3, 8])).collect::<Result<Vec<_>>>()?;
        Ok((qkv, KeyMask::new(&[s, short], &Device::Cpu)?.expect("the samples differ in length")))
    }

    /// The chunked and the tiled op against the plain composed path: values to 1e-6 and every gradient to 1e-5
    /// relative in f32, on a short case (one tile) and a long one (several query and key tiles, a partial
    /// last tile, and a padded sample whose keys end inside a tile).
    #[test]
    fn chunked_fused_and_tiled_attention_match_the_plain_one() -> Result<()> {
        let scale = 1.0 / 8f64.sqrt();
        let mut worst = (0f32, 0f32);
        for (s, short) in [(11, 7), (300, 137)] {
            let (qkv, mask) = attention_case(s, short)?;
            let run = |opts: AttentionOpts| {
                value_and_grads(&qkv, DType::F32, |t| attention(&t[0], &t[1], &t[2], Some(&mask), scale, opts))
            };
            let (o0, g0) = run(AttentionOpts::default())?;
            let chunkings = [(0, 0), (1, 0), (2, 0), (0, 4), (0, 11), (2, 4), (1, 1)];
            let variants = chunkings
                .iter()
                .flat_map(|&(head_chunk, query_chunk)| {
                    [false, true].map(|fused| AttentionOpts { head_chunk, query_chunk, fused, tiled: false })
                })
                .chain([AttentionOpts { fused: true, tiled: true, ..AttentionOpts::default() }]);
            for opts in variants {
                let (o, g) = run(opts)?;
                let err = rel_err(&o, &o0)?;
                worst.0 = worst.0.max(err);
                assert!(err <= 1e-6, "S {s}, {opts:?}: output differs by {err:e}");
                for (name, (a, b)) in ["q", "k", "v"].iter().zip(g.iter().zip(&g0)) {
                    assert!(all_finite(a)?, "S {s}, {opts:?}: d{name} is not finite");
                    let err = rel_err(a, b)?;
                    worst.1 = worst.1.max(err);
                    assert!(err <= 1e-5, "S {s}, {opts:?}: d{name} differs by {err:e}");
                }
            }
        }
        println!("worst relative error: output {:.2e}, gradients {:.2e}", worst.0, worst.1);
        Ok(())
    }

    /// A sample's attention output and gradients in a padded batch are bitwise those of the sample alone:
    /// what makes accumulated micro-batches equal one large batch. (The model's padding rows get no gradient,
    /// as here: the head drops them.)
    #[test]
    fn tiled_attention_of_a_sample_does_not_depend_on_its_batch() -> Result<()> {
        let (s, short) = (300, 137);
        let (qkv, mask) = attention_case(s, short)?;
        let opts = AttentionOpts { fused: true, tiled: true, ..AttentionOpts::default() };
        let own_rows =
            Tensor::from_vec((0..2 * s).map(|i| u8::from(i < s + short) as f32).collect(), (2, s, 1, 1), &Device::Cpu)?;
        let r = randn(99, &[2, s, 3, 8])?.broadcast_mul(&own_rows)?;
        let run = |inputs: &[Tensor], r: &Tensor, mask: Option<&KeyMask>| -> Result<(Tensor, Vec<Tensor>)> {
            let vars = inputs.iter().map(Var::from_tensor).collect::<Result<Vec<_>>>()?;
            let o = attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), mask, 0.35, opts)?;
            let store = (&o * r)?.sum_all()?.backward()?;
            Ok((o, vars.iter().map(|v| store.get(v.as_tensor()).expect("a gradient").clone()).collect()))
        };
        let (o, g) = run(&qkv, &r, Some(&mask))?;
        let sample = |t: &Tensor| t.narrow(0, 1, 1)?.narrow(1, 0, short);
        let alone: Vec<Tensor> = qkv.iter().map(sample).collect::<Result<_>>()?;
        let (o1, g1) = run(&alone, &sample(&r)?, None)?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        assert_eq!(flat(&sample(&o)?)?, flat(&o1)?, "outputs");
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            assert!(flat(&sample(&g[i])?)? == flat(&g1[i])?, "d{name} differs");
        }
        Ok(())
    }

    #[test]
    fn fused_attention_runs_in_bf16() -> Result<()> {
        let (qkv, mask) = attention_case(11, 7)?;
        let run = |dtype: DType, fused: bool| {
            let opts = AttentionOpts { head_chunk: 2, query_chunk: 4, fused, tiled: true };
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
        let (qkv, mask) = attention_case(11, 7)?;
        let q = Var::from_tensor(&qkv[0])?;
        for tiled in [false, true] {
            let opts = AttentionOpts { head_chunk: 1, query_chunk: 4, fused: true, tiled };
            let store = attention(q.as_tensor(), &qkv[1], &qkv[2], Some(&mask), 0.35, opts)?.sum_all()?.backward()?;
            assert_eq!(store.get_ids().collect::<Vec<_>>(), [&q.as_tensor().id()], "tiled {tiled}");
        }
        Ok(())
    }

    #[test]
    fn untracked_inputs_build_no_graph() -> Result<()> {
        let (qkv, _) = attention_case(11, 7)?;
        for tiled in [false, true] {
            let opts = AttentionOpts { fused: true, tiled, ..AttentionOpts::default() };
            assert!(!attention(&qkv[0], &qkv[1], &qkv[2], None, 0.35, opts)?.track_op());
        }
        Ok(())
    }
}
