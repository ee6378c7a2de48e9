//! The rectified-flow conventions of Z-Image (spec §1), kept in one place so that the training step, the
//! losses and the sampler cannot disagree on a sign or on which end of the σ axis is clean.
//!
//! σ is the noise fraction (0 clean, 1 pure noise), one value per sample: a `[B]` tensor that broadcasts
//! against the `[B, ...]` latents.

use candle_core::{Result, Tensor};

/// Reshapes the per-sample `[B]` tensor `s` to `[B, 1, …, 1]` with the rank of `like`, so that it scales
/// each sample of a batch.
fn per_sample(s: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut dims = vec![1; like.rank()];
    dims[0] = s.elem_count();
    s.reshape(dims)
}

/// The model input at noise fraction σ: `x_t = σ·ε + (1 − σ)·x0`.
pub fn noised(x0: &Tensor, noise: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    let s = per_sample(sigma, x0)?;
    noise.broadcast_mul(&s)? + x0.broadcast_mul(&s.affine(-1.0, 1.0)?)?
}

/// The velocity the model is trained to predict, `v = ε − x0`: the constant d x_t / dσ along the straight
/// path from the clean latent to the noise.
pub fn velocity_target(x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
    noise - x0
}

/// The timestep the Z-Image transformer expects, `t = 1 − σ`: its time runs from noise (0) to clean (1), the
/// opposite of σ (it scales by 1000 itself).
pub fn model_time(sigma: &Tensor) -> Result<Tensor> {
    sigma.affine(-1.0, 1.0)
}

/// The velocity predicted by a raw transformer output: Z-Image outputs the negated velocity, as diffusers'
/// `ZImagePipeline` assumes when it negates the output at inference.
pub fn velocity_from_model(model_out: &Tensor) -> Result<Tensor> {
    model_out.neg()
}

/// The clean latent implied by a velocity prediction, `x̂0 = x_t − σ·v_pred`: one Euler step from σ to 0.
pub fn x0_estimate(x_t: &Tensor, v_pred: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    x_t - v_pred.broadcast_mul(&per_sample(sigma, v_pred)?)?
}

/// `x̂0 − x0` from the velocity error `v_pred − v`, without forming `x_t`.
///
/// Substituting [`noised`] into [`x0_estimate`] gives `x̂0 − x0 = −σ·(v_pred − v)` exactly. The losses that
/// compare x̂0 with x0 use this form because at small σ the two latents nearly coincide, and subtracting them
/// in f32 would lose exactly the digits the loss measures.
pub fn x0_error(velocity_error: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    velocity_error.broadcast_mul(&per_sample(sigma, velocity_error)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exact_prediction_recovers_x0() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0]], &dev)?;
        let noise = Tensor::new(&[[0.3f64, 0.7], [-1.0, 2.0]], &dev)?;
        let sigma = Tensor::new(&[0.25f64, 0.9], &dev)?;
        let x_t = noised(&x0, &noise, &sigma)?;
        let v = velocity_target(&x0, &noise)?;
        let x0_hat = x0_estimate(&x_t, &v, &sigma)?;
        let diff = (x0_hat - &x0)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        let t = model_time(&sigma)?.to_vec1::<f64>()?;
        assert!((t[0] - 0.75).abs() < 1e-12 && (t[1] - 0.1).abs() < 1e-12, "{t:?}");

        let v_pred = velocity_from_model(&Tensor::new(&[[0.1f64, 0.2], [0.3, 0.4]], &dev)?)?;
        let direct = (x0_estimate(&x_t, &v_pred, &sigma)? - &x0)?;
        let via_error = x0_error(&(&v_pred - &v)?, &sigma)?;
        let diff = (direct - via_error)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }
}
