//! `acrf demo`: a complete job small enough for any laptop CPU. It writes a tiny random Z-Image model in
//! the diffusers layout, a cached dataset in two aspect-ratio buckets, and a `job.toml`, then trains.
//!
//! The dataset carries a real signal: every latent is one of a few smooth "concept" fields plus a little
//! noise, and its caption is made of that concept's token embedding, so the adapters can learn what the
//! caption says about the image and the loss falls for a reason, not by chance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use acrf_common::config::{Config, LoraTarget, ModelDtype};
use acrf_common::rng::{self, Key};
use acrf_common::store::BlockingStore;
use acrf_worker::data::DatasetWriter;
use acrf_worker::model::{ZImageConfig, random_weights, write_diffusers_folder};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Domain tags of the demo's own random numbers (kept apart from the trainer's).
const DEMO_FIELD: u64 = 100;
const DEMO_TOKEN: u64 = 101;
const DEMO_JITTER: u64 = 102;

const CONCEPTS: usize = 4;
const ITEMS: usize = 32;
const CAP_DIM: usize = 64;
/// Latent sizes (h, w) of the two buckets.
const BUCKETS: [(usize, usize); 2] = [(16, 16), (12, 20)];

pub fn model_config() -> ZImageConfig {
    ZImageConfig {
        dim: 96,
        n_layers: 2,
        n_refiner_layers: 1,
        n_heads: 3,
        n_kv_heads: 3,
        cap_feat_dim: CAP_DIM,
        axes_dims: vec![8, 12, 12],
        axes_lens: vec![256, 64, 64],
        ..ZImageConfig::z_image_turbo()
    }
}

pub struct Demo {
    pub dir: PathBuf,
    pub job: PathBuf,
    pub config: Config,
}

/// A smooth field [c, h, w]: a few low-frequency waves per channel, unit variance.
fn concept_field(concept: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let key = Key::new(7, DEMO_FIELD, concept as u64, 0);
    let mut out = vec![0f32; c * h * w];
    for ch in 0..c {
        let mut params = [0f64; 9];
        for (i, p) in params.iter_mut().enumerate() {
            *p = rng::uniform01(key, (ch * 9 + i) as u64);
        }
        for y in 0..h {
            for x in 0..w {
                let (u, v) = (y as f64 / h as f64, x as f64 / w as f64);
                let mut s = 0.0;
                for k in 0..3 {
                    let (fy, fx, phase) =
                        (params[3 * k] * 3.0, params[3 * k + 1] * 3.0, params[3 * k + 2] * std::f64::consts::TAU);
                    s += ((fy * u + fx * v) * std::f64::consts::TAU + phase).sin();
                }
                out[(ch * h + y) * w + x] = (s / 3f64.sqrt()) as f32;
            }
        }
    }
    out
}

/// Writes the model, dataset and job into `dir` (created if needed) and returns the job.
pub fn write(dir: &Path) -> Result<Demo> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let dir = dir.canonicalize()?;
    let cfg = model_config();
    write_diffusers_folder(&dir.join("model/transformer"), &cfg, &random_weights(&cfg, 1)?, 1 << 20)?;

    let data_dir = dir.join("data");
    let store = BlockingStore::from_url(&data_dir.display().to_string())?;
    let encoder = serde_json::json!({ "kind": "acrf demo: synthetic concept fields and caption tokens" });
    let mut writer = DatasetWriter::new(store, cfg.in_channels, CAP_DIM, encoder);
    let mut tokens = vec![0f32; CONCEPTS * CAP_DIM];
    rng::fill_normal_f32(Key::new(7, DEMO_TOKEN, 0, 0), &mut tokens);
    for i in 0..ITEMS {
        let concept = i % CONCEPTS;
        let (h, w) = BUCKETS[(i / CONCEPTS) % BUCKETS.len()];
        let mut latent = concept_field(concept, cfg.in_channels, h, w);
        let mut jitter = vec![0f32; latent.len()];
        rng::fill_normal_f32(Key::new(7, DEMO_JITTER, i as u64, 0), &mut jitter);
        latent.iter_mut().zip(&jitter).for_each(|(l, j)| *l += 0.1 * j);
        let len = 6 + i % 9;
        let row = &tokens[concept * CAP_DIM..(concept + 1) * CAP_DIM];
        let caption: Vec<f32> = (0..len).flat_map(|_| row.iter().copied()).collect();
        writer.put_item(
            &format!("item{i:03}"),
            &format!("concept {concept}"),
            &Tensor::from_vec(latent, (cfg.in_channels, h, w), &Device::Cpu)?,
            &Tensor::from_vec(caption, (len, CAP_DIM), &Device::Cpu)?,
        )?;
    }
    writer.finish()?;

    let mut config = Config::new("output", "model", "data");
    config.run_name = "demo".into();
    config.model.dtype = ModelDtype::F32;
    config.lora.network_dim = 8;
    config.lora.network_alpha = 8.0;
    config.lora.targets =
        vec![LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0, LoraTarget::FeedForward];
    let t = &mut config.training;
    t.max_steps = 160;
    t.batch_size = 2;
    t.gradient_accumulation = 5;
    t.learning_rate = 5e-3;
    t.save_every_n_steps = 40;
    t.save_every_n_epochs = 0;
    t.gradient_checkpointing = false;
    let text = format!(
        "# acrf demo job: a tiny random Z-Image model and a synthetic cached dataset, trained on the CPU.\n\
         # Every key with its default: `acrf train job.toml --print-config`.\n{}",
        config.to_toml_string()?
    );
    let job = dir.join("job.toml");
    std::fs::write(&job, text)?;
    let config = Config::load(&job)?;
    Ok(Demo { dir, job, config })
}

/// Mean of the first and last tenth of `losses`.
pub fn first_and_last_tenth(losses: &[f64]) -> (f64, f64) {
    let n = (losses.len() / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..n]), mean(&losses[losses.len() - n..]))
}

/// Counts per bucket, for the summary.
pub fn buckets(dir: &Path) -> Result<BTreeMap<String, usize>> {
    let ds = acrf_worker::data::Dataset::open(BlockingStore::from_url(&dir.join("data").display().to_string())?)?;
    Ok(ds.manifest().buckets.clone())
}
