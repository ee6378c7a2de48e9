//! Tiny random Z-Image encoders and a word-level tokenizer, written in the layout of a diffusers Z-Image
//! folder (`vae/`, `text_encoder/`, `tokenizer/`): what the demo and the tests cache with, since the real
//! encoders are an 8 GB download. The tensor names and shapes come from candle's own modules, so the files
//! are exactly what the loaders of [`super::encode`] ask for; the values are deterministic in the seed.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::z_image::text_encoder::{TextEncoderConfig, ZImageTextEncoder};
use candle_transformers::models::z_image::vae::{AutoEncoderKL, VaeConfig};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, Tokenizer};

use super::CacheError;
use crate::model::random_tensors;

const UNK: &str = "<unk>";
/// The tokens of the chat template, which a real Qwen tokenizer has too.
const TEMPLATE_TOKENS: [&str; 4] = ["<|im_start|>", "<|im_end|>", "user", "assistant"];

/// A small diffusers AutoencoderKL.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyVae {
    /// One entry per encoder block; all but the last halve the image.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    /// Must divide every entry of `block_out_channels`.
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl Default for ToyVae {
    /// Z-Image's 8x downsampling and 16 latent channels, at a few thousandths of its width.
    fn default() -> Self {
        ToyVae {
            block_out_channels: vec![8, 8, 16, 16],
            layers_per_block: 1,
            latent_channels: 16,
            norm_num_groups: 4,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }
}

/// A small Qwen3 text encoder; its `hidden_size` is the caption feature size.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyText {
    pub hidden_size: usize,
    /// At least 2: the captions are `hidden_states[-2]`.
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
}

impl Default for ToyText {
    fn default() -> Self {
        ToyText {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            intermediate_size: 128,
        }
    }
}

fn io(path: &Path, e: impl ToString) -> CacheError {
    CacheError::Model { file: path.display().to_string(), message: e.to_string() }
}

/// The names and shapes of the variables a module asks for when built on `VarBuilder`.
fn shapes_of(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> candle_core::Result<Vec<(String, Vec<usize>)>> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let vars = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let sorted: BTreeMap<String, Vec<usize>> =
        vars.iter().map(|(name, var)| (name.clone(), var.dims().to_vec())).collect();
    Ok(sorted.into_iter().collect())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), CacheError> {
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).map_err(|e| io(path, e))?;
    std::fs::write(path, serde_json::to_string_pretty(value).expect("plain JSON")).map_err(|e| io(path, e))
}

fn save(path: &Path, tensors: BTreeMap<String, Tensor>) -> Result<(), CacheError> {
    candle_core::safetensors::save(&tensors.into_iter().collect(), path).map_err(|e| io(path, e))
}

/// Writes `root/vae/{config.json, diffusion_pytorch_model.safetensors}`: encoder and decoder, as diffusers
/// saves an AutoencoderKL.
fn write_vae(root: &Path, spec: &ToyVae, seed: u64) -> Result<(), CacheError> {
    let blocks = spec.block_out_channels.len();
    let config = serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": spec.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks],
        "force_upcast": true,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": spec.latent_channels,
        "layers_per_block": spec.layers_per_block,
        "mid_block_add_attention": true,
        "norm_num_groups": spec.norm_num_groups,
        "scaling_factor": spec.scaling_factor,
        "shift_factor": spec.shift_factor,
        "use_quant_conv": false,
        "use_post_quant_conv": false,
    });
    let path = root.join("vae/config.json");
    write_json(&path, &config)?;
    let cfg: VaeConfig = serde_json::from_value(config).map_err(|e| io(&path, e))?;
    let shapes = shapes_of(|vb| AutoEncoderKL::new(&cfg, vb).map(drop)).map_err(|e| io(&path, e))?;
    let weights = root.join("vae/diffusion_pytorch_model.safetensors");
    save(&weights, random_tensors(shapes, seed).map_err(|e| io(&weights, e))?)
}

/// Writes `root/text_encoder/{config.json, model.safetensors}`, a Qwen3 checkpoint (keys under `model.`, the
/// final norm included though the captions never pass it) for a vocabulary of `vocab_size`.
fn write_text_encoder(root: &Path, spec: &ToyText, vocab_size: usize, seed: u64) -> Result<(), CacheError> {
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "attention_bias": false,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    let path = root.join("text_encoder/config.json");
    write_json(&path, &config)?;
    let cfg: TextEncoderConfig = serde_json::from_value(config).map_err(|e| io(&path, e))?;
    let mut shapes = shapes_of(|vb| ZImageTextEncoder::new(&cfg, vb).map(drop)).map_err(|e| io(&path, e))?;
    shapes.push(("model.norm.weight".into(), vec![spec.hidden_size]));
    let weights = root.join("text_encoder/model.safetensors");
    save(&weights, random_tensors(shapes, seed).map_err(|e| io(&weights, e))?)
}

/// Writes `root/tokenizer/tokenizer.json`: one token per whitespace-separated word of `texts`, the chat
/// template's tokens and an unknown token. Returns the vocabulary size.
fn write_tokenizer(root: &Path, texts: &[&str]) -> Result<usize, CacheError> {
    let path = root.join("tokenizer/tokenizer.json");
    let mut words: Vec<&str> = texts.iter().flat_map(|t| t.split_whitespace()).collect();
    words.sort_unstable();
    words.dedup();
    words.retain(|w| *w != UNK && !TEMPLATE_TOKENS.contains(w));
    let vocab = [UNK].into_iter().chain(TEMPLATE_TOKENS).chain(words);
    let vocab: Vec<(String, u32)> = vocab.enumerate().map(|(i, w)| (w.to_string(), i as u32)).collect();
    let size = vocab.len();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(UNK.into())
        .build()
        .map_err(|e| io(&path, e))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
    let special: Vec<AddedToken> = TEMPLATE_TOKENS[..2].iter().map(|t| AddedToken::from(*t, true)).collect();
    tokenizer.add_special_tokens(special).map_err(|e| io(&path, e))?;
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).map_err(|e| io(&path, e))?;
    tokenizer.save(&path, true).map_err(|e| io(&path, e))?;
    Ok(size)
}

/// The three encoder folders of a Z-Image pipeline under `root`, with a tokenizer that knows the words of
/// `texts`.
pub fn write_encoders(root: &Path, vae: &ToyVae, text: &ToyText, texts: &[&str], seed: u64) -> Result<(), CacheError> {
    write_vae(root, vae, seed)?;
    let vocab_size = write_tokenizer(root, texts)?;
    write_text_encoder(root, text, vocab_size, seed.wrapping_add(1))
}
