//! Min-SNR per-sample weight (spec §3).
//!
//! For rectified flow at noise fraction σ the signal-to-noise ratio is ((1 − σ)/σ)². The weight caps the
//! contribution of low-noise samples (SNR > γ), which otherwise dominate the gradient with easy targets.
//! The clamp to [0.1, 1] is the report's formula; its prose claims the opposite region is damped, and the
//! formula wins (docs/acrf-math.md explains the choice).

/// The Min-SNR weight of one sample at noise fraction `sigma`; `gamma == 0` disables weighting.
pub fn min_snr_weight(sigma: f64, gamma: f64) -> f64 {
    if gamma <= 0.0 {
        return 1.0;
    }
    let s = sigma.clamp(1e-6, 1.0 - 1e-6);
    let snr = ((1.0 - s) / s).powi(2);
    (snr.min(gamma) / snr).clamp(0.1, 1.0)
}

#[cfg(test)]
mod tests {
    use super::min_snr_weight;

    #[test]
    fn damps_only_low_noise() {
        assert_eq!(min_snr_weight(0.9, 5.0), 1.0);
        assert_eq!(min_snr_weight(0.001, 5.0), 0.1);
        let w = min_snr_weight(0.278, 5.0);
        assert!((w - 0.742).abs() < 1e-3, "{w}");
        assert_eq!(min_snr_weight(0.001, 0.0), 1.0);
    }
}
