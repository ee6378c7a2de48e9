//! The AC-RF noise levels (spec §2): the shift map, the Turbo anchors, the inference sigmas, jitter and
//! clamp, and the uniform ablation. All in f64, so that the anchors match diffusers' float32 lists to well
//! within their own rounding and every rank computes the same numbers.

use crate::config::Jitter;
use crate::rng::{self, Key};

/// Training sigmas stay inside [SIGMA_MIN, SIGMA_MAX]: σ = 1 would leave no signal in x_t and σ = 0 no noise,
/// and jitter would otherwise push the outer anchors out of [0, 1].
pub const SIGMA_MIN: f64 = 0.001;
pub const SIGMA_MAX: f64 = 0.999;

/// diffusers' `num_train_timesteps`: the scheduler's smallest sigma before shifting is 1/1000.
const TRAIN_TIMESTEPS: f64 = 1000.0;

/// The shift map s_k(x) = k·x / (1 + (k − 1)·x): it keeps 0 and 1 fixed and, for k > 1, moves the
/// intermediate sigmas towards 1, i.e. spends more steps at high noise.
pub fn shift_sigma(x: f64, shift: f64) -> f64 {
    shift * x / (1.0 + (shift - 1.0) * x)
}

/// numpy's `linspace(start, stop, n)` (endpoint included, last value exactly `stop`).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// The K training anchors in schedule order (descending σ): diffusers'
/// `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(K).sigmas[:-1]`.
///
/// The scheduler's constructor already shifts its table, so its σ_min is s_k(1/1000); `set_timesteps` then
/// spaces K points from 1 down to that σ_min and shifts them again. σ_min is therefore shifted twice
/// (0.0089 rather than 0.003 for k = 3), which we reproduce so that the anchors are the sigmas a Turbo
/// sampler built on that scheduler visits.
pub fn anchors(k_steps: usize, shift: f64) -> Vec<f64> {
    let sigma_min = shift_sigma(1.0 / TRAIN_TIMESTEPS, shift);
    linspace(1.0, sigma_min, k_steps).into_iter().map(|u| shift_sigma(u, shift)).collect()
}

/// The `n`-step sampling sigmas of diffusers' `ZImagePipeline`, which sets the scheduler's σ_min to 0:
/// s_k(linspace(1, 1/n, n)) followed by the final 0 the last Euler step lands on.
pub fn inference_sigmas(n: usize, shift: f64) -> Vec<f64> {
    let mut sigmas: Vec<f64> = linspace(1.0, 1.0 / n as f64, n).into_iter().map(|u| shift_sigma(u, shift)).collect();
    sigmas.push(0.0);
    sigmas
}

pub fn clamp_sigma(sigma: f64) -> f64 {
    sigma.clamp(SIGMA_MIN, SIGMA_MAX)
}

/// The jitter ξ for `key`: U(−η, η), or N(0, η²) for `Jitter::Gaussian`. Jitter lets the adapter see a
/// neighbourhood of each anchor instead of K exact points, so it does not overfit to them.
pub fn jitter_offset(kind: Jitter, eta: f64, key: Key) -> f64 {
    match kind {
        Jitter::Uniform => eta * (2.0 * rng::uniform01(key, 0) - 1.0),
        Jitter::Gaussian => eta * rng::normal(key, 0),
    }
}

/// σ = clamp(anchor + ξ) with ξ from [`jitter_offset`].
pub fn jittered_sigma(anchor: f64, kind: Jitter, eta: f64, key: Key) -> f64 {
    clamp_sigma(anchor + jitter_offset(kind, eta, key))
}

/// The uniform-timestep ablation: σ = clamp(s_k(u)), u ~ U(0, 1) drawn from `key`.
pub fn uniform_sigma(shift: f64, key: Key) -> f64 {
    clamp_sigma(shift_sigma(rng::uniform01(key, 0), shift))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::domain;

    #[test]
    fn shift_map_fixes_the_ends() {
        for k in [0.5, 1.0, 3.0, 7.0] {
            assert_eq!(shift_sigma(0.0, k), 0.0);
            assert_eq!(shift_sigma(1.0, k), 1.0);
        }
        assert_eq!(shift_sigma(0.25, 1.0), 0.25);
        assert!((shift_sigma(0.5, 3.0) - 0.75).abs() < 1e-15);
    }

    #[test]
    fn turbo_anchors() {
        // The report's list for K = 10, k = 3 (spec §2).
        let want = [1.000, 0.960, 0.913, 0.858, 0.790, 0.707, 0.602, 0.465, 0.278, 0.009];
        let got = anchors(10, 3.0);
        assert_eq!(got.len(), 10);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 6e-4, "{got:?}");
        }
        assert_eq!(anchors(1, 3.0), vec![1.0]);
        let sigma_min = shift_sigma(shift_sigma(1e-3, 3.0), 3.0);
        assert_eq!(anchors(2, 3.0), vec![1.0, sigma_min]);
    }

    #[test]
    fn turbo_inference_sigmas() {
        let s = inference_sigmas(9, 3.0);
        // s_3(k/9) = 3k/(9 + 2k) for k = 9, 8, …, 1, then 0.
        let want: Vec<f64> = (1..=9).rev().map(|k| 3.0 * k as f64 / (9.0 + 2.0 * k as f64)).chain([0.0]).collect();
        assert_eq!(s.len(), 10);
        for (g, w) in s.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15, "{s:?}");
        }
        assert_eq!(s[9], 0.0);
        assert_eq!(inference_sigmas(1, 3.0), vec![1.0, 0.0]);
    }

    #[test]
    fn jitter_distributions() {
        let eta = 0.02;
        let draws = |kind| -> Vec<f64> {
            (0..50_000).map(|g| jitter_offset(kind, eta, Key::new(5, domain::JITTER, 0, g))).collect()
        };
        let stats = |v: &[f64]| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
            (mean, var)
        };
        let u = draws(Jitter::Uniform);
        assert!(u.iter().all(|x| x.abs() <= eta));
        let (mean, var) = stats(&u);
        assert!(mean.abs() < 3e-4 && (var / (eta * eta / 3.0) - 1.0).abs() < 0.03, "{mean} {var}");
        let (mean, var) = stats(&draws(Jitter::Gaussian));
        assert!(mean.abs() < 3e-4 && (var / (eta * eta) - 1.0).abs() < 0.03, "{mean} {var}");
    }

    #[test]
    fn sigmas_are_clamped() {
        let key = Key::new(6, domain::JITTER, 0, 0);
        assert_eq!(jittered_sigma(1.0, Jitter::Uniform, 0.0, key), SIGMA_MAX);
        assert_eq!(jittered_sigma(0.0, Jitter::Gaussian, 0.0, key), SIGMA_MIN);
        for g in 0..1000 {
            let key = Key::new(6, domain::UNIFORM_SIGMA, 0, g);
            let s = uniform_sigma(3.0, key);
            assert!((SIGMA_MIN..=SIGMA_MAX).contains(&s));
            assert_eq!(s, clamp_sigma(shift_sigma(rng::uniform01(key, 0), 3.0)));
        }
    }
}
