//! A job described by command-line flags instead of files: a random-weight model of any shape, one random
//! item, and the LoRA step of the PyTorch reference (`shared/bench/torch_step.py`, whose flags these mirror),
//! so that `acrf bench` and `acrf plan` can compare with it, or plan a model that is not on disk.

use std::path::Path;

use acrf_common::config::{Config, LoraBlock, LoraTarget, ModelDtype};
use acrf_common::rng::{Key, fill_normal_f32};
use acrf_common::store::BlockingStore;
use acrf_worker::data::DatasetWriter;
use acrf_worker::model::{ZImageConfig, random_weights, write_diffusers_folder};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::args::SyntheticArgs;

/// Domain tag of the synthetic item's random numbers.
const SYNTHETIC_ITEM: u64 = 110;

impl SyntheticArgs {
    pub fn model_config(&self) -> ZImageConfig {
        let turbo = ZImageConfig::z_image_turbo();
        if self.turbo {
            return turbo;
        }
        let head_dim = self.dim / self.heads.max(1);
        ZImageConfig {
            dim: self.dim,
            n_heads: self.heads,
            n_kv_heads: self.heads,
            n_layers: self.layers,
            n_refiner_layers: self.refiners,
            cap_feat_dim: self.dim,
            axes_dims: vec![head_dim / 4, 3 * head_dim / 8, 3 * head_dim / 8],
            axes_lens: vec![1536, 512, 512],
            ..turbo
        }
    }

    /// The job of the reference step: batch 1, AdamW at 1e-4 with clipping at 1, a plain MSE on the velocity
    /// (no Min-SNR weight), adapters on every block, files under `dir`.
    pub fn config(&self, dir: &Path) -> Config {
        let at = |p: &str| dir.join(p).display().to_string();
        let mut c = Config::new(at("output"), at("model"), at("data"));
        c.run_name = "bench".into();
        c.model.dtype = if self.bf16 { ModelDtype::Bf16 } else { ModelDtype::F32 };
        c.lora.network_dim = self.rank;
        c.lora.network_alpha = self.rank as f64;
        c.lora.targets = vec![LoraTarget::ToQ, LoraTarget::ToK, LoraTarget::ToV, LoraTarget::ToOut0];
        if self.ffn {
            c.lora.targets.push(LoraTarget::FeedForward);
        }
        c.lora.blocks = vec![LoraBlock::NoiseRefiner, LoraBlock::ContextRefiner, LoraBlock::Layers];
        c.acrf.snr_gamma = 0.0;
        c.loss.lambda_char = 0.0;
        c.loss.lambda_mse = 1.0;
        c.loss.lambda_cos = 0.0;
        c.loss.lambda_fft = 0.0;
        let t = &mut c.training;
        t.max_steps = 1_000_000;
        t.learning_rate = 1e-4;
        t.lr_min = 1e-6;
        t.gradient_checkpointing = self.ckpt;
        t.save_every_n_epochs = 0;
        c
    }

    /// Writes the model and the one-item dataset under `dir` and returns the job.
    pub fn write(&self, dir: &Path) -> Result<Config> {
        let cfg = self.model_config();
        let mut weights = random_weights(&cfg, 1)?;
        if self.bf16 {
            // Stored as the real model ships, so that loading is what a user's run does.
            for t in weights.values_mut() {
                *t = t.to_dtype(DType::BF16)?;
            }
        }
        write_diffusers_folder(&dir.join("model"), &cfg, &weights, usize::MAX)?;
        let store = BlockingStore::from_url(&dir.join("data").display().to_string())?;
        let encoder = serde_json::json!({ "kind": "acrf synthetic: one random item" });
        let mut writer = DatasetWriter::new(store, cfg.in_channels, cfg.cap_feat_dim, encoder);
        let normal = |stream: u64, shape: &[usize]| {
            let mut v = vec![0f32; shape.iter().product()];
            fill_normal_f32(Key::new(0, SYNTHETIC_ITEM, stream, 0), &mut v);
            Tensor::from_vec(v, shape, &Device::Cpu)
        };
        writer.put_item(
            "item",
            "synthetic",
            &normal(0, &[cfg.in_channels, self.hw, self.hw])?,
            &normal(1, &[self.cap, cfg.cap_feat_dim])?,
        )?;
        writer.finish()?;
        Ok(self.config(dir))
    }

    /// The latent size and caption length of the item, which a plan uses without writing anything.
    pub fn shapes(&self) -> ((usize, usize), usize) {
        ((self.hw, self.hw), self.cap)
    }
}
