//! Z-Image's two frozen encoders, as the official pipeline uses them, the VAE decoder that turns sampled latents
//! back into pictures, and the model folder they come from.
//!
//! - Images: the VAE encoder's latent distribution, its mean by default (a sample per item is optional,
//!   drawn from the item's own key so a re-run draws the same), normalised as `(z − shift)·scale` with the
//!   factors of `vae/config.json`.
//! - Captions: the Qwen chat template around the caption, the Qwen3 encoder's `hidden_states[-2]` with no
//!   final norm, every real token and nothing else, cut at `max_sequence_length`. candle's encoder has no
//!   padding mask, so each caption is encoded alone, unpadded.
//!
//! The VAE runs in f32 because diffusers upcasts it too (`force_upcast`). The cache runs the text encoder in f32
//! because the cache is computed once and its precision is what every training step sees; sample prompts are
//! encoded in the transformer's dtype, as the pipeline does.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use acrf_common::rng::{self, Key};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::z_image::text_encoder::{TextEncoderConfig, ZImageTextEncoder};
use candle_transformers::models::z_image::vae::{self, VaeConfig};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::CacheError;
use super::bucket::{ALIGN, Pixels};

/// The chat template of the official pipeline (`apply_chat_template(add_generation_prompt=True)`), split
/// around the caption.
pub const TEMPLATE: (&str, &str) = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n");

/// The caption as the text encoder reads it.
pub fn templated(caption: &str) -> String {
    format!("{}{caption}{}", TEMPLATE.0, TEMPLATE.1)
}

/// Whether the latent is the mean of the VAE's distribution or a sample of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatentMode {
    Mean,
    Sample,
}

impl LatentMode {
    pub fn name(self) -> &'static str {
        match self {
            LatentMode::Mean => "mean",
            LatentMode::Sample => "sample",
        }
    }
}

/// The encoder files of a diffusers Z-Image pipeline folder, with their configs read and checked but no
/// weights loaded: a re-run with nothing to encode never loads the 8 GB text encoder.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub vae: VaeConfig,
    vae_json: serde_json::Value,
    vae_weights: PathBuf,
    pub text: TextEncoderConfig,
    text_json: serde_json::Value,
    text_weights: Vec<PathBuf>,
    tokenizer: PathBuf,
}

fn read_json(path: &Path) -> Result<serde_json::Value, CacheError> {
    let text = std::fs::read_to_string(path).map_err(|e| model_error(path, e))?;
    serde_json::from_str(&text).map_err(|e| model_error(path, format!("not valid JSON: {e}")))
}

fn model_error(path: &Path, message: impl ToString) -> CacheError {
    CacheError::Model { file: path.display().to_string(), message: message.to_string() }
}

fn existing(path: PathBuf) -> Result<PathBuf, CacheError> {
    if path.is_file() { Ok(path) } else { Err(model_error(&path, "not found")) }
}

impl ModelFiles {
    /// Reads `vae/config.json`, `text_encoder/config.json` and finds the weights and `tokenizer/tokenizer.json`
    /// under `root`.
    pub fn locate(root: &Path) -> Result<ModelFiles, CacheError> {
        let vae_config = root.join("vae/config.json");
        let vae_json = read_json(&vae_config)?;
        let bad_vae = |message: String| model_error(&vae_config, message);
        for factor in ["scaling_factor", "shift_factor"] {
            if !vae_json.get(factor).is_some_and(serde_json::Value::is_number) {
                return Err(bad_vae(format!("`{factor}` is missing: Z-Image latents are normalised with it")));
            }
        }
        // diffusers reads an absent `use_quant_conv` as true; the Z-Image VAE has none and candle applies none.
        if vae_json.get("use_quant_conv").and_then(serde_json::Value::as_bool) != Some(false) {
            return Err(bad_vae(
                "`use_quant_conv` is not false: only VAEs without quant_conv (as Z-Image's) are supported".into(),
            ));
        }
        let vae: VaeConfig = serde_json::from_value(vae_json.clone()).map_err(|e| bad_vae(e.to_string()))?;
        let factor = downsample(&vae);
        if vae.in_channels != 3 || vae.latent_channels == 0 || !ALIGN.is_multiple_of(2 * factor as u32) {
            return Err(bad_vae(format!(
                "in_channels {} and {} blocks (downsampling {factor}x): expected RGB input and a downsampling \
                 factor of at most {}, so that latents of {ALIGN}-pixel-aligned images cut into 2x2 patches",
                vae.in_channels,
                vae.block_out_channels.len(),
                ALIGN / 2
            )));
        }

        let text_config = root.join("text_encoder/config.json");
        let text_json = read_json(&text_config)?;
        let text: TextEncoderConfig =
            serde_json::from_value(text_json.clone()).map_err(|e| model_error(&text_config, e))?;
        if text.num_hidden_layers < 2 {
            return Err(model_error(
                &text_config,
                "num_hidden_layers must be at least 2: the captions are hidden_states[-2]",
            ));
        }
        let text_dir = root.join("text_encoder");
        let mut text_weights: Vec<PathBuf> = std::fs::read_dir(&text_dir)
            .map_err(|e| model_error(&text_dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("model") && n.ends_with(".safetensors"))
            })
            .collect();
        text_weights.sort();
        if text_weights.is_empty() {
            return Err(model_error(&text_dir, "no model*.safetensors"));
        }
        Ok(ModelFiles {
            vae,
            vae_json,
            vae_weights: existing(root.join("vae/diffusion_pytorch_model.safetensors"))?,
            text,
            text_json,
            text_weights,
            tokenizer: existing(root.join("tokenizer/tokenizer.json"))?,
        })
    }

    /// How many pixels one latent cell covers per side.
    pub fn downsample(&self) -> usize {
        downsample(&self.vae)
    }

    pub fn latent_channels(&self) -> usize {
        self.vae.latent_channels
    }

    /// The caption feature size: the text encoder's hidden size, which the transformer's `cap_feat_dim` must
    /// equal.
    pub fn cap_dim(&self) -> usize {
        self.text.hidden_size
    }

    /// What identifies the encoders in the cache settings: the configs as written, the tokenizer's hash and a
    /// fingerprint of every weight file (see [`fingerprint`]).
    pub fn identity(&self) -> Result<serde_json::Value, CacheError> {
        let weights = |files: &[PathBuf]| -> Result<serde_json::Map<String, serde_json::Value>, CacheError> {
            files
                .iter()
                .map(|f| {
                    let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    Ok((name, fingerprint(f).map_err(|e| model_error(f, e))?.into()))
                })
                .collect()
        };
        let tokenizer = std::fs::read(&self.tokenizer).map_err(|e| model_error(&self.tokenizer, e))?;
        Ok(serde_json::json!({
            "vae": { "config": self.vae_json, "weights": weights(std::slice::from_ref(&self.vae_weights))? },
            "text_encoder": {
                "config": self.text_json,
                "weights": weights(&self.text_weights)?,
                "tokenizer": format!("sha256:{}", hex::encode(Sha256::digest(&tokenizer))),
            },
        }))
    }
}

/// Each encoder block but the last halves the image.
fn downsample(cfg: &VaeConfig) -> usize {
    1 << cfg.block_out_channels.len().saturating_sub(1)
}

/// A digest of a weight file that is cheap on every run: its size, its whole safetensors header (every
/// tensor's name, dtype, shape and place) and 64 slices of 64 KiB spread over the data. Hashing all of a
/// 8 GB text encoder would cost a re-run with nothing to do tens of seconds; a different checkpoint of the
/// same architecture (a fine-tune changes nearly every tensor) is caught by the slices. Files up to 4 MiB are
/// hashed whole.
pub fn fingerprint(path: &Path) -> std::io::Result<String> {
    const SLICE: u64 = 1 << 16;
    const SLICES: u64 = 64;
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(size.to_le_bytes());
    let mut read = |file: &mut std::fs::File, at: u64, len: u64| -> std::io::Result<()> {
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut buf)?;
        hasher.update(&buf);
        Ok(())
    };
    if size <= SLICE * SLICES {
        read(&mut file, 0, size)?;
    } else {
        let mut len = [0u8; 8];
        file.read_exact(&mut len)?;
        read(&mut file, 0, (8 + u64::from_le_bytes(len)).min(size))?;
        for k in 0..SLICES {
            read(&mut file, k * (size - SLICE) / (SLICES - 1), SLICE)?;
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn load_weights<'a>(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'a>, CacheError> {
    // SAFETY: the files are mapped read-only for as long as the encoders are built from them; weights that
    // change under a running cache give a cache that the next run's fingerprints reject.
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|e| CacheError::Model {
        file: files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
        message: e.to_string(),
    })
}

/// The encoder half of the Z-Image VAE.
pub struct VaeEncoder {
    encoder: vae::Encoder,
    channels: usize,
    scaling_factor: f64,
    shift_factor: f64,
    device: Device,
}

impl VaeEncoder {
    pub fn load(files: &ModelFiles, device: &Device) -> Result<VaeEncoder, CacheError> {
        let vb = load_weights(std::slice::from_ref(&files.vae_weights), DType::F32, device)?;
        let encoder =
            vae::Encoder::new(&files.vae, vb.pp("encoder")).map_err(|e| model_error(&files.vae_weights, e))?;
        Ok(VaeEncoder {
            encoder,
            channels: files.vae.latent_channels,
            scaling_factor: files.vae.scaling_factor,
            shift_factor: files.vae.shift_factor,
            device: device.clone(),
        })
    }

    /// The normalised latent [C, H/f, W/f] of `pixels`: the mean, or with `noise` a sample whose standard
    /// normal draws are those of that key.
    pub fn encode(&self, pixels: &Pixels, noise: Option<Key>) -> candle_core::Result<Tensor> {
        let (h, w) = (pixels.height as usize, pixels.width as usize);
        let x = Tensor::from_slice(&pixels.data, (1, 3, h, w), &self.device)?;
        let moments = self.encoder.forward(&x)?;
        let mean = moments.narrow(1, 0, self.channels)?;
        let z = match noise {
            None => mean,
            Some(key) => {
                // diffusers' DiagonalGaussianDistribution clamps the log-variance the same way.
                let std = (moments.narrow(1, self.channels, self.channels)?.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
                let mut eps = vec![0f32; mean.elem_count()];
                rng::fill_normal_f32(key, &mut eps);
                (mean + std.mul(&Tensor::from_vec(eps, std.shape(), &self.device)?)?)?
            }
        };
        ((z - self.shift_factor)? * self.scaling_factor)?.squeeze(0)
    }
}

/// The decoder half of the Z-Image VAE.
pub struct VaeDecoder {
    decoder: vae::Decoder,
    scaling_factor: f64,
    shift_factor: f64,
}

impl VaeDecoder {
    pub fn load(files: &ModelFiles, device: &Device) -> Result<VaeDecoder, CacheError> {
        let vb = load_weights(std::slice::from_ref(&files.vae_weights), DType::F32, device)?;
        let decoder =
            vae::Decoder::new(&files.vae, vb.pp("decoder")).map_err(|e| model_error(&files.vae_weights, e))?;
        Ok(VaeDecoder { decoder, scaling_factor: files.vae.scaling_factor, shift_factor: files.vae.shift_factor })
    }

    /// The picture [3, H, W] in [-1, 1] of a normalised latent [C, H/f, W/f]: the encoder's normalisation undone
    /// (`z / scale + shift`), then decoded.
    pub fn decode(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        let z = ((latent.to_dtype(DType::F32)?.unsqueeze(0)? / self.scaling_factor)? + self.shift_factor)?;
        self.decoder.forward(&z)?.squeeze(0)
    }
}

/// A caption's features.
#[derive(Debug)]
pub struct Caption {
    /// [L, hidden] f32, one row per token.
    pub features: Tensor,
    /// The templated caption's length before truncation, when it was truncated.
    pub truncated_from: Option<usize>,
}

/// The Qwen3 text encoder with its tokenizer.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    model: ZImageTextEncoder,
    max_len: usize,
    device: Device,
}

impl TextEncoder {
    pub fn load(
        files: &ModelFiles,
        max_sequence_length: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<TextEncoder, CacheError> {
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| model_error(&files.tokenizer, e))?;
        let vb = load_weights(&files.text_weights, dtype, device)?;
        let model = ZImageTextEncoder::new(&files.text, vb).map_err(|e| CacheError::Model {
            file: files.text_weights.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "),
            message: e.to_string(),
        })?;
        Ok(TextEncoder { tokenizer, model, max_len: max_sequence_length, device: device.clone() })
    }

    /// The token ids of the templated caption, at most `max_sequence_length` of them, and how many there
    /// were before the cut.
    pub fn tokens(&self, caption: &str) -> candle_core::Result<(Vec<u32>, usize)> {
        let encoding = self.tokenizer.encode(templated(caption), true).map_err(candle_core::Error::msg)?;
        let ids = encoding.get_ids();
        Ok((ids[..ids.len().min(self.max_len)].to_vec(), ids.len()))
    }

    pub fn encode(&self, caption: &str) -> candle_core::Result<Caption> {
        let (ids, all) = self.tokens(caption)?;
        let hidden = self.model.forward(&Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?)?;
        Ok(Caption {
            features: hidden.squeeze(0)?.to_dtype(DType::F32)?,
            truncated_from: (all > ids.len()).then_some(all),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::toy::{ToyText, ToyVae, write_encoders};

    #[test]
    fn fingerprints_see_size_header_and_slices() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("w.safetensors");
        let fp = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            fingerprint(&path).unwrap()
        };
        // A small file is hashed whole.
        let small = fp(&[1, 2, 3]);
        assert_ne!(small, fp(&[1, 2, 4]));
        // A large one: its size, its header (16 bytes here) and the slices, which start at 0 and end at the end.
        let mut big = vec![0u8; 8 << 20];
        big[..8].copy_from_slice(&16u64.to_le_bytes());
        let base = fp(&big);
        for at in [20, big.len() - 1, (big.len() - (1 << 16)) / 63 * 5 + 7] {
            big[at] ^= 1;
            assert_ne!(fp(&big), base, "a change at {at}");
            big[at] ^= 1;
        }
        assert_ne!(fp(&big[..big.len() - 1]), base);
        // A byte between two slices is not seen: the fingerprint identifies checkpoints, it is no checksum.
        big[100_000] ^= 1;
        assert_eq!(fp(&big), base);
    }

    #[test]
    fn model_folders_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write_encoders(root, &ToyVae::default(), &ToyText::default(), &["a few words"], 0).unwrap();
        let files = ModelFiles::locate(root).unwrap();
        assert_eq!((files.latent_channels(), files.cap_dim(), files.downsample()), (16, 64, 8));
        let identity = files.identity().unwrap();
        assert_eq!(identity["vae"]["config"]["shift_factor"], 0.1159);
        assert!(identity["text_encoder"]["weights"]["model.safetensors"].as_str().unwrap().starts_with("sha256:"));

        let edit = |rel: &str, change: &dyn Fn(&mut serde_json::Value)| {
            let path = root.join(rel);
            let original = std::fs::read(&path).unwrap();
            let mut json: serde_json::Value = serde_json::from_slice(&original).unwrap();
            change(&mut json);
            std::fs::write(&path, json.to_string()).unwrap();
            let err = ModelFiles::locate(root).unwrap_err().to_string();
            std::fs::write(&path, original).unwrap();
            assert!(err.contains(rel), "{err}");
            err
        };
        let err = edit("vae/config.json", &|j| drop(j.as_object_mut().unwrap().remove("shift_factor")));
        assert!(err.contains("`shift_factor` is missing"), "{err}");
        let err = edit("vae/config.json", &|j| j["use_quant_conv"] = true.into());
        assert!(err.contains("use_quant_conv"), "{err}");
        let err = edit("vae/config.json", &|j| j["block_out_channels"] = serde_json::json!([8, 8, 8, 8, 8]));
        assert!(err.contains("downsampling 16x"), "{err}");
        let err = edit("text_encoder/config.json", &|j| j["num_hidden_layers"] = 1.into());
        assert!(err.contains("at least 2"), "{err}");
        std::fs::remove_file(root.join("tokenizer/tokenizer.json")).unwrap();
        let err = ModelFiles::locate(root).unwrap_err().to_string();
        assert!(err.ends_with("tokenizer/tokenizer.json: not found"), "{err}");
    }
}
