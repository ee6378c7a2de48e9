//! `acrf demo`: a complete job small enough for any laptop CPU. It draws a few dozen images with captions,
//! writes a tiny random Z-Image pipeline in the diffusers layout (transformer, VAE, Qwen3 text encoder and
//! tokenizer), caches the images the way `acrf cache` does, writes a `job.toml`, then trains.
//!
//! The images carry a signal the captions predict: each shows one of a few concepts (a colour and a
//! pattern, placed with some jitter) and its caption names that concept among filler words, so the adapters
//! learn what the caption says about the image and the loss falls for a reason, not by chance.

use std::path::{Path, PathBuf};

use acrf_common::config::{Config, LoraTarget, ModelDtype};
use acrf_common::rng::{self, Key};
use acrf_worker::cache::bucket::BucketSpec;
use acrf_worker::cache::encode::LatentMode;
use acrf_worker::cache::pipeline::{BatchShape, Cache, CacheOptions, Report, Shard};
use acrf_worker::cache::toy::{self, ToyText, ToyVae};
use acrf_worker::model::{ZImageConfig, random_weights, write_diffusers_folder};
use anyhow::{Context, Result, anyhow};
use candle_core::Device;
use image::RgbImage;

/// Domain tag of the demo's own random numbers (kept apart from the trainer's).
const DEMO_IMAGE: u64 = 100;

/// (caption words, colour) of each concept.
const CONCEPTS: [(&str, [u8; 3]); 4] = [
    ("red disc", [220, 40, 30]),
    ("blue stripes", [30, 60, 220]),
    ("green checks", [40, 180, 60]),
    ("yellow ramp", [230, 210, 40]),
];
const FILLER: [&str; 8] = ["a", "simple", "picture", "of", "with", "soft", "light", "today"];
const ITEMS: usize = 32;
const CAP_DIM: usize = 64;
/// Buckets hold about RESOLUTION² pixels: 128x128 and 160x96, latents 16x16 and 12x20.
const RESOLUTION: u32 = 128;
/// The drawn sizes (twice the bucket's, so that caching scales them down).
const SIZES: [(u32, u32); 2] = [(256, 256), (320, 192)];
const BATCH_SIZE: usize = 2;

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

/// The demo's VAE: Z-Image's shape at toy width, its factors chosen to bring the random encoder's latents to
/// about unit variance, as the real factors do for the real VAE.
fn vae() -> ToyVae {
    ToyVae { scaling_factor: 1.8, shift_factor: 0.0, ..ToyVae::default() }
}

pub struct Demo {
    pub dir: PathBuf,
    pub job: PathBuf,
    /// The second job: the demo with caption dropout and Turbo drift measured at its sample points.
    pub turbo_job: PathBuf,
    pub config: Config,
    pub cache: Report,
}

/// Image `i`: concept `i mod 4` at one of the two sizes, its pattern shifted by a per-image offset.
fn draw(i: usize) -> (RgbImage, String) {
    let concept = i % CONCEPTS.len();
    let (w, h) = SIZES[(i / CONCEPTS.len()) % SIZES.len()];
    let key = Key::new(7, DEMO_IMAGE, i as u64, 0);
    let jitter = |k: u64| rng::uniform01(key, k) - 0.5;
    let (cx, cy, phase) = (f64::from(w) * (0.5 + 0.2 * jitter(0)), f64::from(h) * (0.5 + 0.2 * jitter(1)), jitter(2));
    let (name, colour) = CONCEPTS[concept];
    let image = RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (f64::from(x), f64::from(y));
        let on = match concept {
            0 => (x - cx).hypot(y - cy) < 0.3 * f64::from(h),
            1 => ((y / 24.0 + phase).rem_euclid(1.0)) < 0.5,
            2 => (((x - cx) / 32.0).floor() + ((y - cy) / 32.0).floor()).rem_euclid(2.0) < 1.0,
            _ => ((x + y) / f64::from(w + h) + 0.2 * phase).rem_euclid(1.0) < 0.5,
        };
        if on { colour.into() } else { [20, 20, 28].into() }
    });
    let filler: Vec<&str> = (0..i % 5).map(|k| FILLER[(i * 3 + k) % FILLER.len()]).collect();
    (image, format!("{} {name}", filler.join(" ")).trim().to_string())
}

/// Writes the model, images, dataset and job into `dir` (created if needed) and returns the job.
pub fn write(dir: &Path) -> Result<Demo> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let dir = dir.canonicalize()?;
    let cfg = model_config();
    let model = dir.join("model");
    write_diffusers_folder(&model.join("transformer"), &cfg, &random_weights(&cfg, 1)?, 1 << 20)?;

    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let mut captions = Vec::new();
    for i in 0..ITEMS {
        let (image, caption) = draw(i);
        image.save(images.join(format!("img{i:03}.png")))?;
        std::fs::write(images.join(format!("img{i:03}.txt")), &caption)?;
        captions.push(caption);
    }
    let texts: Vec<&str> = captions.iter().map(String::as_str).collect();
    let text = ToyText { hidden_size: CAP_DIM, ..ToyText::default() };
    toy::write_encoders(&model, &vae(), &text, &texts, 2)?;

    let cache = Cache::open(CacheOptions {
        images,
        model: model.clone(),
        out: dir.join("data").display().to_string(),
        buckets: BucketSpec::new(RESOLUTION, Some(16), None).map_err(|e| anyhow!(e))?,
        latent: LatentMode::Mean,
        seed: 0,
        max_sequence_length: 512,
        caption_dropout: 0.0,
        class_token: None,
        allow_empty_captions: false,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
        device: Device::Cpu,
    })?;
    let outcome = cache.run(Shard::WHOLE, &|| {})?;
    let report = cache.commit(vec![outcome], BatchShape { batch_size: BATCH_SIZE, world_size: 1 })?;

    let mut config = Config::new("output", "model", "data");
    config.run_name = "demo".into();
    config.model.dtype = ModelDtype::F32;
    config.lora.network_dim = 8;
    config.lora.network_alpha = 8.0;
    config.lora.targets =
        vec![LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0, LoraTarget::FeedForward];
    let t = &mut config.training;
    t.max_steps = 160;
    t.batch_size = BATCH_SIZE;
    // Four micro-batches a step: the 16 of an epoch make exactly four steps, and the global batch splits
    // evenly over 1, 2 or 4 workers (`--set training.gradient_accumulation=2 --workers 2` trains the same run).
    t.gradient_accumulation = 4;
    t.learning_rate = 5e-3;
    t.save_every_n_steps = 40;
    t.save_every_n_epochs = 0;
    t.gradient_checkpointing = false;
    let text = format!(
        "# acrf demo job: a tiny random Z-Image model and a synthetic dataset cached from images/, trained on \
         the CPU.\n# Every key with its default: `acrf train job.toml --print-config`.\n{}",
        config.to_toml_string()?
    );
    let job = dir.join("job.toml");
    std::fs::write(&job, text)?;

    config.run_name = "demo-turbo".into();
    config.data.caption_dropout = 0.1;
    let s = &mut config.sample;
    s.prompts = CONCEPTS.iter().take(2).map(|(name, _)| format!("a {name}")).collect();
    s.every_n_steps = 40;
    (s.width, s.height) = (RESOLUTION as usize, RESOLUTION as usize);
    let text = format!(
        "# The demo job with caption dropout, sampling every 40 steps and the Turbo drift measured at each \
         sample point (README, \"Keeping Turbo fast\").\n# acrf train turbo.toml && acrf report \
         output/runs/demo-turbo\n{}",
        config.to_toml_string()?
    );
    let turbo_job = dir.join("turbo.toml");
    std::fs::write(&turbo_job, text)?;
    let config = Config::load(&job)?;
    Ok(Demo { dir, job, turbo_job, config, cache: report })
}

/// Mean of the first and last tenth of `losses`.
pub fn first_and_last_tenth(losses: &[f64]) -> (f64, f64) {
    let n = (losses.len() / 10).max(1);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..n]), mean(&losses[losses.len() - n..]))
}
