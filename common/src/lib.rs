//! What the coordinator and the workers must agree on, bit for bit: the config schema, the AC-RF anchor
//! schedule and slot plan, the Min-SNR weight, the wire protocol and the checkpoint manifest and store.

pub mod checkpoint;
pub mod config;
pub mod plan;
pub mod protocol;
pub mod rng;
pub mod schedule;
pub mod snr;
pub mod store;
