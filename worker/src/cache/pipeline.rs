//! The cache run.
//!
//! Incremental: every item records the hash of its inputs (its path, image bytes, caption text and the
//! settings that shape its content, [`ManifestItem::input_hash`]). A re-run keeps an item of the manifest in
//! place when that hash is unchanged and its file is still there, and encodes the others; the encoders are
//! loaded only once something needs encoding.
//!
//! Threads: a pool reads, hashes, decodes and resizes images while the calling thread runs the encoders
//! (which keep the cores busy on their own); a bounded queue holds at most two prepared images per thread.
//!
//! Processes: [`Shard`] i/N takes the images whose path hash is i mod N, so shards are disjoint whenever and
//! in whatever order each process lists the folder. A shard writes only its own item files, whose names
//! carry the input hash, so no file that the manifest in place lists is ever overwritten, and hands back an
//! [`Outcome`]. [`Cache::commit`] then writes the one manifest from all outcomes, and only after that removes
//! item files no longer listed: a run that fails anywhere leaves the previous dataset intact and readable.
//! Two runs must not write to the same place at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use acrf_common::rng::{self, Key, domain};
use acrf_common::store::BlockingStore;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CacheError;
use super::bucket::{self, BucketSpec, Pixels};
use super::discover::{Source, discover};
use super::encode::{LatentMode, ModelFiles, TextEncoder, VaeEncoder, templated};
use crate::data::{DataError, Dataset, DatasetWriter, EmptyCaption, Manifest, ManifestItem};

/// Written next to the manifest: what the last run cached, skipped and warned about.
pub const REPORT: &str = "cache_report.json";

#[derive(Debug, Clone)]
pub struct CacheOptions {
    pub images: PathBuf,
    /// A diffusers Z-Image pipeline folder.
    pub model: PathBuf,
    /// Where the dataset goes: a directory or any store URL.
    pub out: String,
    pub buckets: BucketSpec,
    pub latent: LatentMode,
    /// Seeds the caption dropout and the latent samples, each drawn per image from its path.
    pub seed: u64,
    pub max_sequence_length: usize,
    /// The probability that an image's caption is replaced by the empty one (classifier-free guidance
    /// training).
    pub caption_dropout: f64,
    /// Put in front of every caption.
    pub class_token: Option<String>,
    /// Encode an image without a caption (no caption file, or an empty one) with the empty caption, rather
    /// than skipping it.
    pub allow_empty_captions: bool,
    /// Decoding threads.
    pub threads: usize,
    pub device: Device,
}

/// Part i of N of the images; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/N`.
    pub fn parse(text: &str) -> Result<Shard, String> {
        let parsed = text.split_once('/').and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("shard `{text}`: expected i/N with 0 <= i < N")),
        }
    }

    pub fn contains(&self, source: &Source) -> bool {
        path_key(source) % self.count as u64 == self.index as u64
    }
}

fn path_key(source: &Source) -> u64 {
    let hash = source.path_hash();
    u64::from_le_bytes(hash[..8].try_into().expect("a sha256 has 32 bytes"))
}

/// Something said about one image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Note {
    /// The image's path under the images folder.
    pub source: String,
    pub message: String,
}

/// What one shard did; plain data, so that a shard run in another process can hand it over.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub items: Vec<ManifestItem>,
    pub skipped: Vec<Note>,
    pub warnings: Vec<Note>,
    pub encoded: usize,
    pub reused: usize,
    /// The empty prompt's embedding, from shard 0.
    #[serde(default)]
    pub empty_caption: Option<EmptyCaption>,
}

/// The batch shape the dataset is meant for, to warn about buckets too small for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub batch_size: usize,
    pub world_size: usize,
}

/// `cache_report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub dataset: String,
    /// Images found.
    pub images: usize,
    /// Items in the manifest.
    pub cached: usize,
    /// Items encoded by this run; the others were kept from the previous one.
    pub encoded: usize,
    pub reused: usize,
    /// Images not in the dataset, and why.
    pub skipped: Vec<Note>,
    pub warnings: Vec<Note>,
    pub batch_size: usize,
    pub world_size: usize,
    pub buckets: Vec<BucketCount>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketCount {
    /// Pixels.
    pub width: usize,
    pub height: usize,
    pub items: usize,
    /// Set when the bucket holds fewer items than one global batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The images of a bucket smaller than one micro-batch, which training never sees.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub never_trained: Vec<String>,
}

/// What a decoding thread hands the encoders.
enum Loaded {
    Keep(ManifestItem),
    Encode { pixels: Pixels, caption: String, input_hash: String },
    Skip(String),
}

/// A cache run over one images folder into one dataset.
pub struct Cache {
    opts: CacheOptions,
    files: ModelFiles,
    store: BlockingStore,
    settings: serde_json::Value,
    /// `settings` as hashed into every input hash.
    settings_bytes: Vec<u8>,
    sources: Vec<Source>,
    previous: HashMap<String, ManifestItem>,
    previous_empty: Option<EmptyCaption>,
    existing: HashSet<String>,
}

impl Cache {
    /// Finds the images, reads the model's configs and the dataset in place; loads no weights.
    pub fn open(opts: CacheOptions) -> Result<Cache, CacheError> {
        if !(0.0..=1.0).contains(&opts.caption_dropout) || opts.max_sequence_length == 0 || opts.threads == 0 {
            return Err(CacheError::Options(format!(
                "caption dropout {} must be in [0, 1], max_sequence_length {} and threads {} at least 1",
                opts.caption_dropout, opts.max_sequence_length, opts.threads
            )));
        }
        let files = ModelFiles::locate(&opts.model)?;
        let sources = discover(&opts.images)?;
        let store = BlockingStore::from_url(&opts.out)?;
        let settings = settings(&opts, &files)?;
        let settings_bytes = serde_json::to_vec(&settings).expect("settings are plain data");
        let (previous, previous_empty) = match Dataset::open(store.clone()) {
            Ok(dataset) => {
                let m = dataset.manifest();
                (m.items.iter().map(|item| (item.id.clone(), item.clone())).collect(), m.empty_caption.clone())
            }
            Err(DataError::NoDataset { .. }) => (HashMap::new(), None),
            Err(DataError::Store(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("{e}: every image is encoded anew");
                (HashMap::new(), None)
            }
        };
        let existing = store.list("items")?.into_iter().map(|(name, _)| name).collect();
        Ok(Cache { opts, files, store, settings, settings_bytes, sources, previous, previous_empty, existing })
    }

    /// The images found, sorted by path.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Caches the images of `shard`, calling `progress` after each; writes item files, not the manifest.
    pub fn run(&self, shard: Shard, progress: &dyn Fn()) -> Result<Outcome, CacheError> {
        let todo: Vec<&Source> = self.sources.iter().filter(|s| shard.contains(s)).collect();
        let mut writer = DatasetWriter::new(
            self.store.clone(),
            self.files.latent_channels(),
            self.files.cap_dim(),
            self.settings.clone(),
        );
        let mut outcome = Outcome::default();
        let mut encoders = None;
        let next = AtomicUsize::new(0);
        let (tx, rx) = mpsc::sync_channel(2 * self.opts.threads);
        std::thread::scope(|scope| -> Result<(), CacheError> {
            for _ in 0..self.opts.threads {
                let (tx, next, todo) = (tx.clone(), &next, &todo);
                scope.spawn(move || {
                    while let Some(&source) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                        // A closed queue means the encoding side failed and stopped.
                        if tx.send((source, self.load(source))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            for (source, loaded) in rx {
                match loaded {
                    Loaded::Skip(message) => {
                        tracing::warn!("skipping {}: {message}", source.rel);
                        outcome.skipped.push(Note { source: source.rel.clone(), message });
                    }
                    Loaded::Keep(item) => {
                        writer.keep_item(item)?;
                        outcome.reused += 1;
                    }
                    Loaded::Encode { pixels, caption, input_hash } => {
                        if encoders.is_none() {
                            encoders = Some(self.load_encoders()?);
                        }
                        let encoders = encoders.as_ref().expect("loaded above");
                        let (latent, features) = self.encode(encoders, source, &pixels, &caption, &mut outcome)?;
                        writer.put_encoded_item(&source.id(), &source.rel, &input_hash, &latent, &features)?;
                        outcome.encoded += 1;
                    }
                }
                progress();
            }
            Ok(())
        })?;
        if shard.index == 0 {
            outcome.empty_caption = Some(self.empty_caption(&mut writer, &mut encoders)?);
        }
        outcome.items = writer.into_items();
        Ok(outcome)
    }

    /// The empty prompt's embedding, stored once per dataset for caption dropout: kept while the encoder
    /// settings hold, encoded otherwise.
    fn empty_caption(
        &self,
        writer: &mut DatasetWriter,
        encoders: &mut Option<(VaeEncoder, TextEncoder)>,
    ) -> Result<EmptyCaption, CacheError> {
        let mut hasher = Sha256::new();
        hasher.update(&self.settings_bytes);
        hasher.update(b"empty caption");
        let input_hash = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(kept) = self.previous_empty.as_ref().filter(|e| e.input_hash == input_hash)
            && self.store.get_if_exists(&kept.file)?.is_some()
        {
            return Ok(kept.clone());
        }
        if encoders.is_none() {
            *encoders = Some(self.load_encoders()?);
        }
        let (_, text) = encoders.as_ref().expect("loaded above");
        let features = text
            .encode("")
            .map_err(|e| CacheError::Encode { item: "the empty caption".into(), message: e.to_string() })?
            .features;
        Ok(writer.put_empty_caption(&input_hash, &features)?)
    }

    fn load_encoders(&self) -> Result<(VaeEncoder, TextEncoder), CacheError> {
        tracing::info!("loading the VAE and the text encoder from {}", self.opts.model.display());
        let vae = VaeEncoder::load(&self.files, &self.opts.device)?;
        let text = TextEncoder::load(&self.files, self.opts.max_sequence_length, DType::F32, &self.opts.device)?;
        Ok((vae, text))
    }

    /// The latent and caption features of one image; a truncated caption is noted in `outcome`.
    fn encode(
        &self,
        (vae, text): &(VaeEncoder, TextEncoder),
        source: &Source,
        pixels: &Pixels,
        caption: &str,
        outcome: &mut Outcome,
    ) -> Result<(Tensor, Tensor), CacheError> {
        let fail = |e: candle_core::Error| CacheError::Encode { item: source.rel.clone(), message: e.to_string() };
        let noise = (self.opts.latent == LatentMode::Sample)
            .then(|| Key::new(self.opts.seed, domain::LATENT_SAMPLE, 0, path_key(source)));
        let latent = vae.encode(pixels, noise).map_err(fail)?;
        let encoded = text.encode(caption).map_err(fail)?;
        if let Some(all) = encoded.truncated_from {
            let message = format!(
                "the caption{} is {all} tokens in the template, truncated to max_sequence_length {}",
                source.caption.as_ref().map(|c| format!(" ({})", c.display())).unwrap_or_default(),
                self.opts.max_sequence_length
            );
            tracing::warn!("{}: {message}", source.rel);
            outcome.warnings.push(Note { source: source.rel.clone(), message });
        }
        Ok((latent, encoded.features))
    }

    /// Reads one image and its caption and decides: keep the item in place, encode it, or skip it.
    fn load(&self, source: &Source) -> Loaded {
        let bytes = match std::fs::read(&source.image) {
            Ok(bytes) => bytes,
            Err(e) => return Loaded::Skip(format!("cannot read the image: {e}")),
        };
        let caption = match &source.caption {
            Some(path) => match std::fs::read(path).map(String::from_utf8) {
                Ok(Ok(text)) => text,
                Ok(Err(_)) => return Loaded::Skip(format!("the caption file {} is not UTF-8", path.display())),
                Err(e) => return Loaded::Skip(format!("cannot read the caption file {}: {e}", path.display())),
            },
            None => String::new(),
        };
        if caption.trim().is_empty() && !self.opts.allow_empty_captions {
            let what = match &source.caption {
                Some(path) => format!("the caption file {} is empty", path.display()),
                None => "no caption: neither <name>.txt nor <name>.caption is next to it".into(),
            };
            return Loaded::Skip(format!("{what} (--allow-empty-captions encodes such images with the empty caption)"));
        }
        let input_hash = self.input_hash(source, &bytes, &caption);
        let kept =
            self.previous.get(&source.id()).filter(|i| i.input_hash == input_hash && self.existing.contains(&i.file));
        if let Some(item) = kept {
            // The size rule is not part of the hash (it decides whether an item exists, not what it holds).
            return match bucket::dimensions(&bytes).and_then(|(w, h)| self.opts.buckets.fit(w, h)) {
                Ok(_) => Loaded::Keep(item.clone()),
                Err(message) => Loaded::Skip(message),
            };
        }
        match bucket::decode(&bytes).and_then(|image| bucket::prepare(&image, &self.opts.buckets)) {
            Ok(pixels) => Loaded::Encode { pixels, caption: self.conditioning_text(source, &caption), input_hash },
            Err(message) => Loaded::Skip(message),
        }
    }

    fn input_hash(&self, source: &Source, image: &[u8], caption: &str) -> String {
        let mut hasher = Sha256::new();
        for part in [self.settings_bytes.as_slice(), source.rel.as_bytes(), image, caption.as_bytes()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        format!("sha256:{}", hex::encode(hasher.finalize()))
    }

    /// The text the encoder sees for `caption`, before the chat template: trimmed, after the class token, or
    /// empty when dropped.
    fn conditioning_text(&self, source: &Source, caption: &str) -> String {
        let key = Key::new(self.opts.seed, domain::CAPTION_DROPOUT, 0, path_key(source));
        if self.opts.caption_dropout > 0.0 && rng::uniform01(key, 0) < self.opts.caption_dropout {
            return String::new();
        }
        match (self.opts.class_token.as_deref(), caption.trim()) {
            (Some(token), "") => token.to_string(),
            (Some(token), text) => format!("{token} {text}"),
            (None, text) => text.to_string(),
        }
    }

    /// Writes the manifest of all `outcomes` (one per shard), removes the item files it no longer lists and
    /// writes the report. With no item at all, the manifest in place is left alone and only the report is
    /// written.
    pub fn commit(&self, outcomes: Vec<Outcome>, batch: BatchShape) -> Result<Report, CacheError> {
        let mut all = Outcome::default();
        for o in outcomes {
            all.items.extend(o.items);
            all.skipped.extend(o.skipped);
            all.warnings.extend(o.warnings);
            all.encoded += o.encoded;
            all.reused += o.reused;
            all.empty_caption = all.empty_caption.or(o.empty_caption);
        }
        all.items.sort_by(|a, b| a.source.cmp(&b.source));
        all.skipped.sort();
        all.warnings.sort();
        let cached = all.items.len();
        let buckets = if all.items.is_empty() {
            Vec::new()
        } else {
            let mut writer = DatasetWriter::new(
                self.store.clone(),
                self.files.latent_channels(),
                self.files.cap_dim(),
                self.settings.clone(),
            );
            for item in all.items {
                writer.keep_item(item)?;
            }
            if let Some(empty) = all.empty_caption {
                writer.keep_empty_caption(empty);
            }
            let manifest = writer.finish()?;
            let listed: HashSet<&str> = manifest
                .items
                .iter()
                .map(|i| i.file.as_str())
                .chain(manifest.empty_caption.iter().map(|e| e.file.as_str()))
                .collect();
            for (name, _) in self.store.list("items")? {
                if !listed.contains(name.as_str()) {
                    self.store.delete(&name)?;
                }
            }
            bucket_counts(&manifest, batch, self.files.downsample())
        };
        let report = Report {
            dataset: self.store.url().to_string(),
            images: self.sources.len(),
            cached,
            encoded: all.encoded,
            reused: all.reused,
            skipped: all.skipped,
            warnings: all.warnings,
            batch_size: batch.batch_size,
            world_size: batch.world_size,
            buckets,
        };
        self.store.put(REPORT, serde_json::to_vec_pretty(&report).expect("a report is plain data"))?;
        Ok(report)
    }
}

/// What shapes an item's content besides its own image and caption: the manifest's `encoder`, and part of
/// every input hash, so changing any of it re-encodes everything. The seed is in it only when something is
/// drawn with it.
fn settings(opts: &CacheOptions, files: &ModelFiles) -> Result<serde_json::Value, CacheError> {
    let mut settings = files.identity()?;
    settings["conditioning"] = serde_json::json!({
        "template": templated("{caption}"),
        "hidden_state": -2,
        "max_sequence_length": opts.max_sequence_length,
        "class_token": opts.class_token,
        "caption_dropout": opts.caption_dropout,
    });
    settings["image"] = serde_json::json!({
        "resolution": opts.buckets.resolution,
        "bucket_step": opts.buckets.step,
        "resize": "lanczos3 to cover the bucket, centre crop",
        "latent": opts.latent.name(),
    });
    settings["dtype"] = "f32".into();
    let drawn = opts.latent == LatentMode::Sample || opts.caption_dropout > 0.0;
    settings["seed"] = if drawn { opts.seed.into() } else { serde_json::Value::Null };
    Ok(settings)
}

fn bucket_counts(manifest: &Manifest, batch: BatchShape, factor: usize) -> Vec<BucketCount> {
    let mut buckets: BTreeMap<(usize, usize), Vec<&str>> = BTreeMap::new();
    for item in &manifest.items {
        let [_, h, w] = item.latent_shape;
        buckets.entry((w * factor, h * factor)).or_default().push(&item.source);
    }
    let (b, global) = (batch.batch_size, batch.batch_size * batch.world_size);
    buckets
        .into_iter()
        .map(|((width, height), sources)| {
            let n = sources.len();
            let (warning, never_trained) = if n < b {
                let names = sources.join(", ");
                (Some(format!("{n} item(s), fewer than the batch size {b}: never trained on: {names}")), sources)
            } else if n < global {
                let left_out = match n % b {
                    0 => String::new(),
                    r => format!("; {r} of its items are left out of each epoch, others each time"),
                };
                let warning = format!(
                    "{n} items, fewer than one global batch of {global} (batch size {b} x world size {}): its {} \
                     micro-batch(es) share steps with other buckets'{left_out}",
                    batch.world_size,
                    n / b
                );
                (Some(warning), Vec::new())
            } else {
                (None, Vec::new())
            };
            let never_trained = never_trained.into_iter().map(str::to_string).collect();
            BucketCount { width, height, items: n, warning, never_trained }
        })
        .collect()
}
