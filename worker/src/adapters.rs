//! Frozen adapters (`model.adapters`): LoRAs merged into the base weights at load, such as the
//! "training adapters" that PyTorch trainers merge into Z-Image Turbo while a LoRA trains and remove for
//! inference.
//!
//! Merged, not kept as frozen low-rank branches: the merge costs nothing per step, and it is computed in f32
//! (W + Σ strength·alpha/r·B·A) and rounded to the base dtype once, so in bf16 the merged weight carries one
//! rounding, the same as the base weight it replaces; a frozen branch would cost two extra matmuls per
//! adapted linear and step to avoid an error of that size. A strength of 0 leaves every weight bit for bit.
//!
//! Samples are rendered as a user runs the trained LoRA, on the plain base: [`Merged::cancel`] adds the
//! adapters with negated strength beside the trained LoRA, which undoes the merge up to its rounding without
//! a second copy of the model in memory.

use std::collections::BTreeMap;

use acrf_common::config::AdapterConfig;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::lora::{Lora, LoraError, LoraView};
use crate::model::ZImageConfig;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("adapter {file}: {message}")]
    File { file: String, message: String },
    #[error(
        "adapter {file}: its sha256 is {found}, the job records {expected}: the file changed since the run \
         started (a run continues only with the adapters it was trained with)"
    )]
    Changed { file: String, expected: String, found: String },
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `FILE[:STRENGTH]`, as `acrf sample --adapter` takes it. A suffix that is not a number is part of the file
/// name, so paths with colons need no escaping.
pub fn parse_flag(text: &str) -> Result<AdapterConfig, String> {
    let (path, strength) = match text.rsplit_once(':').and_then(|(p, s)| Some((p, s.parse::<f64>().ok()?))) {
        Some((path, v)) if !path.is_empty() => (path, v),
        _ => (text, 1.0),
    };
    if !strength.is_finite() {
        return Err(format!("`{text}`: the strength after `:` must be a finite number"));
    }
    Ok(AdapterConfig { path: path.to_string(), strength, sha256: None })
}

/// The adapters of a job, read and checked against the model.
pub struct Merged {
    /// Per adapted linear: (A, B, strength·alpha/r) of each adapter on it.
    modules: BTreeMap<String, Vec<(Tensor, Tensor, f64)>>,
}

impl Merged {
    pub fn none() -> Merged {
        Merged { modules: BTreeMap::new() }
    }

    /// Reads `adapters` onto `device`, checking each file against its recorded sha256 (when the job has one)
    /// and against `cfg`'s linears.
    pub fn load(adapters: &[AdapterConfig], cfg: &ZImageConfig, device: &Device) -> Result<Merged, AdapterError> {
        let mut modules: BTreeMap<String, Vec<(Tensor, Tensor, f64)>> = BTreeMap::new();
        for adapter in adapters {
            let file = adapter.path.clone();
            let bytes = std::fs::read(&adapter.path)
                .map_err(|e| AdapterError::File { file: file.clone(), message: e.to_string() })?;
            let found = sha256(&bytes);
            if let Some(expected) = adapter.sha256.as_ref().filter(|e| **e != found) {
                return Err(AdapterError::Changed { file, expected: expected.clone(), found });
            }
            let lora = Lora::from_bytes(&bytes, &file, device)?;
            lora.check_against(cfg, &file)?;
            for (name, m) in &lora.modules {
                let entry = modules.entry(name.clone()).or_default();
                entry.push((m.a.as_detached_tensor(), m.b.as_detached_tensor(), m.scale() * adapter.strength));
            }
        }
        Ok(Merged { modules })
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The f32 update of every adapted weight, by its tensor name (`<module>.weight`): Σ strength·alpha/r·B·A.
    pub fn deltas(&self) -> Result<BTreeMap<String, Tensor>, AdapterError> {
        let mut out = BTreeMap::new();
        for (name, parts) in &self.modules {
            let mut delta: Option<Tensor> = None;
            for (a, b, scale) in parts {
                let d = (b.matmul(a)? * *scale)?;
                delta = Some(match delta {
                    None => d,
                    Some(acc) => (acc + d)?,
                });
            }
            out.insert(format!("{name}.weight"), delta.expect("a module has at least one adapter"));
        }
        Ok(out)
    }

    /// A view of `lora` (at strength `strength`) that, on a model with these adapters merged, renders as the
    /// plain base with `lora`: each adapted linear also gets the adapters at negated strength, as one
    /// low-rank pair of the stacked ranks.
    pub fn cancel(&self, lora: &Lora, strength: f64) -> Result<LoraView, AdapterError> {
        let mut parts: BTreeMap<String, Vec<(Tensor, Tensor, f64)>> = lora
            .modules
            .iter()
            .map(|(n, m)| (n.clone(), vec![(m.a.as_detached_tensor(), m.b.as_detached_tensor(), m.scale() * strength)]))
            .collect();
        for (name, adapters) in &self.modules {
            let entry = parts.entry(name.clone()).or_default();
            entry.extend(adapters.iter().map(|(a, b, s)| (a.clone(), b.clone(), -s)));
        }
        let mut modules = Vec::with_capacity(parts.len());
        for (name, pairs) in parts {
            let a = Tensor::cat(
                &pairs.iter().map(|(a, _, _)| a.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?,
                0,
            )?;
            let b = Tensor::cat(
                &pairs.iter().map(|(_, b, s)| b.to_dtype(DType::F32)? * *s).collect::<candle_core::Result<Vec<_>>>()?,
                1,
            )?;
            modules.push((name, a, b, 1.0));
        }
        Ok(LoraView::from_parts(modules))
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_flags_take_an_optional_strength() {
        let parsed = |t: &str| parse_flag(t).map(|a| (a.path, a.strength));
        assert_eq!(parsed("ta.safetensors"), Ok(("ta.safetensors".into(), 1.0)));
        assert_eq!(parsed("ta.safetensors:0.5"), Ok(("ta.safetensors".into(), 0.5)));
        assert_eq!(parsed("/m:odels/ta.safetensors:-1"), Ok(("/m:odels/ta.safetensors".into(), -1.0)));
        assert_eq!(parsed("/m:odels/ta.safetensors"), Ok(("/m:odels/ta.safetensors".into(), 1.0)));
        assert!(parsed("ta.safetensors:inf").unwrap_err().contains("finite"));
    }
}
