//! The compute side of acrf: the Z-Image transformer with LoRA, the AC-RF losses, the cached data, the
//! optimizer and the collectives that one training rank needs.

pub mod batch;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod estimate;
pub mod flow;
mod kernels;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod optim;
pub mod run;
pub mod sample;
pub mod timing;
pub mod train;
pub static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
pub fn mark(what: &str) {
    use std::sync::atomic::Ordering;
    eprintln!(
        "MARK {what}: live {:.1} MiB peak-since-last {:.1} MiB",
        LIVE.load(Ordering::Relaxed) as f64 / 1048576.0,
        PEAK.load(Ordering::Relaxed) as f64 / 1048576.0
    );
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}
