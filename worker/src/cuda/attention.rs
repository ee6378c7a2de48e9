//! Fused attention on the GPU: bf16 q, k, v in the projections' token-major [B, S, H, D] layout, D ∈ {32, 64,
//! 128}, with batch padding given as key lengths. See kernels.cu for the algorithm.

use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use super::launch::{Fresh, cuda_parts, device_of, function, view};

/// The forward's output and the log-sum-exp of every query row, [B, H, S] f32, which the backward needs.
pub struct AttentionForward {
    pub o: Fresh,
    pub lse: Tensor,
}

/// The kernels of one head size and the shared memory each block takes.
struct Kernels {
    fwd: &'static str,
    dot: &'static str,
    dkdv: &'static str,
    dq: &'static str,
    /// Bytes of dynamic shared memory of the forward and dQ kernels: 192 rows of D + 8 bf16 (64 + 64 + 64, or
    /// 64 + 64 + 32 + 32 rows of tiles, each padded by 8 so that fragment loads hit distinct banks).
    tiles: u32,
}

impl Kernels {
    fn of(d: usize) -> Option<Kernels> {
        let (fwd, dot, dkdv, dq) = match d {
            32 => ("attn_fwd_d32", "attn_bwd_dot_d32", "attn_bwd_dkdv_d32", "attn_bwd_dq_d32"),
            64 => ("attn_fwd_d64", "attn_bwd_dot_d64", "attn_bwd_dkdv_d64", "attn_bwd_dq_d64"),
            128 => ("attn_fwd_d128", "attn_bwd_dot_d128", "attn_bwd_dkdv_d128", "attn_bwd_dq_d128"),
            _ => return None,
        };
        Some(Kernels { fwd, dot, dkdv, dq, tiles: (192 * (d + 8) * 2) as u32 })
    }
}

/// The shape [B, S, H, D] and device of q, k, v (and of `more`, e.g. o and dO), if the kernels apply: bf16,
/// the same shape, on one GPU, with a supported head size and 16-byte-aligned rows.
fn applies<'a>(q: &'a Tensor, rest: &[&Tensor]) -> Result<Option<(&'a CudaDevice, [usize; 4], Kernels)>> {
    let Some(dev) = device_of(q) else { return Ok(None) };
    let (b, s, h, d) = q.dims4()?;
    let Some(kernels) = Kernels::of(d) else { return Ok(None) };
    let fits = |t: &Tensor| {
        t.dtype() == DType::BF16
            && t.dims() == q.dims()
            && t.device().same_device(q.device())
            && t.is_contiguous()
            && t.layout().start_offset().is_multiple_of(8)
    };
    Ok((fits(q) && rest.iter().all(|t| fits(t))).then_some((dev, [b, s, h, d], kernels)))
}

fn grid(b: usize, s: usize, h: usize, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (s.div_ceil(64) as u32, h as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// softmax(q kᵀ·scale, keys past `key_lens[b]` masked) v and the log-sum-exp of each row; `None` where the
/// kernels do not apply. `key_lens` is [B] u32 on q's device, or `None` when no key is padding.
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_lens: Option<&Tensor>,
    scale: f64,
) -> Result<Option<AttentionForward>> {
    let Some((dev, [b, s, h, d], kernels)) = applies(q, &[k, v])? else { return Ok(None) };
    let f = function(dev, kernels.fwd, kernels.tiles)?;
    let (qs, ql) = cuda_parts(q).expect("checked");
    let (ks, kl) = cuda_parts(k).expect("checked");
    let (vs, vl) = cuda_parts(v).expect("checked");
    let lens = key_lens.and_then(cuda_parts);
    let (qv, kv, vv) = (view::<bf16>(&qs, &ql)?, view::<bf16>(&ks, &kl)?, view::<bf16>(&vs, &vl)?);
    let lv = lens.as_ref().map(|(s, l)| view::<u32>(s, l)).transpose()?;
    // SAFETY: the kernel writes every element of both.
    let (mut o, mut lse) = unsafe { (dev.alloc::<bf16>(b * s * h * d)?, dev.alloc::<f32>(b * h * s)?) };
    let (null, s32, h32, scale) = (0u64, s as i32, h as i32, scale as f32);
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&mut lse);
    match &lv {
        Some(v) => l.arg(v),
        None => l.arg(&null),
    };
    l.arg(&s32).arg(&h32).arg(&scale);
    // SAFETY: the arguments match attn_fwd_d{D}; q, k, v, o hold B·S·H·D elements, lse B·H·S, key_lens B.
    unsafe { l.launch(grid(b, s, h, kernels.tiles)) }.w()?;
    Ok(Some(AttentionForward { o: Fresh::new(o, dev, (b, s, h, d)), lse: Fresh::new(lse, dev, (b, h, s)).tensor() }))
}

/// The gradients (dq if `want_dq`, dk, dv) of [`attention_forward`] from its inputs, its output `o`, its
/// log-sum-exp and dL/do; `None` where the kernels do not apply.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    g: &Tensor,
    lse: &Tensor,
    key_lens: Option<&Tensor>,
    scale: f64,
    want_dq: bool,
) -> Result<Option<(Option<Tensor>, Tensor, Tensor)>> {
    let Some((dev, [b, s, h, d], kernels)) = applies(q, &[k, v, o, g])? else { return Ok(None) };
    let (qs, ql) = cuda_parts(q).expect("checked");
    let (ks, kl) = cuda_parts(k).expect("checked");
    let (vs, vl) = cuda_parts(v).expect("checked");
    let (os, ol) = cuda_parts(o).expect("checked");
    let (gs, gl) = cuda_parts(g).expect("checked");
    let Some((ls, ll)) = cuda_parts(lse) else { return Ok(None) };
    let lens = key_lens.and_then(cuda_parts);
    let (qv, kv, vv) = (view::<bf16>(&qs, &ql)?, view::<bf16>(&ks, &kl)?, view::<bf16>(&vs, &vl)?);
    let (ov, gv, lsev) = (view::<bf16>(&os, &ol)?, view::<bf16>(&gs, &gl)?, view::<f32>(&ls, &ll)?);
    let lv = lens.as_ref().map(|(s, l)| view::<u32>(s, l)).transpose()?;
    let (null, b32, s32, h32, scale) = (0u64, b as i32, s as i32, h as i32, scale as f32);
    let n = b * s * h * d;
    let stream = dev.cuda_stream();

    // D = rowsum(dO ∘ O), one warp per (token, head).
    // SAFETY: written in full by the kernel.
    let mut dvec = unsafe { dev.alloc::<f32>(b * h * s) }?;
    let f = function(dev, kernels.dot, 0)?;
    let mut l = stream.launch_builder(&f);
    l.arg(&ov).arg(&gv).arg(&mut dvec).arg(&b32).arg(&s32).arg(&h32);
    let rows = b * s * h;
    let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: o and dO hold B·S·H·D elements, D B·H·S.
    unsafe { l.launch(cfg) }.w()?;

    // SAFETY: the kernel writes every row of both, zeros for padding keys.
    let (mut dk, mut dv) = unsafe { (dev.alloc::<bf16>(n)?, dev.alloc::<bf16>(n)?) };
    let shared = kernels.tiles + 2 * 32 * 4;
    let f = function(dev, kernels.dkdv, shared)?;
    let mut l = stream.launch_builder(&f);
    l.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lsev).arg(&dvec);
    match &lv {
        Some(v) => l.arg(v),
        None => l.arg(&null),
    };
    l.arg(&mut dk).arg(&mut dv).arg(&s32).arg(&h32).arg(&scale);
    // SAFETY: the arguments match attn_bwd_dkdv_d{D}; sizes as above.
    unsafe { l.launch(grid(b, s, h, shared)) }.w()?;

    let dq = match want_dq {
        true => {
            // SAFETY: written in full by the kernel.
            let mut dq = unsafe { dev.alloc::<bf16>(n) }?;
            let f = function(dev, kernels.dq, kernels.tiles)?;
            let mut l = stream.launch_builder(&f);
            l.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lsev).arg(&dvec);
            match &lv {
                Some(v) => l.arg(v),
                None => l.arg(&null),
            };
            l.arg(&mut dq).arg(&s32).arg(&h32).arg(&scale);
            // SAFETY: the arguments match attn_bwd_dq_d{D}; sizes as above.
            unsafe { l.launch(grid(b, s, h, kernels.tiles)) }.w()?;
            Some(Fresh::new(dq, dev, (b, s, h, d)).tensor())
        }
        false => None,
    };
    let shape = (b, s, h, d);
    Ok(Some((dq, Fresh::new(dk, dev, shape).tensor(), Fresh::new(dv, dev, shape).tensor())))
}
