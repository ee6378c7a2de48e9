//! The job configuration: one TOML file that drives a CPU run, a one-GPU run and a multi-node run alike.
//!
//! Every section rejects unknown keys, and [`Config::validate`] names the offending key with its section
//! (`acrf.jitter_scale`), so a typo never silently falls back to a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), message: message.into() }
}

/// Where the noise level of a training slot comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSampling {
    /// AC-RF: the Turbo inference anchors plus jitter (spec §2).
    Anchor,
    /// Ablation: σ = s_k(U(0,1)), clamped.
    Uniform,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    Uniform,
    Gaussian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    Standard,
    Frequency,
    Style,
    Unified,
}

impl LossMode {
    pub const ALL: [LossMode; 4] = [LossMode::Standard, LossMode::Frequency, LossMode::Style, LossMode::Unified];

    pub fn name(self) -> &'static str {
        match self {
            LossMode::Standard => "standard",
            LossMode::Frequency => "frequency",
            LossMode::Style => "style",
            LossMode::Unified => "unified",
        }
    }
}

impl std::str::FromStr for LossMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LossMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown loss mode `{s}` (standard, frequency, style, unified)"))
    }
}

/// The AC-RF noise schedule (spec §2, §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcrfConfig {
    /// K: number of Turbo inference anchors.
    pub turbo_steps: usize,
    /// k in s_k(x) = kx / (1 + (k−1)x).
    pub shift: f64,
    /// η: half-width of the uniform jitter, or the std of the gaussian one.
    pub jitter_scale: f64,
    pub jitter: Jitter,
    /// γ of Min-SNR; 0 disables the weighting.
    pub snr_gamma: f64,
    pub timestep_sampling: TimestepSampling,
}

impl Default for AcrfConfig {
    fn default() -> Self {
        AcrfConfig {
            turbo_steps: 10,
            shift: 3.0,
            jitter_scale: 0.02,
            jitter: Jitter::Uniform,
            snr_gamma: 5.0,
            timestep_sampling: TimestepSampling::Anchor,
        }
    }
}

impl AcrfConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.turbo_steps == 0 || self.turbo_steps > 1000 {
            return Err(invalid("acrf.turbo_steps", format!("must be in 1..=1000, got {}", self.turbo_steps)));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(invalid("acrf.shift", format!("must be a positive number, got {}", self.shift)));
        }
        if !(self.jitter_scale.is_finite() && (0.0..=0.5).contains(&self.jitter_scale)) {
            return Err(invalid("acrf.jitter_scale", format!("must be in [0, 0.5], got {}", self.jitter_scale)));
        }
        if !(self.snr_gamma.is_finite() && self.snr_gamma >= 0.0) {
            return Err(invalid("acrf.snr_gamma", format!("must be ≥ 0 (0 disables Min-SNR), got {}", self.snr_gamma)));
        }
        Ok(())
    }
}

/// The loss mode and its weights (spec §4, §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub loss_mode: LossMode,
    pub lambda_char: f64,
    pub lambda_mse: f64,
    pub lambda_cos: f64,
    pub lambda_fft: f64,
    pub alpha_hf: f64,
    pub beta_lf: f64,
    pub lambda_struct: f64,
    pub lambda_light: f64,
    pub lambda_color: f64,
    pub lambda_tex: f64,
    /// p: the low band is the adaptive average pool to (⌊H/p⌋, ⌊W/p⌋), upsampled back.
    pub pool: usize,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            loss_mode: LossMode::Standard,
            lambda_char: 1.0,
            lambda_mse: 0.0,
            lambda_cos: 0.1,
            lambda_fft: 0.1,
            alpha_hf: 1.0,
            beta_lf: 0.2,
            lambda_struct: 1.0,
            lambda_light: 0.5,
            lambda_color: 0.3,
            lambda_tex: 0.5,
            pool: 4,
        }
    }
}

impl LossConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let weights = [
            ("lambda_char", self.lambda_char),
            ("lambda_mse", self.lambda_mse),
            ("lambda_cos", self.lambda_cos),
            ("lambda_fft", self.lambda_fft),
            ("alpha_hf", self.alpha_hf),
            ("beta_lf", self.beta_lf),
            ("lambda_struct", self.lambda_struct),
            ("lambda_light", self.lambda_light),
            ("lambda_color", self.lambda_color),
            ("lambda_tex", self.lambda_tex),
        ];
        for (name, v) in weights {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(&format!("loss.{name}"), format!("must be a finite number ≥ 0, got {v}")));
            }
        }
        if self.pool == 0 || self.pool > 64 {
            return Err(invalid("loss.pool", format!("must be in 1..=64, got {}", self.pool)));
        }
        Ok(())
    }
}

/// Reads and parses a TOML file, naming the file in every error.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text; `origin` names where it came from in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_loss_key_is_named() {
        let err = parse_toml::<LossConfig>("lambda_chr = 1.0", "job.toml").unwrap_err().to_string();
        assert!(err.contains("lambda_chr"), "{err}");
        assert!(err.contains("job.toml"), "{err}");
    }

    #[test]
    fn out_of_range_is_named() {
        let c = AcrfConfig { jitter_scale: -1.0, ..Default::default() };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("acrf.jitter_scale"), "{err}");
        let l = LossConfig { pool: 0, ..Default::default() };
        assert!(l.validate().unwrap_err().to_string().contains("loss.pool"));
    }
}
