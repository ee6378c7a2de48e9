//! Checks of every fused op against the composed candle ops it replaces, on random inputs at a few shapes, on
//! the device at hand (`acrf doctor`): the values and the gradients of every input.
//!
//! In f32 the fused op must equal the composed one to 1e-5 relative. In bf16 both round, differently: each is
//! compared with the composed ops in f32 on the same (bf16-rounded) inputs, and the fused op passes when it is
//! at most twice as far from that reference as candle's composed bf16 ops are (plus 1e-3), so "within bf16
//! rounding" is measured, not assumed.

use acrf_common::rng::{Key, domain, fill_normal_f32};
use candle_core::{DType, Device, Result, Tensor, Var};

use crate::ops::{self, AttentionOpts, KeyMask, NormWeight};

/// The outcome of one op at one shape and dtype.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub op: &'static str,
    pub shape: String,
    pub dtype: String,
    /// max |fused − reference| / max |reference| of the value, and the worst over the inputs' gradients.
    pub value_err: f64,
    pub grad_err: f64,
    /// In bf16, the same errors of the composed bf16 ops, which set the bound.
    pub composed_err: Option<(f64, f64)>,
    pub bound: (f64, f64),
    pub pass: bool,
}

/// A function of an op's inputs.
type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// An op under test: the fused version and the composed reference, both functions of the same inputs.
struct Case {
    op: &'static str,
    shape: String,
    inputs: Vec<Tensor>,
    fused: Op,
    composed: Op,
}

fn randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; shape.iter().product()];
    fill_normal_f32(Key::new(seed, domain::MODEL_INIT, 1, 0), &mut v);
    Tensor::from_vec(v, shape, device)
}

/// The value and every input's gradient of Σ f(inputs) · r, in `dtype`, for a fixed random r.
fn value_and_grads(
    inputs: &[Tensor],
    dtype: DType,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype)?)).collect::<Result<Vec<_>>>()?;
    let y = f(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>())?;
    let r = randn(7, y.dims(), y.device())?.to_dtype(dtype)?;
    let store = (&y * r)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|v| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => candle_core::bail!("an input got no gradient"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((y, grads))
}

/// max |a − b| / max |b| in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let diff = (&a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// The error of `(value, grads)` against `reference`: the value's and the worst gradient's.
fn errors(got: &(Tensor, Vec<Tensor>), reference: &(Tensor, Vec<Tensor>)) -> Result<(f64, f64)> {
    let value = rel_err(&got.0, &reference.0)?;
    let mut grad = 0f64;
    for (g, r) in got.1.iter().zip(&reference.1) {
        grad = grad.max(rel_err(g, r)?);
    }
    Ok((value, grad))
}

fn run(case: Case, dtype: DType) -> Result<Check> {
    let shape = case.shape.clone();
    let fused = value_and_grads(&case.inputs, dtype, &*case.fused)?;
    let (value_err, grad_err, composed_err, bound) = match dtype {
        DType::F32 => {
            let reference = value_and_grads(&case.inputs, DType::F32, &*case.composed)?;
            let (v, g) = errors(&fused, &reference)?;
            (v, g, None, (1e-5, 1e-5))
        }
        _ => {
            // The reference sees the inputs as the half-precision run does: rounded once.
            let rounded =
                case.inputs.iter().map(|t| t.to_dtype(dtype)?.to_dtype(DType::F32)).collect::<Result<Vec<_>>>()?;
            let reference = value_and_grads(&rounded, DType::F32, &*case.composed)?;
            let composed = value_and_grads(&case.inputs, dtype, &*case.composed)?;
            let (v, g) = errors(&fused, &reference)?;
            let (cv, cg) = errors(&composed, &reference)?;
            (v, g, Some((cv, cg)), (2.0 * cv + 1e-3, 2.0 * cg + 1e-3))
        }
    };
    let pass = value_err.is_finite() && grad_err.is_finite() && value_err <= bound.0 && grad_err <= bound.1;
    Ok(Check {
        op: case.op,
        shape,
        dtype: format!("{dtype:?}").to_lowercase(),
        value_err,
        grad_err,
        composed_err,
        bound,
        pass,
    })
}

/// Every fused op at a few shapes, in the dtype training uses on `device`: f32 on a CPU, bf16 on a GPU.
pub fn checks(device: &Device) -> Result<Vec<Check>> {
    let dtype = if device.is_cuda() { DType::BF16 } else { DType::F32 };
    let mut out = Vec::new();
    for case in cases(device)? {
        out.push(run(case, dtype)?);
    }
    Ok(out)
}

fn cases(device: &Device) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    let mut seed = 0u64;
    let mut rand = |shape: &[usize], scale: f64| -> Result<Tensor> {
        seed += 1;
        randn(seed, shape, device)? * scale
    };
    // Attention: the tiled op against softmax over materialised scores, with a padded second sample whose keys
    // end inside a tile; the head sizes the GPU kernels are built for.
    for (s, d) in [(130, 32), (300, 64), (300, 128), (1030, 128)] {
        let (h, short) = (3, s - 77);
        let mask = KeyMask::new(&[s, short], device)?.expect("two lengths");
        let qkv = vec![rand(&[2, s, h, d], 1.0)?, rand(&[2, s, h, d], 1.0)?, rand(&[2, s, h, d], 1.0)?];
        let scale = 1.0 / (d as f64).sqrt();
        let (m1, m2) = (mask.clone(), mask);
        cases.push(Case {
            op: "attention",
            shape: format!("B 2 (lengths {s}, {short}), H {h}, D {d}"),
            inputs: qkv,
            fused: Box::new(move |t| {
                let opts = AttentionOpts { fused: true, tiled: true, ..AttentionOpts::default() };
                ops::attention(&t[0], &t[1], &t[2], Some(&m1), scale, opts)
            }),
            composed: Box::new(move |t| {
                ops::attention(&t[0], &t[1], &t[2], Some(&m2), scale, AttentionOpts::default())
            }),
        });
    }
    for (rows, n) in [(77, 256), (130, 3840)] {
        let w = (rand(&[n], 0.2)? + 1.0)?;
        let s = (rand(&[2, 1, n], 0.3)? + 1.0)?;
        let (w1, s1, w2, s2) = (w.clone(), s.clone(), w.clone(), s.clone());
        cases.push(Case {
            op: "rms_norm · scale",
            shape: format!("[2, {rows}, {n}]"),
            inputs: vec![rand(&[2, rows, n], 2.0)?],
            fused: Box::new(move |t| {
                let s = s1.to_dtype(t[0].dtype())?;
                ops::rms_norm_fused(&t[0], &NormWeight::new(&w1.to_dtype(t[0].dtype())?)?, 1e-6, Some(&s))
            }),
            composed: Box::new(move |t| {
                ops::rms_norm(&t[0], &w2.to_dtype(t[0].dtype())?, 1e-6)?.broadcast_mul(&s2.to_dtype(t[0].dtype())?)
            }),
        });
        let (w1, s1, w2, s2) = (w.clone(), s.clone(), w, s);
        cases.push(Case {
            op: "residual + rms_norm · gate",
            shape: format!("[2, {rows}, {n}]"),
            inputs: vec![rand(&[2, rows, n], 1.0)?, rand(&[2, rows, n], 2.0)?],
            fused: Box::new(move |t| {
                let (w, s) = (NormWeight::new(&w1.to_dtype(t[0].dtype())?)?, s1.to_dtype(t[0].dtype())?);
                ops::rms_norm_residual(&t[0], &t[1], &w, 1e-6, Some(&s))
            }),
            composed: Box::new(move |t| {
                let normed = ops::rms_norm(&t[1], &w2.to_dtype(t[0].dtype())?, 1e-6)?;
                &t[0] + normed.broadcast_mul(&s2.to_dtype(t[0].dtype())?)?
            }),
        });
    }
    for (s, h, d) in [(33, 2, 32), (130, 4, 128)] {
        let w = (rand(&[d], 0.2)? + 1.0)?;
        let angles = rand(&[2, s, 1, d / 2], 3.0)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (w1, c1, s1, w2, c2, s2) = (w.clone(), cos.clone(), sin.clone(), w, cos, sin);
        cases.push(Case {
            op: "qk-norm + rope",
            shape: format!("[2, {s}, {h}, {d}]"),
            inputs: vec![rand(&[2, s, h, d], 2.0)?],
            fused: Box::new(move |t| {
                ops::rms_norm_rotary(&t[0], &NormWeight::new(&w1.to_dtype(t[0].dtype())?)?, 1e-5, &c1, &s1)
            }),
            composed: Box::new(move |t| {
                ops::rotary_composed(&ops::rms_norm(&t[0], &w2.to_dtype(t[0].dtype())?, 1e-5)?, &c2, &s2)
            }),
        });
    }
    for (rows, n) in [(33, 200), (130, 10240)] {
        cases.push(Case {
            op: "swiglu",
            shape: format!("[2, {rows}, {n}]"),
            inputs: vec![rand(&[2, rows, n], 3.0)?, rand(&[2, rows, n], 1.0)?],
            fused: Box::new(|t| ops::swiglu(&t[0], &t[1])),
            composed: Box::new(|t| t[0].silu()? * &t[1]),
        });
    }
    for (rows, n_in, n_out, r) in [(33, 64, 96, 4), (130, 512, 640, 16)] {
        let w = rand(&[n_out, n_in], 0.05)?;
        let (w1, w2) = (w.clone(), w);
        cases.push(Case {
            op: "lora linear",
            shape: format!("x [2, {rows}, {n_in}], W [{n_out}, {n_in}], rank {r}"),
            inputs: vec![rand(&[2, rows, n_in], 1.0)?, rand(&[r, n_in], 0.1)?, rand(&[n_out, r], 0.1)?],
            fused: Box::new(move |t| {
                let (a, b) = (t[1].to_dtype(DType::F32)?, t[2].to_dtype(DType::F32)?);
                ops::lora_linear(&t[0], &w1.to_dtype(t[0].dtype())?, None, &a, &b, 0.5)
            }),
            composed: Box::new(move |t| {
                let x = &t[0];
                let base = x.broadcast_matmul(&w2.to_dtype(x.dtype())?.t()?)?;
                let (a, b) = (t[1].to_dtype(DType::F32)?, t[2].to_dtype(DType::F32)?);
                let delta = x.to_dtype(DType::F32)?.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)?;
                base + (delta * 0.5)?.to_dtype(x.dtype())?
            }),
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks `acrf doctor` runs on a CPU pass, and they can fail: a wrong reference is caught.
    #[test]
    fn every_fused_op_passes_on_the_cpu_and_a_wrong_one_fails() -> Result<()> {
        let checks = checks(&Device::Cpu)?;
        for c in &checks {
            println!("{} {} {}: value {:.1e}, gradient {:.1e}", c.op, c.shape, c.dtype, c.value_err, c.grad_err);
            assert!(c.pass, "{c:?}");
        }
        assert!(checks.iter().any(|c| c.op == "attention") && checks.len() >= 12);
        let x = randn(1, &[2, 9, 16], &Device::Cpu)?;
        let wrong = Case {
            op: "swiglu with a wrong reference",
            shape: String::new(),
            inputs: vec![x.clone(), x],
            fused: Box::new(|t| ops::swiglu(&t[0], &t[1])),
            composed: Box::new(|t| t[0].silu()? * (&t[1] * 1.001)?),
        };
        assert!(!run(wrong, DType::F32)?.pass);
        Ok(())
    }
}
