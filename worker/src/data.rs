//! The cached dataset: VAE latents and caption embeddings computed once by `acrf cache`, read by every
//! training rank, and the epoch order in which they are trained on.
//!
//! Layout under the dataset root (any [`BlockingStore`]):
//! - `items/<id>.safetensors` (`items/<id>.<input hash>.safetensors` from `acrf cache`): `latent` f32
//!   [C, h, w] (already normalised) and `caption` f32 [L, cap_dim] (real tokens only, no padding),
//!   `__metadata__` {id, source};
//! - `manifest.json` ([`Manifest`]), written after every item, so a reader never sees a manifest that lists
//!   an item not yet written;
//! - `cache_report.json`, from `acrf cache`: what its last run cached, skipped and warned about.
//!
//! Items are checked on every load against the manifest and the model's expectations, because a bad item
//! otherwise surfaces as a shape error deep inside the transformer, hours into a run, without a file name.
//!
//! Which item a micro-batch of a step trains on is the epoch plan's (`acrf_common::plan::EpochPlan`), from
//! the items' buckets that [`Manifest::item_buckets`] lists.

use std::collections::{BTreeMap, HashMap};

use acrf_common::store::{BlockingStore, StoreError};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's `format`; a reader refuses any other, since a changed layout read as the old one trains on
/// garbage without an error.
pub const FORMAT: &str = "acrf-cache/1";

pub const MANIFEST: &str = "manifest.json";

/// Z-Image cuts latents into 2×2 patches and supports no other patch size, so latent sides must be even.
const PATCH: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("no dataset at {url}: manifest.json not found")]
    NoDataset { url: String },
    #[error("{url}: {message}")]
    Manifest { url: String, message: String },
    #[error("{url}: item `{id}`: {message}")]
    Item { url: String, id: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub latent_channels: usize,
    pub cap_dim: usize,
    /// How the items were encoded (VAE, text encoder, their settings), free-form: written by `acrf cache`
    /// for people and for deciding whether a cache can be reused, never interpreted by the trainer.
    pub encoder: serde_json::Value,
    /// Items per latent size, keyed "HxW" (latent height and width).
    pub buckets: BTreeMap<String, usize>,
    pub items: Vec<ManifestItem>,
    /// The embedding of the empty prompt, which caption dropout trains with; absent in caches written before
    /// `acrf cache` stored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_caption: Option<EmptyCaption>,
}

/// Where the empty prompt's embedding lives: `caption` f32 [L, cap_dim] in its own file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmptyCaption {
    pub file: String,
    pub caption_len: usize,
    pub content_hash: String,
    /// `sha256:<hex>` of the encoder settings it was made with: a cache re-run keeps it while they hold.
    pub input_hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestItem {
    pub id: String,
    /// Relative to the dataset root.
    pub file: String,
    pub latent_shape: [usize; 3],
    pub caption_len: usize,
    /// Where the item came from (an image path or URL), for messages.
    pub source: String,
    /// `sha256:<hex>` of the item file, checked on every load: it catches silent corruption that still
    /// parses.
    pub content_hash: String,
    /// `sha256:<hex>` of what the item was made from (image bytes, caption, encoder settings), written by
    /// `acrf cache` so that a re-run recomputes only the items whose inputs changed; empty for items written
    /// without one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub input_hash: String,
}

impl ManifestItem {
    fn bucket(&self) -> (usize, usize) {
        (self.latent_shape[1], self.latent_shape[2])
    }
}

fn bucket_key((h, w): (usize, usize)) -> String {
    format!("{h}x{w}")
}

fn item_file(id: &str) -> String {
    format!("items/{id}.safetensors")
}

fn content_hash(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Ids become file names, on every backend, so they keep to characters all of them accept.
fn id_problem(id: &str) -> Option<String> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (!ok).then(|| format!("id `{id}` must be non-empty ASCII letters, digits, `-`, `_` or `.`, not starting with `.`"))
}

fn latent_problem(shape: &[usize], channels: usize) -> Option<String> {
    match *shape {
        [c, _, _] if c != channels => {
            Some(format!("latent has shape {shape:?}: {c} channels, the dataset has {channels}"))
        }
        [_, h, w] if h == 0 || w == 0 || h % PATCH != 0 || w % PATCH != 0 => Some(format!(
            "latent has shape {shape:?}: height and width must be positive multiples of the patch size {PATCH}"
        )),
        [_, _, _] => None,
        _ => Some(format!("latent has shape {shape:?}, expected 3-D [{channels}, h, w]")),
    }
}

fn caption_problem(shape: &[usize], cap_dim: usize) -> Option<String> {
    match *shape {
        [_, d] if d == cap_dim => None,
        [_, d] => Some(format!("caption has shape {shape:?}: feature size {d}, the dataset has {cap_dim}")),
        _ => Some(format!("caption has shape {shape:?}, expected 2-D [L, {cap_dim}]")),
    }
}

impl Manifest {
    /// The latent (height, width) of every item, in manifest order: what the epoch plan groups them by.
    pub fn item_buckets(&self) -> Vec<(usize, usize)> {
        self.items.iter().map(ManifestItem::bucket).collect()
    }

    fn bucket_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for item in &self.items {
            *counts.entry(bucket_key(item.bucket())).or_default() += 1;
        }
        counts
    }

    fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        match value.get("format").and_then(serde_json::Value::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(format!("field `format`: unknown format version `{other}`, this build reads `{FORMAT}`"));
            }
            None => return Err(format!("field `format` is missing, expected `{FORMAT}`")),
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| format!("not a valid {FORMAT} manifest: {e}"))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        for (field, v) in
            [("latent_channels", self.latent_channels), ("cap_dim", self.cap_dim), ("items", self.items.len())]
        {
            if v == 0 {
                return Err(format!("field `{field}` is empty or 0"));
            }
        }
        let mut ids = HashMap::new();
        let mut files = HashMap::new();
        for (i, item) in self.items.iter().enumerate() {
            let at = format!("items[{i}] (`{}`)", item.id);
            if let Some(problem) = id_problem(&item.id) {
                return Err(format!("{at} field `id`: {problem}"));
            }
            if let Some(j) = ids.insert(item.id.as_str(), i) {
                return Err(format!("duplicate id `{}` in items[{j}] and items[{i}]", item.id));
            }
            if let Some(j) = files.insert(item.file.as_str(), i) {
                return Err(format!("items[{j}] and items[{i}] share the file `{}`", item.file));
            }
            if let Some(problem) = latent_problem(&item.latent_shape, self.latent_channels) {
                return Err(format!("{at} field `latent_shape`: {problem}"));
            }
        }
        let counts = self.bucket_counts();
        if counts != self.buckets {
            return Err(format!("field `buckets` is {:?} but the items give {counts:?}", self.buckets));
        }
        Ok(())
    }
}

fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Serialises an item by hand rather than with `safetensors::serialize`, whose `__metadata__` comes out in
/// hash-map order: written this way, the same item always gives the same bytes and the same content hash.
fn encode_item(id: &str, source: &str, latent: &Tensor, caption: &Tensor) -> candle_core::Result<Vec<u8>> {
    encode_tensors(serde_json::json!({ "id": id, "source": source }), &[("latent", latent), ("caption", caption)])
}

/// `tensors` as f32 safetensors bytes under `metadata`, in the given order.
fn encode_tensors(metadata: serde_json::Value, tensors: &[(&str, &Tensor)]) -> candle_core::Result<Vec<u8>> {
    let mut header = serde_json::json!({ "__metadata__": metadata });
    let mut data = Vec::new();
    for (name, t) in tensors {
        let bytes = tensor_bytes(t)?;
        header[*name] = serde_json::json!({ "dtype": "F32", "shape": t.dims(), "data_offsets": [data.len(), data.len() + bytes.len()] });
        data.extend(bytes);
    }
    let mut header = header.to_string().into_bytes();
    // The format pads the header with spaces so that the data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Writes a dataset: items first, the manifest last (see the module docs).
#[derive(Debug)]
pub struct DatasetWriter {
    store: BlockingStore,
    manifest: Manifest,
}

impl DatasetWriter {
    pub fn new(
        store: BlockingStore,
        latent_channels: usize,
        cap_dim: usize,
        encoder: serde_json::Value,
    ) -> DatasetWriter {
        let manifest = Manifest {
            format: FORMAT.to_string(),
            latent_channels,
            cap_dim,
            encoder,
            buckets: BTreeMap::new(),
            items: Vec::new(),
            empty_caption: None,
        };
        DatasetWriter { store, manifest }
    }

    /// Stores the empty prompt's embedding `caption` [L, cap_dim], made with encoder settings whose hash is
    /// `input_hash`.
    pub fn put_empty_caption(&mut self, input_hash: &str, caption: &Tensor) -> Result<EmptyCaption, DataError> {
        let digest = input_hash.strip_prefix("sha256:").unwrap_or(input_hash);
        let file = format!("items/empty_caption.{}.safetensors", &digest[..digest.len().min(16)]);
        let bad =
            |message: String| DataError::Item { url: self.store.url_of(&file), id: "empty caption".into(), message };
        if let Some(problem) = caption_problem(caption.dims(), self.manifest.cap_dim) {
            return Err(bad(problem));
        }
        let bytes =
            encode_tensors(serde_json::json!({ "id": "" }), &[("caption", caption)]).map_err(|e| bad(e.to_string()))?;
        let empty = EmptyCaption {
            caption_len: caption.dims()[0],
            content_hash: content_hash(&bytes),
            input_hash: input_hash.to_string(),
            file,
        };
        self.store.put(&empty.file, bytes)?;
        self.manifest.empty_caption = Some(empty.clone());
        Ok(empty)
    }

    /// Lists an empty-prompt embedding already in the store.
    pub fn keep_empty_caption(&mut self, empty: EmptyCaption) {
        self.manifest.empty_caption = Some(empty);
    }

    /// Stores one item: `latent` [C, h, w] and `caption` [L, cap_dim], any float dtype (stored as f32).
    pub fn put_item(&mut self, id: &str, source: &str, latent: &Tensor, caption: &Tensor) -> Result<(), DataError> {
        self.write_item(id, source, String::new(), item_file(id), latent, caption)
    }

    /// Stores an item made from inputs whose hash is `input_hash` (see [`ManifestItem::input_hash`]).
    ///
    /// The file name carries the input hash, so re-encoding a changed item never overwrites a file that the
    /// manifest in place still lists: a reader of that manifest keeps working until the new one replaces it.
    pub fn put_encoded_item(
        &mut self,
        id: &str,
        source: &str,
        input_hash: &str,
        latent: &Tensor,
        caption: &Tensor,
    ) -> Result<(), DataError> {
        let digest = input_hash.strip_prefix("sha256:").unwrap_or(input_hash);
        let file = format!("items/{id}.{}.safetensors", &digest[..digest.len().min(16)]);
        self.write_item(id, source, input_hash.to_string(), file, latent, caption)
    }

    fn write_item(
        &mut self,
        id: &str,
        source: &str,
        input_hash: String,
        file: String,
        latent: &Tensor,
        caption: &Tensor,
    ) -> Result<(), DataError> {
        let bad = |message: String| DataError::Item { url: self.store.url_of(&file), id: id.to_string(), message };
        let problem = self
            .listing_problem(id, &file)
            .or_else(|| latent_problem(latent.dims(), self.manifest.latent_channels))
            .or_else(|| caption_problem(caption.dims(), self.manifest.cap_dim));
        if let Some(message) = problem {
            return Err(bad(message));
        }
        let bytes = encode_item(id, source, latent, caption).map_err(|e| bad(e.to_string()))?;
        let content_hash = content_hash(&bytes);
        self.store.put(&file, bytes)?;
        let (c, h, w) = latent.dims3().expect("checked above");
        self.manifest.items.push(ManifestItem {
            id: id.to_string(),
            file,
            latent_shape: [c, h, w],
            caption_len: caption.dim(0).expect("checked above"),
            source: source.to_string(),
            content_hash,
            input_hash,
        });
        Ok(())
    }

    /// Lists an item whose file is already in the store: one kept from an earlier run, or written by another
    /// process whose items this manifest gathers.
    pub fn keep_item(&mut self, item: ManifestItem) -> Result<(), DataError> {
        let problem = self
            .listing_problem(&item.id, &item.file)
            .or_else(|| latent_problem(&item.latent_shape, self.manifest.latent_channels));
        if let Some(message) = problem {
            return Err(DataError::Item { url: self.store.url_of(&item.file), id: item.id, message });
        }
        self.manifest.items.push(item);
        Ok(())
    }

    fn listing_problem(&self, id: &str, file: &str) -> Option<String> {
        id_problem(id)
            .or_else(|| self.manifest.items.iter().any(|item| item.id == id).then(|| "already written".to_string()))
            .or_else(|| {
                self.manifest
                    .items
                    .iter()
                    .any(|item| item.file == file)
                    .then(|| format!("file `{file}` already listed"))
            })
    }

    /// The items so far, for a writer whose items go into a manifest written elsewhere (one shard of a
    /// cache run spread over several processes).
    pub fn into_items(self) -> Vec<ManifestItem> {
        self.manifest.items
    }

    /// Writes the manifest, which makes the dataset visible to readers. A manifest already in place with the
    /// same bytes is left alone, so re-writing an unchanged dataset touches no file.
    pub fn finish(mut self) -> Result<Manifest, DataError> {
        self.manifest.buckets = self.manifest.bucket_counts();
        self.manifest
            .validate()
            .map_err(|message| DataError::Manifest { url: self.store.url_of(MANIFEST), message })?;
        let json = serde_json::to_vec_pretty(&self.manifest).expect("a manifest is plain data");
        let unchanged = match self.store.get(MANIFEST) {
            Ok(old) => old == json,
            Err(StoreError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if !unchanged {
            self.store.put(MANIFEST, json)?;
        }
        Ok(self.manifest)
    }
}

/// One training sample, as stored.
#[derive(Debug, Clone)]
pub struct Item {
    /// Position in the manifest's `items`.
    pub index: usize,
    pub id: String,
    /// [C, h, w] f32.
    pub latent: Tensor,
    /// [L, cap_dim] f32.
    pub caption: Tensor,
}

#[derive(Debug)]
pub struct Dataset {
    store: BlockingStore,
    manifest: Manifest,
}

impl Dataset {
    pub fn open(store: BlockingStore) -> Result<Dataset, DataError> {
        let bytes = match store.get(MANIFEST) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Err(DataError::NoDataset { url: store.url().to_string() }),
            Err(e) => return Err(e.into()),
        };
        let manifest =
            Manifest::parse(&bytes).map_err(|message| DataError::Manifest { url: store.url_of(MANIFEST), message })?;
        Ok(Dataset { store, manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn len(&self) -> usize {
        self.manifest.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.manifest.items.is_empty()
    }

    /// The empty prompt's embedding [L, cap_dim] (f32, on the CPU), which caption dropout trains with.
    pub fn empty_caption(&self) -> Result<Tensor, DataError> {
        let Some(empty) = &self.manifest.empty_caption else {
            return Err(DataError::Manifest {
                url: self.store.url_of(MANIFEST),
                message: "no `empty_caption`: this cache was written by an older acrf; run `acrf cache` again to \
                          train with data.caption_dropout > 0"
                    .into(),
            });
        };
        let bad = |message: String| DataError::Item {
            url: self.store.url_of(&empty.file),
            id: "empty caption".into(),
            message,
        };
        let bytes = self.store.get(&empty.file)?;
        if content_hash(&bytes) != empty.content_hash {
            return Err(bad(format!("content hash differs from the manifest's {}", empty.content_hash)));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let view = st.tensor("caption").map_err(|_| bad("no tensor `caption`".into()))?;
        if view.dtype() != Dtype::F32 || view.shape() != [empty.caption_len, self.manifest.cap_dim] {
            return Err(bad(format!("tensor `caption` is {:?} {:?}", view.dtype(), view.shape())));
        }
        Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu).map_err(|e| bad(e.to_string()))
    }

    /// Reads item `index` of the manifest onto `device`, checking it against the manifest.
    ///
    /// # Panics
    /// If `index >= len()`.
    pub fn load_item(&self, index: usize, device: &Device) -> Result<Item, DataError> {
        let m = &self.manifest;
        let item = &m.items[index];
        let bad =
            |message: String| DataError::Item { url: self.store.url_of(&item.file), id: item.id.clone(), message };
        let bytes = match self.store.get(&item.file) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound { .. }) => return Err(bad("listed in manifest.json but not found".into())),
            Err(e) => return Err(e.into()),
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        match metadata.metadata().as_ref().and_then(|meta| meta.get("id")) {
            Some(id) if *id == item.id => {}
            found => return Err(bad(format!("the file's __metadata__ id is {found:?}, the manifest's `{}`", item.id))),
        }
        let f32_tensor = |name: &str| {
            let view = st.tensor(name).map_err(|_| bad(format!("no tensor `{name}`")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
            }
            Ok(view)
        };
        let (latent, caption) = (f32_tensor("latent")?, f32_tensor("caption")?);
        let latent_shape = latent.shape();
        if let Some(problem) = latent_problem(latent_shape, m.latent_channels)
            .or_else(|| (latent_shape != item.latent_shape).then(|| format!("latent has shape {latent_shape:?}")))
        {
            return Err(bad(format!("{problem}; the manifest lists {:?}", item.latent_shape)));
        }
        let (caption_shape, listed) = (caption.shape(), [item.caption_len, m.cap_dim]);
        if let Some(problem) = caption_problem(caption_shape, m.cap_dim)
            .or_else(|| (caption_shape != listed).then(|| format!("caption has shape {caption_shape:?}")))
        {
            return Err(bad(format!("{problem}; the manifest lists {listed:?}")));
        }
        let hash = content_hash(&bytes);
        if hash != item.content_hash {
            return Err(bad(format!(
                "content hash {hash} differs from the manifest's {}: the file is corrupt or was rewritten",
                item.content_hash
            )));
        }
        let load = |view: &TensorView| {
            Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), device).map_err(|e| bad(e.to_string()))
        };
        Ok(Item { index, id: item.id.clone(), latent: load(&latent)?, caption: load(&caption)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: usize = 4;
    const D: usize = 8;

    fn ramp(seed: usize, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((seed * 1000 + i) as f32 * 0.37).sin()).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// (h, w, caption length) of the sample items: buckets 4x6 (three items) and 8x8 (two).
    const SAMPLE: [(usize, usize, usize); 5] = [(4, 6, 3), (4, 6, 5), (8, 8, 2), (4, 6, 1), (8, 8, 7)];

    fn write_sample(store: &BlockingStore) -> Manifest {
        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::json!({ "vae": "test" }));
        for (k, &(h, w, l)) in SAMPLE.iter().enumerate() {
            let (latent, caption) = (ramp(k, &[C, h, w]), ramp(k + 100, &[l, D]));
            writer.put_item(&format!("img-{k}"), &format!("images/{k}.png"), &latent, &caption).unwrap();
        }
        writer.finish().unwrap()
    }

    fn memory(name: &str) -> BlockingStore {
        BlockingStore::from_url(&format!("memory://{name}")).unwrap()
    }

    fn values(t: &Tensor) -> (Vec<usize>, Vec<f32>) {
        (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1().unwrap())
    }

    #[test]
    fn the_empty_caption_is_stored_once_and_older_caches_say_so() {
        let store = memory("data-empty-caption");
        write_sample(&store);
        let old = Dataset::open(store.clone()).unwrap();
        let err = old.empty_caption().unwrap_err().to_string();
        assert!(err.contains("manifest.json") && err.contains("acrf cache"), "{err}");

        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::Value::Null);
        let caption = ramp(7, &[3, D]);
        writer.put_empty_caption("sha256:0123456789abcdef0123", &caption).unwrap();
        writer.put_item("img-0", "images/0.png", &ramp(1, &[C, 4, 6]), &ramp(2, &[2, D])).unwrap();
        let manifest = writer.finish().unwrap();
        assert_eq!(manifest.empty_caption.as_ref().unwrap().file, "items/empty_caption.0123456789abcdef.safetensors");
        let read = Dataset::open(store.clone()).unwrap().empty_caption().unwrap();
        assert_eq!(values(&read), values(&caption));

        let file = manifest.empty_caption.unwrap().file;
        store.put(&file, encode_tensors(serde_json::json!({}), &[("caption", &ramp(8, &[3, D]))]).unwrap()).unwrap();
        let err = Dataset::open(store).unwrap().empty_caption().unwrap_err().to_string();
        assert!(err.contains("content hash"), "{err}");
    }

    #[test]
    fn memory_and_directory_give_the_same_items() {
        let tmp = tempfile::tempdir().unwrap();
        let stores = [memory("data-same-items"), BlockingStore::from_url(tmp.path().to_str().unwrap()).unwrap()];
        let written: Vec<Manifest> = stores.iter().map(write_sample).collect();
        assert_eq!(written[0], written[1]);
        assert!(tmp.path().join("manifest.json").is_file());
        assert!(tmp.path().join("items/img-0.safetensors").is_file());
        let datasets: Vec<Dataset> = stores.into_iter().map(|s| Dataset::open(s).unwrap()).collect();
        assert_eq!(datasets[0].manifest(), &written[0]);
        let m = datasets[0].manifest();
        assert_eq!(m.buckets, BTreeMap::from([("4x6".to_string(), 3), ("8x8".to_string(), 2)]));
        assert_eq!((m.latent_channels, m.cap_dim, m.format.as_str()), (C, D, FORMAT));
        assert_eq!(m.items[2].latent_shape, [C, 8, 8]);
        assert_eq!(m.items[2].caption_len, 2);
        for (k, &(h, w, l)) in SAMPLE.iter().enumerate() {
            let items: Vec<Item> = datasets.iter().map(|d| d.load_item(k, &Device::Cpu).unwrap()).collect();
            for item in &items {
                assert_eq!((item.index, item.id.as_str()), (k, format!("img-{k}").as_str()));
                assert_eq!(values(&item.latent), values(&ramp(k, &[C, h, w])));
                assert_eq!(values(&item.caption), values(&ramp(k + 100, &[l, D])));
            }
        }
    }

    #[test]
    fn item_files_are_safetensors_with_metadata() {
        let store = memory("data-format");
        let manifest = write_sample(&store);
        let bytes = store.get(&manifest.items[1].file).unwrap();
        assert_eq!(manifest.items[1].file, "items/img-1.safetensors");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("latent").unwrap().shape(), [C, 4, 6]);
        assert_eq!(st.tensor("caption").unwrap().shape(), [5, D]);
        let (header_len, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header_len % 8, 0);
        let meta = meta.metadata().clone().unwrap();
        assert_eq!((meta["id"].as_str(), meta["source"].as_str()), ("img-1", "images/1.png"));
        let loaded = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        assert_eq!(values(&loaded["latent"]), values(&ramp(1, &[C, 4, 6])));
        assert_eq!(manifest.items[1].content_hash, content_hash(&bytes));
    }

    #[test]
    fn writer_rejects_bad_items() {
        let store = memory("data-writer");
        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::Value::Null);
        let ok = (ramp(0, &[C, 4, 4]), ramp(1, &[3, D]));
        writer.put_item("a", "a.png", &ok.0, &ok.1).unwrap();
        let cases = [
            ("a", ok.0.clone(), ok.1.clone(), "already written"),
            ("../x", ok.0.clone(), ok.1.clone(), "must be non-empty ASCII"),
            ("b", ramp(0, &[C, 5, 4]), ok.1.clone(), "multiples of the patch size 2"),
            ("b", ramp(0, &[C + 1, 4, 4]), ok.1.clone(), "5 channels, the dataset has 4"),
            ("b", ramp(0, &[1, C, 4, 4]), ok.1.clone(), "expected 3-D"),
            ("b", ok.0.clone(), ramp(0, &[3, D + 1]), "feature size 9, the dataset has 8"),
            ("b", ok.0.clone(), ramp(0, &[3 * D]), "expected 2-D"),
        ];
        for (id, latent, caption, want) in cases {
            let err = writer.put_item(id, "x.png", &latent, &caption).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains(&format!("item `{id}`")), "{err}");
        }
        writer.finish().unwrap();
        assert_eq!(Dataset::open(store).unwrap().len(), 1);

        let empty = DatasetWriter::new(memory("data-writer-empty"), C, D, serde_json::Value::Null);
        assert!(empty.finish().unwrap_err().to_string().contains("field `items` is empty"));
    }

    #[test]
    fn encoded_and_kept_items() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlockingStore::from_url(tmp.path().to_str().unwrap()).unwrap();
        let (latent, caption) = (ramp(0, &[C, 4, 4]), ramp(1, &[3, D]));
        let hash = "sha256:0123456789abcdef0123";
        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::Value::Null);
        writer.put_encoded_item("a", "a.png", hash, &latent, &caption).unwrap();
        let items = writer.into_items();
        assert_eq!(
            (items[0].file.as_str(), items[0].input_hash.as_str()),
            ("items/a.0123456789abcdef.safetensors", hash)
        );

        // Another writer lists the file written by the first, and refuses to list an id or a file twice.
        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::Value::Null);
        writer.keep_item(items[0].clone()).unwrap();
        let err = writer.keep_item(items[0].clone()).unwrap_err().to_string();
        assert!(err.contains("item `a`: already written"), "{err}");
        let other = ManifestItem { id: "b".into(), ..items[0].clone() };
        let err = writer.keep_item(other).unwrap_err().to_string();
        assert!(err.contains("file `items/a.0123456789abcdef.safetensors` already listed"), "{err}");
        let manifest = writer.finish().unwrap();
        let item = Dataset::open(store.clone()).unwrap().load_item(0, &Device::Cpu).unwrap();
        assert_eq!(values(&item.caption), values(&caption));

        // The same manifest again leaves the file alone; another one replaces it.
        let path = tmp.path().join(MANIFEST);
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut writer = DatasetWriter::new(store.clone(), C, D, serde_json::Value::Null);
        writer.keep_item(manifest.items[0].clone()).unwrap();
        writer.finish().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), written);
        let mut writer = DatasetWriter::new(store, C, D, serde_json::json!({ "changed": true }));
        writer.keep_item(manifest.items[0].clone()).unwrap();
        writer.finish().unwrap();
        assert_ne!(std::fs::metadata(&path).unwrap().modified().unwrap(), written);
    }

    /// Items written without an input hash serialise without the field, as manifests did before it.
    #[test]
    fn manifests_without_input_hashes_read() {
        let manifest = write_sample(&memory("data-no-input-hash"));
        assert!(!serde_json::to_string(&manifest).unwrap().contains("input_hash"));
        assert!(manifest.items.iter().all(|i| i.input_hash.is_empty()));
    }

    #[test]
    fn missing_manifest() {
        let err = Dataset::open(memory("data-missing")).err().unwrap();
        assert_eq!(err.to_string(), "no dataset at memory://data-missing: manifest.json not found");
    }

    /// Rewrites the sample's manifest through `edit` and opens it.
    fn open_edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Result<Dataset, DataError> {
        let store = memory(name);
        let mut json = serde_json::to_value(write_sample(&store)).unwrap();
        edit(&mut json);
        store.put(MANIFEST, serde_json::to_vec(&json).unwrap()).unwrap();
        Dataset::open(store)
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let url = |name: &str| format!("memory://{name}/manifest.json: ");
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit, &str); 6] = [
            ("data-m-format", |j| j["format"] = "acrf-cache/2".into(), "unknown format version `acrf-cache/2`"),
            ("data-m-noformat", |j| drop(j.as_object_mut().unwrap().remove("format")), "field `format` is missing"),
            ("data-m-dup", |j| j["items"][3]["id"] = "img-0".into(), "duplicate id `img-0` in items[0] and items[3]"),
            ("data-m-odd", |j| j["items"][1]["latent_shape"][1] = 5.into(), "items[1] (`img-1`) field `latent_shape`"),
            ("data-m-buckets", |j| j["buckets"]["4x6"] = 2.into(), "field `buckets`"),
            ("data-m-field", |j| drop(j.as_object_mut().unwrap().remove("cap_dim")), "missing field `cap_dim`"),
        ];
        for (name, edit, want) in cases {
            let err = open_edited(name, edit).err().unwrap().to_string();
            assert!(err.starts_with(&url(name)) && err.contains(want), "{err}");
        }
    }

    /// Replaces the file of item `index` with one holding `latent` and `caption`, and gives the manifest the
    /// new file's hash, so that only the shapes disagree.
    fn tampered(name: &str, index: usize, latent: Tensor, caption: Tensor) -> DataError {
        let store = memory(name);
        let mut manifest = write_sample(&store);
        let item = &mut manifest.items[index];
        let bytes = encode_item(&item.id, &item.source, &latent, &caption).unwrap();
        item.content_hash = content_hash(&bytes);
        store.put(&item.file, bytes).unwrap();
        store.put(MANIFEST, serde_json::to_vec(&manifest).unwrap()).unwrap();
        Dataset::open(store).unwrap().load_item(index, &Device::Cpu).unwrap_err()
    }

    #[test]
    fn bad_shapes_name_the_file_and_both_shapes() {
        let caption = || ramp(0, &[5, D]);
        let cases = [
            (ramp(0, &[C, 4, 8]), caption(), "latent has shape [4, 4, 8]; the manifest lists [4, 4, 6]"),
            (ramp(0, &[C, 3, 6]), caption(), "latent has shape [4, 3, 6]: height and width"),
            (ramp(0, &[2, 4, 6]), caption(), "2 channels, the dataset has 4"),
            (ramp(0, &[C * 4 * 6]), caption(), "latent has shape [96], expected 3-D"),
            (ramp(0, &[C, 4, 6]), ramp(0, &[4, D]), "caption has shape [4, 8]; the manifest lists [5, 8]"),
            (ramp(0, &[C, 4, 6]), ramp(0, &[5, 3]), "caption has shape [5, 3]: feature size 3, the dataset has 8"),
            (ramp(0, &[C, 4, 6]), ramp(0, &[5 * D]), "expected 2-D"),
        ];
        for (k, (latent, caption, want)) in cases.into_iter().enumerate() {
            let name = format!("data-shape-{k}");
            let err = tampered(&name, 1, latent, caption).to_string();
            let prefix = format!("memory://{name}/items/img-1.safetensors: item `img-1`: ");
            assert!(err.starts_with(&prefix) && err.contains(want), "{err}");
        }
    }

    #[test]
    fn corrupt_and_missing_files_are_named() {
        let store = memory("data-corrupt");
        let manifest = write_sample(&store);
        let file = &manifest.items[2].file;
        let good = store.get(file).unwrap();
        let dataset = Dataset::open(store.clone()).unwrap();
        let err_with = |bytes: Vec<u8>| {
            store.put(file, bytes).unwrap();
            dataset.load_item(2, &Device::Cpu).unwrap_err().to_string()
        };
        let prefix = "memory://data-corrupt/items/img-2.safetensors: item `img-2`: ";

        let err = err_with(good[..good.len() - 10].to_vec());
        assert!(err.starts_with(prefix) && err.contains("not a readable safetensors file"), "{err}");
        let mut flipped = good.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        let err = err_with(flipped);
        assert!(err.starts_with(prefix) && err.contains("the file is corrupt or was rewritten"), "{err}");
        let err = err_with(std::fs::read("/dev/null").unwrap());
        assert!(err.starts_with(prefix), "{err}");

        let other = store.get(&manifest.items[0].file).unwrap();
        let err = err_with(other.to_vec());
        assert!(err.contains(r#"__metadata__ id is Some("img-0"), the manifest's `img-2`"#), "{err}");

        store.delete(file).unwrap();
        let err = dataset.load_item(2, &Device::Cpu).unwrap_err().to_string();
        assert_eq!(err, format!("{prefix}listed in manifest.json but not found"));
    }
}
