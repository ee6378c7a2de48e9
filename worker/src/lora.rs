//! LoRA adapters on the transformer's linears, and the files they live in.
//!
//! The trained file uses the one layout that ComfyUI and diffusers both load without conversion:
//! `diffusion_model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and a 0-dim f32 `.alpha`
//! (ComfyUI assumes scale 1 without it; diffusers folds alpha/r into the weights on load). Files from peft
//! (`transformer.<module>.lora_A.weight`) and kohya (`lora_unet_<module_with_underscores>.lora_down.weight`)
//! load too, so a user can continue from or compare against another trainer's LoRA.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use acrf_common::config::LoraConfig;
use acrf_common::rng::{self, Key, domain};
use candle_core::{DType, Device, Tensor, Var};

use crate::model::config::ZImageConfig;

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("LoRA file {file}: {message}")]
    File { file: String, message: String },
    #[error("LoRA file {file}: module `{module}`: {message}")]
    Module { file: String, module: String, message: String },
    #[error("LoRA target `{0}` is unknown (to_q, to_k, to_v, to_out.0, w1, w2, w3, feed_forward)")]
    UnknownTarget(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `bytes` with the safetensors header's keys in sorted order. safetensors writes `__metadata__` in the
/// order of a `HashMap`, which differs from process to process, and the same LoRA must give the same bytes:
/// checkpoints are hashed, and runs into different stores or resumed elsewhere are compared file for file.
/// The keys and values do not change, so neither does the header's length, and the data stays in place.
fn sorted_header(mut bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let len = bytes.get(..8).map(|n| u64::from_le_bytes(n.try_into().expect("8 bytes")) as usize);
    let header = len.and_then(|n| bytes.get(8..8 + n)).ok_or("the file is shorter than its header")?;
    let mut parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    if let Some(meta) = parsed.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(meta.take()).map_err(|e| e.to_string())?;
        *meta = serde_json::to_value(sorted).map_err(|e| e.to_string())?;
    }
    let mut rewritten = serde_json::to_vec(&parsed).map_err(|e| e.to_string())?;
    let n = header.len();
    if rewritten.len() > n {
        return Err(format!("the sorted header is {} bytes, the written one {n}", rewritten.len()));
    }
    rewritten.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&rewritten);
    Ok(bytes)
}

/// Which linears get an adapter, and how large it is.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Leaf names: `to_q`, `to_k`, `to_v`, `to_out.0`, `w1`, `w2`, `w3`.
    pub targets: Vec<String>,
    /// Block stacks: `noise_refiner`, `context_refiner`, `layers`.
    pub blocks: Vec<String>,
}

impl LoraSpec {
    /// The adapters a job's `[lora]` section asks for.
    pub fn from_config(c: &LoraConfig) -> Self {
        LoraSpec {
            rank: c.network_dim,
            alpha: c.network_alpha,
            targets: c.target_modules().iter().map(|t| t.name().to_string()).collect(),
            blocks: c.target_blocks().iter().map(|b| b.name().to_string()).collect(),
        }
    }

    /// The modules of `cfg` this spec adapts, with their (in, out) features, in a stable order.
    pub fn modules(&self, cfg: &ZImageConfig) -> Result<Vec<(String, usize, usize)>, LoraError> {
        const LEAVES: [&str; 7] = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"];
        if let Some(bad) = self.targets.iter().find(|t| !LEAVES.contains(&t.as_str())) {
            return Err(LoraError::UnknownTarget(bad.clone()));
        }
        Ok(cfg
            .linear_modules()
            .into_iter()
            .filter(|(name, _, _)| {
                let stack = name.split('.').next().unwrap_or_default();
                self.blocks.iter().any(|b| b == stack) && self.targets.iter().any(|t| name.ends_with(&format!(".{t}")))
            })
            .collect())
    }
}

/// One adapter: the update is `alpha / rank · B · A · x`.
pub struct LoraModule {
    pub a: Var,
    pub b: Var,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }
}

/// The trainable state: every adapter in f32, whatever the base model's dtype, so that Adam's small updates
/// are not rounded away.
pub struct Lora {
    pub modules: BTreeMap<String, LoraModule>,
    pub metadata: BTreeMap<String, String>,
}

/// The adapters as plain tensors for one forward pass: tracked when the pass builds a graph for the LoRA
/// gradients, detached when it must not (inference, the graph-free pass of checkpointing).
#[derive(Clone, Default)]
pub struct LoraView {
    modules: HashMap<String, (Tensor, Tensor, f64)>,
}

impl LoraView {
    pub fn none() -> Self {
        LoraView::default()
    }

    /// A view of given (module, A, B, scale) pairs, such as the trained LoRA stacked with frozen adapters.
    pub fn from_parts(parts: Vec<(String, Tensor, Tensor, f64)>) -> Self {
        LoraView { modules: parts.into_iter().map(|(n, a, b, s)| (n, (a, b, s))).collect() }
    }

    /// The adapter of `module`, if it has one: A, B and the scale of its output (see [`crate::ops::lora_linear`]).
    pub fn adapter(&self, module: &str) -> Option<(&Tensor, &Tensor, f64)> {
        self.modules.get(module).map(|(a, b, scale)| (a, b, *scale))
    }
}

impl Lora {
    /// Fresh adapters: A kaiming-uniform (bound 1/√in, torch's `kaiming_uniform_(a=√5)`), B zero, so the
    /// model starts exactly at the base. A depends only on (seed, module index).
    pub fn init(cfg: &ZImageConfig, spec: &LoraSpec, seed: u64, device: &Device) -> Result<Self, LoraError> {
        let mut modules = BTreeMap::new();
        for (i, (name, fan_in, fan_out)) in spec.modules(cfg)?.into_iter().enumerate() {
            let key = Key::new(seed, domain::LORA_INIT, 0, i as u64);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a: Vec<f32> =
                (0..spec.rank * fan_in).map(|c| ((2.0 * rng::uniform01(key, c as u64) - 1.0) * bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (spec.rank, fan_in), device)?)?;
            let b = Var::zeros((fan_out, spec.rank), DType::F32, device)?;
            modules.insert(name, LoraModule { a, b, alpha: spec.alpha });
        }
        Ok(Lora { modules, metadata: BTreeMap::new() })
    }

    pub fn view(&self, tracked: bool, strength: f64) -> LoraView {
        let pick = |v: &Var| if tracked { v.as_tensor().clone() } else { v.as_detached_tensor() };
        LoraView {
            modules: self
                .modules
                .iter()
                .map(|(n, m)| (n.clone(), (pick(&m.a), pick(&m.b), m.scale() * strength)))
                .collect(),
        }
    }

    /// Every trainable tensor with its name, in a fixed order that all ranks share (the order of the flat
    /// gradient buffer and of the optimizer state).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|(n, m)| {
                [(format!("{n}.lora_A.weight"), m.a.clone()), (format!("{n}.lora_B.weight"), m.b.clone())]
            })
            .collect()
    }

    pub fn parameter_count(&self) -> usize {
        self.modules.values().map(|m| m.a.elem_count() + m.b.elem_count()).sum()
    }

    /// The tensors of the ComfyUI/diffusers layout, ready to write.
    pub fn to_tensors(&self) -> Result<BTreeMap<String, Tensor>, LoraError> {
        let mut out = BTreeMap::new();
        for (name, m) in &self.modules {
            out.insert(format!("diffusion_model.{name}.lora_A.weight"), m.a.as_detached_tensor());
            out.insert(format!("diffusion_model.{name}.lora_B.weight"), m.b.as_detached_tensor());
            out.insert(format!("diffusion_model.{name}.alpha"), Tensor::new(m.alpha as f32, &Device::Cpu)?);
        }
        Ok(out)
    }

    /// Serialises to safetensors bytes in the ComfyUI/diffusers layout, with `metadata` merged over the
    /// adapter's own.
    pub fn to_bytes(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, LoraError> {
        let tensors = self.to_tensors()?;
        let mut meta = self.metadata.clone();
        meta.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        let views: Vec<(String, Tensor)> =
            tensors.into_iter().map(|(k, t)| t.to_device(&Device::Cpu).map(|t| (k, t))).collect::<Result<_, _>>()?;
        let file_err = |message: String| LoraError::File { file: "<memory>".into(), message };
        let bytes =
            safetensors::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), Some(meta.into_iter().collect()))
                .map_err(|e| file_err(e.to_string()))?;
        sorted_header(bytes).map_err(file_err)
    }

    pub fn save(&self, path: &Path, metadata: &BTreeMap<String, String>) -> Result<(), LoraError> {
        let bytes = self.to_bytes(metadata)?;
        std::fs::write(path, bytes)
            .map_err(|e| LoraError::File { file: path.display().to_string(), message: e.to_string() })
    }

    /// Loads a LoRA in any of the three layouts (ComfyUI/diffusers, peft, kohya) onto `device` as f32 Vars.
    pub fn load(path: &Path, device: &Device) -> Result<Self, LoraError> {
        let bytes = std::fs::read(path)
            .map_err(|e| LoraError::File { file: path.display().to_string(), message: e.to_string() })?;
        Self::from_bytes(&bytes, &path.display().to_string(), device)
    }

    pub fn from_bytes(bytes: &[u8], origin: &str, device: &Device) -> Result<Self, LoraError> {
        let file_err = |message: String| LoraError::File { file: origin.to_string(), message };
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| file_err(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| file_err(e.to_string()))?;
        let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let default_alpha = peft_alpha(&metadata);
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let (module, role) = parse_key(&key).ok_or_else(|| file_err(format!("unrecognised key `{key}`")))?;
            let t = view_to_f32(&view, device).map_err(|e| file_err(format!("tensor `{key}`: {e}")))?;
            let entry = parts.entry(module.clone()).or_default();
            match role {
                Role::A => entry.0 = Some(t),
                Role::B => entry.1 = Some(t),
                Role::Alpha => {
                    entry.2 = Some(t.flatten_all()?.to_vec1::<f32>()?.first().copied().unwrap_or(0.0) as f64)
                }
            }
        }
        if parts.is_empty() {
            return Err(file_err("no LoRA tensors".into()));
        }
        let mut modules = BTreeMap::new();
        for (module, (a, b, alpha)) in parts {
            let err = |message: &str| LoraError::Module {
                file: origin.into(),
                module: module.clone(),
                message: message.into(),
            };
            let (a, b) =
                (a.ok_or_else(|| err("has no A (down) matrix"))?, b.ok_or_else(|| err("has no B (up) matrix"))?);
            if a.rank() != 2 || b.rank() != 2 || a.dims()[0] != b.dims()[1] {
                return Err(err(&format!("A {:?} and B {:?} do not form a rank-r pair", a.dims(), b.dims())));
            }
            let rank = a.dims()[0] as f64;
            let alpha = alpha.or(default_alpha).unwrap_or(rank);
            modules.insert(module, LoraModule { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, alpha });
        }
        Ok(Lora { modules, metadata })
    }

    /// Checks that every module exists in `cfg` with matching shapes, naming the first that does not.
    pub fn check_against(&self, cfg: &ZImageConfig, origin: &str) -> Result<(), LoraError> {
        let linears: HashMap<String, (usize, usize)> =
            cfg.linear_modules().into_iter().map(|(n, i, o)| (n, (i, o))).collect();
        for (name, m) in &self.modules {
            let err = |message: String| LoraError::Module { file: origin.into(), module: name.clone(), message };
            let &(fan_in, fan_out) = linears.get(name).ok_or_else(|| err("is not a linear of this model".into()))?;
            if m.a.dims()[1] != fan_in || m.b.dims()[0] != fan_out {
                return Err(err(format!(
                    "A {:?} / B {:?} do not fit the linear [{fan_out}, {fan_in}]",
                    m.a.dims(),
                    m.b.dims()
                )));
            }
        }
        Ok(())
    }

    /// A LoRA file as found, with what `acrf inspect` tells about it beyond the adapters.
    pub fn read_file(path: &Path) -> Result<LoraFile, LoraError> {
        let bytes = std::fs::read(path)
            .map_err(|e| LoraError::File { file: path.display().to_string(), message: e.to_string() })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| LoraError::File { file: path.display().to_string(), message: e.to_string() })?;
        let dtypes = st
            .tensors()
            .iter()
            .filter(|(k, _)| !k.ends_with(".alpha"))
            .map(|(_, v)| format!("{:?}", v.dtype()))
            .collect();
        let lora = Self::from_bytes(&bytes, &path.display().to_string(), &Device::Cpu)?;
        Ok(LoraFile { lora, format: detect_format(&st), dtypes })
    }
}

/// A LoRA file read with [`Lora::read_file`].
pub struct LoraFile {
    pub lora: Lora,
    /// The key layout it was written in.
    pub format: &'static str,
    /// The element types of its A and B tensors.
    pub dtypes: std::collections::BTreeSet<String>,
}

/// The A matrix, B matrix and alpha of one module as they are found in a file.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);

#[derive(Clone, Copy)]
enum Role {
    A,
    B,
    Alpha,
}

const PREFIXES: [&str; 4] = ["diffusion_model.", "transformer.", "base_model.model.", "lora_unet_"];

/// Splits a tensor key of any supported layout into (diffusers module name, role).
fn parse_key(key: &str) -> Option<(String, Role)> {
    const SUFFIXES: [(&str, Role); 7] = [
        (".lora_A.weight", Role::A),
        (".lora_B.weight", Role::B),
        (".lora_A.default.weight", Role::A),
        (".lora_B.default.weight", Role::B),
        (".lora_down.weight", Role::A),
        (".lora_up.weight", Role::B),
        (".alpha", Role::Alpha),
    ];
    let (stem, role) = SUFFIXES.iter().find_map(|(s, r)| key.strip_suffix(s).map(|stem| (stem, *r)))?;
    let mut stem = stem;
    while let Some(p) = PREFIXES.iter().find(|p| stem.starts_with(*p)) {
        if *p == "lora_unet_" {
            return Some((kohya_module(&stem[p.len()..])?, role));
        }
        stem = &stem[p.len()..];
    }
    Some((stem.to_string(), role))
}

/// Turns kohya's underscored module name back into the dotted diffusers one, e.g.
/// `noise_refiner_0_attention_to_out_0` → `noise_refiner.0.attention.to_out.0`.
fn kohya_module(flat: &str) -> Option<String> {
    let (stack, rest) = ["noise_refiner_", "context_refiner_", "layers_"]
        .iter()
        .find_map(|s| flat.strip_prefix(s).map(|r| (s.trim_end_matches('_'), r)))?;
    let (index, rest) = rest.split_once('_')?;
    index.parse::<usize>().ok()?;
    let (group, leaf) = ["attention_", "feed_forward_"]
        .iter()
        .find_map(|g| rest.strip_prefix(g).map(|l| (g.trim_end_matches('_'), l)))?;
    let leaf = match leaf {
        "to_out_0" => "to_out.0",
        "to_q" | "to_k" | "to_v" | "w1" | "w2" | "w3" => leaf,
        _ => return None,
    };
    Some(format!("{stack}.{index}.{group}.{leaf}"))
}

fn detect_format(st: &safetensors::SafeTensors<'_>) -> &'static str {
    let names = st.names();
    if names.iter().any(|k| k.starts_with("lora_unet_")) {
        "kohya (lora_unet_*.lora_down/up)"
    } else if names.iter().any(|k| k.starts_with("diffusion_model.")) {
        "ComfyUI/diffusers (diffusion_model.*.lora_A/B + alpha)"
    } else {
        "peft (*.lora_A/B)"
    }
}

/// peft files carry no alpha tensors; diffusers writes the adapter config into the metadata instead.
fn peft_alpha(metadata: &BTreeMap<String, String>) -> Option<f64> {
    let cfg: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    cfg.get("lora_alpha")?.as_f64()
}

fn view_to_f32(view: &safetensors::tensor::TensorView<'_>, device: &Device) -> candle_core::Result<Tensor> {
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::F64 => DType::F64,
        other => candle_core::bail!("unsupported dtype {other:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_keys_come_out_sorted_whatever_the_map_order() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let keys: Vec<String> = (0..16).map(|i| format!("key{i:02}")).collect();
        let write = |order: &mut dyn Iterator<Item = &String>| {
            let meta: HashMap<String, String> = order.map(|k| (k.clone(), format!("v-{k}"))).collect();
            let bytes = safetensors::serialize([("w", &t), ("a", &t)], Some(meta)).unwrap();
            sorted_header(bytes).unwrap()
        };
        let first = write(&mut keys.iter());
        assert_eq!(first, write(&mut keys.iter().rev()));
        let (n, header) = safetensors::SafeTensors::read_metadata(&first).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta.len(), 16);
        assert_eq!(meta["key07"], "v-key07");
        let text = std::str::from_utf8(&first[8..8 + n]).unwrap();
        let positions: Vec<usize> = keys.iter().map(|k| text.find(&format!("\"{k}\"")).unwrap()).collect();
        assert!(positions.is_sorted(), "{text}");
        let loaded = safetensors::SafeTensors::deserialize(&first).unwrap();
        assert_eq!(loaded.tensor("w").unwrap().data(), loaded.tensor("a").unwrap().data());
        assert!(sorted_header(vec![1, 0, 0]).is_err());
    }
}
