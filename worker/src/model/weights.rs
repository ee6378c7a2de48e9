//! Base weights from the two layouts users have: a diffusers folder (`config.json` plus sharded
//! `diffusion_pytorch_model-*.safetensors` with their index) and a ComfyUI single file (fused `qkv`, renamed
//! norms, embedders and final layer).
//!
//! Files are memory-mapped and each tensor is converted straight from the mapped bytes into its final dtype
//! and device, so the model is never held twice. Every key the model asks for is checked for presence and
//! shape, and every key left over is an error: a wrong file fails loudly at load, not as noise in training.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype as StDtype;

use super::config::{ModelError, ZImageConfig};

/// Where a diffusers name lives in the file: its stored key, and for fused tensors the row range.
struct Mapped {
    key: String,
    rows: Option<(usize, usize)>,
}

enum Layout {
    Diffusers,
    /// Keys carry this prefix (possibly empty) and the ComfyUI names.
    Comfy {
        prefix: String,
    },
}

pub struct WeightFiles {
    st: MmapedSafetensors,
    files: Vec<PathBuf>,
    layout: Layout,
    dim: usize,
    consumed: BTreeSet<String>,
    /// f32 updates added to tensors (by diffusers name) before they are rounded to `dtype`: merged adapters.
    deltas: BTreeMap<String, Tensor>,
    dtype: DType,
    device: Device,
}

/// A model found on disk: its config and its weight files.
pub struct ModelSource {
    pub config: ZImageConfig,
    pub files: Vec<PathBuf>,
    pub comfy: bool,
}

impl ModelSource {
    /// Finds the model at `path`: a diffusers pipeline folder (with `transformer/`), a transformer folder, or a
    /// single ComfyUI `.safetensors`. `config` overrides the config.json (needed for single files whose
    /// RoPE settings cannot be inferred).
    pub fn locate(path: &Path, config: Option<&Path>) -> Result<Self, ModelError> {
        if path.is_file() {
            let files = vec![path.to_path_buf()];
            let config = match config {
                Some(c) => read_config(c)?,
                None => infer_comfy_config(path)?,
            };
            return Ok(ModelSource { config, files, comfy: true });
        }
        if !path.is_dir() {
            return Err(ModelError::NotFound(path.display().to_string()));
        }
        let dir = if path.join("transformer").is_dir() { path.join("transformer") } else { path.to_path_buf() };
        let config = read_config(&config.map(Path::to_path_buf).unwrap_or_else(|| dir.join("config.json")))?;
        let index = dir.join("diffusion_pytorch_model.safetensors.index.json");
        let files = if index.exists() {
            shard_files(&index)?
        } else {
            let single = dir.join("diffusion_pytorch_model.safetensors");
            if !single.exists() {
                return Err(ModelError::NotFound(format!(
                    "{}: neither diffusion_pytorch_model.safetensors nor its index",
                    dir.display()
                )));
            }
            vec![single]
        };
        Ok(ModelSource { config, files, comfy: false })
    }

    pub fn open(&self, dtype: DType, device: &Device) -> Result<WeightFiles, ModelError> {
        // SAFETY: the files are mapped read-only; a trainer whose base weights change under it has no
        // meaningful result anyway, and the mapping is dropped once the tensors are built.
        let st = unsafe { MmapedSafetensors::multi(&self.files) }.map_err(|e| ModelError::File {
            file: self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            message: e.to_string(),
        })?;
        let layout = if self.comfy {
            let keys: Vec<String> = st.tensors().into_iter().map(|(k, _)| k).collect();
            Layout::Comfy { prefix: comfy_prefix(&keys) }
        } else {
            Layout::Diffusers
        };
        Ok(WeightFiles {
            st,
            files: self.files.clone(),
            layout,
            dim: self.config.dim,
            consumed: BTreeSet::new(),
            deltas: BTreeMap::new(),
            dtype,
            device: device.clone(),
        })
    }
}

fn read_config(path: &Path) -> Result<ZImageConfig, ModelError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::File { file: path.display().to_string(), message: e.to_string() })?;
    ZImageConfig::from_json(&text, &path.display().to_string())
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| ModelError::File { file: index.display().to_string(), message: e.to_string() })?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::File { file: index.display().to_string(), message: e.to_string() })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::File {
        file: index.display().to_string(),
        message: "no `weight_map` object".into(),
    })?;
    let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

const COMFY_PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

fn comfy_prefix(keys: &[String]) -> String {
    COMFY_PREFIXES.iter().find(|p| keys.iter().any(|k| k.starts_with(*p))).map(|p| p.to_string()).unwrap_or_default()
}

/// Infers the config of a ComfyUI single file from its tensor shapes. RoPE settings are not stored in the
/// file; they are Z-Image Turbo's when the head dim is Turbo's (128), otherwise a config must be given.
fn infer_comfy_config(path: &Path) -> Result<ZImageConfig, ModelError> {
    // SAFETY: read-only mapping, dropped at the end of this function.
    let st = unsafe { MmapedSafetensors::new(path) }
        .map_err(|e| ModelError::File { file: path.display().to_string(), message: e.to_string() })?;
    let keys: Vec<(String, Vec<usize>)> = st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect();
    let names: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    let prefix = comfy_prefix(&names);
    let shape = |name: &str| -> Result<Vec<usize>, ModelError> {
        keys.iter().find(|(k, _)| *k == format!("{prefix}{name}")).map(|(_, s)| s.clone()).ok_or_else(|| {
            ModelError::Config(format!(
                "{}: cannot infer the config, `{prefix}{name}` is missing; pass model.config",
                path.display()
            ))
        })
    };
    let count = |stack: &str| {
        names
            .iter()
            .filter_map(|k| k.strip_prefix(&format!("{prefix}{stack}.")))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let x_emb = shape("x_embedder.weight")?;
    let cap = shape("cap_embedder.0.weight")?;
    let q_norm = shape("layers.0.attention.q_norm.weight")?;
    let (dim, head_dim) = (x_emb[0], q_norm[0]);
    let turbo = ZImageConfig::z_image_turbo();
    if head_dim != turbo.head_dim() {
        return Err(ModelError::Config(format!(
            "{}: head dim {head_dim} differs from Z-Image Turbo's, so the RoPE axes cannot be inferred; pass model.config",
            path.display()
        )));
    }
    let cfg = ZImageConfig {
        in_channels: x_emb[1] / 4,
        dim,
        n_layers: count("layers"),
        n_refiner_layers: count("noise_refiner"),
        n_heads: dim / head_dim,
        n_kv_heads: dim / head_dim,
        cap_feat_dim: cap[0],
        ..turbo
    };
    cfg.validate().map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    Ok(cfg)
}

/// Where the diffusers tensor `name` lives in a ComfyUI file with key `prefix` and model width `dim`.
fn comfy_key(prefix: &str, dim: usize, name: &str) -> Mapped {
    let plain = |k: String| Mapped { key: format!("{prefix}{k}"), rows: None };
    for (proj, i) in [("to_q", 0), ("to_k", 1), ("to_v", 2)] {
        if let Some(block) = name.strip_suffix(&format!(".attention.{proj}.weight")) {
            return Mapped { key: format!("{prefix}{block}.attention.qkv.weight"), rows: Some((i * dim, dim)) };
        }
    }
    let renames = [
        (".attention.to_out.0.", ".attention.out."),
        (".attention.norm_q.", ".attention.q_norm."),
        (".attention.norm_k.", ".attention.k_norm."),
    ];
    for (from, to) in renames {
        if name.contains(from) {
            return plain(name.replacen(from, to, 1));
        }
    }
    for (from, to) in [("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer.")] {
        if let Some(rest) = name.strip_prefix(from) {
            return plain(format!("{to}{rest}"));
        }
    }
    plain(name.to_string())
}

impl WeightFiles {
    fn map(&self, name: &str) -> Mapped {
        match &self.layout {
            Layout::Diffusers => Mapped { key: name.to_string(), rows: None },
            Layout::Comfy { prefix } => comfy_key(prefix, self.dim, name),
        }
    }

    /// Adds `deltas` (f32, by diffusers tensor name) to their tensors as they are read: in f32, then rounded
    /// to the model dtype once.
    pub fn merge(&mut self, deltas: BTreeMap<String, Tensor>) {
        self.deltas = deltas;
    }

    /// The tensor that diffusers calls `name`, checked against `shape`, in the model dtype on the model device.
    pub fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let Mapped { key, rows } = self.map(name);
        let view = self.st.get(&key).map_err(|_| ModelError::MissingKey {
            key: key.clone(),
            expected: shape.to_vec(),
            files: self.file_list(),
        })?;
        let stored = view.shape().to_vec();
        let expected_stored = match rows {
            Some(_) => [vec![3 * shape[0]], shape[1..].to_vec()].concat(),
            None => shape.to_vec(),
        };
        if stored != expected_stored {
            return Err(ModelError::Shape { key, expected: expected_stored, found: stored });
        }
        let t = match self.deltas.remove(name) {
            None => tensor_from_view(&view, rows, self.dtype, &self.device),
            Some(delta) => tensor_from_view(&view, rows, DType::F32, &self.device)
                .and_then(|w| (w + delta.to_device(&self.device)?)?.to_dtype(self.dtype)),
        }
        .map_err(|e| ModelError::File { file: self.file_list(), message: format!("tensor `{key}`: {e}") })?;
        self.consumed.insert(key);
        Ok(t)
    }

    /// Fails if the files hold tensors the model did not use.
    pub fn finish(self) -> Result<(), ModelError> {
        let extra: Vec<(String, Vec<usize>)> = self
            .st
            .tensors()
            .into_iter()
            .filter(|(k, _)| !self.consumed.contains(k))
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        match extra.into_iter().next() {
            None => Ok(()),
            Some((key, shape)) => Err(ModelError::ExtraKey { key, found: shape, files: self.file_list() }),
        }
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Builds a tensor from the mapped bytes (only `rows` (start, len) of them when given), in `dtype` on `device`.
/// Cutting the rows from the bytes rather than the tensor matters for fused qkv: a narrowed view would keep the
/// whole fused matrix alive for each of q, k and v, three times the memory of the three. A file in another
/// element type is converted by candle on the device, one tensor at a time (on a GPU that is a kernel; a
/// conversion element by element on the host took a minute for a full-size model).
fn tensor_from_view(
    view: &safetensors::tensor::TensorView<'_>,
    rows: Option<(usize, usize)>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut shape = view.shape().to_vec();
    let src = match view.dtype() {
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        other => candle_core::bail!("unsupported weight dtype {other:?}"),
    };
    let data = match rows {
        Some((start, len)) => {
            let row_bytes = shape[1..].iter().product::<usize>() * src.size_in_bytes();
            shape[0] = len;
            &view.data()[start * row_bytes..(start + len) * row_bytes]
        }
        None => view.data(),
    };
    Tensor::from_raw_buffer(data, src, &shape, device)?.to_dtype(dtype)
}

/// Writes a model's tensors as a ComfyUI single file (fused qkv, ComfyUI names): how tests and the demo
/// produce that layout from diffusers weights.
pub fn write_comfy_file(
    diffusers: &BTreeMap<String, Tensor>,
    cfg: &ZImageConfig,
    path: &Path,
) -> Result<(), ModelError> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for block in cfg.block_names() {
        let qkv: Vec<Tensor> = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|p| diffusers[&format!("{block}.attention.{p}.weight")].clone())
            .collect();
        out.insert(format!("{block}.attention.qkv.weight"), Tensor::cat(&qkv, 0)?);
    }
    for (name, t) in diffusers {
        let m = comfy_key("", cfg.dim, name);
        if m.rows.is_none() {
            out.insert(m.key, t.clone());
        }
    }
    candle_core::safetensors::save(&out.into_iter().collect(), path)?;
    Ok(())
}

/// Writes a diffusers transformer folder: `config.json`, and the weights in shards of at most `shard_bytes`
/// with `diffusion_pytorch_model.safetensors.index.json` (a single unindexed file when one shard suffices).
pub fn write_diffusers_folder(
    dir: &Path,
    cfg: &ZImageConfig,
    tensors: &BTreeMap<String, Tensor>,
    shard_bytes: usize,
) -> Result<(), ModelError> {
    let io = |e: std::io::Error| ModelError::File { file: dir.display().to_string(), message: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut json = serde_json::to_value(cfg).map_err(|e| ModelError::Config(e.to_string()))?;
    json["_class_name"] = "ZImageTransformer2DModel".into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap_or_default()).map_err(io)?;
    let mut shards: Vec<Vec<(&String, &Tensor)>> = vec![vec![]];
    let mut size = 0;
    for (name, t) in tensors {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        if size + bytes > shard_bytes && !shards.last().is_some_and(|s| s.is_empty()) {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        if let Some(s) = shards.last_mut() {
            s.push((name, t));
        }
    }
    if shards.len() == 1 {
        let file = dir.join("diffusion_pytorch_model.safetensors");
        candle_core::safetensors::save(&tensors.clone().into_iter().collect(), file)?;
        return Ok(());
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in &shard {
            weight_map.insert((*name).clone(), file.clone().into());
        }
        let map: std::collections::HashMap<String, Tensor> =
            shard.into_iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        candle_core::safetensors::save(&map, dir.join(&file))?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).map_err(io)?;
    Ok(())
}

/// Random weights in the shapes of `cfg`: a stand-in model for demos and tests that must not depend on a
/// 12 GB download (see [`random_tensors`]).
pub fn random_weights(cfg: &ZImageConfig, seed: u64) -> Result<BTreeMap<String, Tensor>, ModelError> {
    random_tensors(cfg.tensor_shapes(), seed)
}

/// Deterministic random tensors of the given names and shapes (tensor i drawn from key (seed, i)).
/// Matrices and convolution kernels are N(0, 1/fan_in) so activations keep their scale through a stack (a
/// model whose output cannot reach the target's scale would teach nothing), norm weights (the only 1-D
/// `.weight`s) are 1, biases 0, pad tokens N(0, 0.02²). The tensors are drawn on every core: a full-size
/// model (6 billion values) takes minutes on one.
pub fn random_tensors(
    shapes: impl IntoIterator<Item = (String, Vec<usize>)>,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let shapes: Vec<(String, Vec<usize>)> = shapes.into_iter().collect();
    let threads = std::thread::available_parallelism().map_or(1, usize::from).clamp(1, shapes.len().max(1));
    let next = AtomicUsize::new(0);
    let drawn: Vec<Vec<(usize, Vec<f32>)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((name, shape)) = shapes.get(i) else { return done };
                        done.push((i, random_values(name, shape, seed, i)));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("drawing random values does not panic")).collect()
    });
    let mut values: Vec<Option<Vec<f32>>> = vec![None; shapes.len()];
    for (i, v) in drawn.into_iter().flatten() {
        values[i] = Some(v);
    }
    let mut out = BTreeMap::new();
    for ((name, shape), data) in shapes.into_iter().zip(values) {
        out.insert(name, Tensor::from_vec(data.expect("every index was drawn"), shape, &Device::Cpu)?);
    }
    Ok(out)
}

/// The values of tensor `i` of [`random_tensors`].
fn random_values(name: &str, shape: &[usize], seed: u64, i: usize) -> Vec<f32> {
    use acrf_common::rng::{Key, fill_normal_f32};
    let n: usize = shape.iter().product();
    let normal = |std: f32| {
        let mut v = vec![0f32; n];
        fill_normal_f32(Key::new(seed, acrf_common::rng::domain::MODEL_INIT, 0, i as u64), &mut v);
        v.iter_mut().for_each(|x| *x *= std);
        v
    };
    match shape {
        [_] if name.ends_with(".weight") => vec![1f32; n],
        [_] => vec![0f32; n],
        [1, _] => normal(0.02),
        [_, fan_in] => normal(1.0 / (*fan_in as f32).sqrt()),
        [_, c, kh, kw] => normal(1.0 / ((c * kh * kw) as f32).sqrt()),
        _ => normal(0.02),
    }
}
