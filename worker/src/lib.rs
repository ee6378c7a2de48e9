//! The compute side of acrf: the Z-Image transformer with LoRA, the AC-RF losses, the cached data and the
//! encoding that makes it, the optimizer and the collectives that one training rank needs.

pub mod adapters;
pub mod batch;
pub mod cache;
pub mod checkpoint;
pub mod collective;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod doctor;
pub mod drift;
pub mod estimate;
pub mod eval;
pub mod flow;
mod kernels;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod preservation;
pub mod profile;
pub mod run;
pub mod sample;
pub mod timing;
pub mod train;
