//! `acrf cache`: a folder of images and captions in, the cached dataset of [`crate::data`] out, with
//! Z-Image's official conditioning.
//!
//! - [`discover`]: which images there are and which caption file belongs to each;
//! - [`bucket`]: aspect-ratio buckets, and decoding, resizing and cropping into them;
//! - [`encode`]: the VAE and the Qwen3 text encoder of a diffusers Z-Image folder;
//! - [`pipeline`]: the run itself: incremental, decoding on a thread pool while the encoders run, shardable
//!   over processes, reporting every image it could not use;
//! - [`toy`]: tiny random encoders and a tokenizer in the same folder layout, for the demo and the tests.

pub mod bucket;
pub mod discover;
pub mod encode;
pub mod pipeline;
pub mod toy;

use acrf_common::store::StoreError;

use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {message}")]
    Images { path: String, message: String },
    #[error("{file}: {message}")]
    Model { file: String, message: String },
    #[error("{0}")]
    Options(String),
    #[error("{item}: encoding failed: {message}")]
    Encode { item: String, message: String },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
