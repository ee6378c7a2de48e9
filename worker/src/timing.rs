//! Where the time of an optimizer step goes, measured with wall-clock laps at the boundaries of its phases.
//!
//! On a CPU every op has finished when it returns, so a lap is exact. A GPU runs ops asynchronously and a lap
//! would charge queued work to whichever phase happens to wait for it; a [`Stopwatch::synced`] one waits for
//! the device before every lap, which costs the overlap between phases and is therefore only for benchmarks.

use std::time::Instant;

pub use acrf_common::protocol::PhaseTimes;
use candle_core::{Device, Result};

/// A part of an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Phase {
    /// Forward passes and the loss; without a graph when checkpointing.
    Forward,
    /// The forward passes that checkpointing repeats, block by block, to rebuild each block's graph.
    Recompute,
    /// Backpropagation, including the accumulation of micro-batch gradients.
    Backward,
    /// The gradient and statistics all-reduce across ranks.
    AllReduce,
    /// Clipping and AdamW.
    Optimizer,
    /// Everything else: loading items and building micro-batches.
    Other,
}

/// The field of `times` that `phase` is charged to.
fn slot(times: &mut PhaseTimes, phase: Phase) -> &mut f64 {
    match phase {
        Phase::Forward => &mut times.forward,
        Phase::Recompute => &mut times.recompute,
        Phase::Backward => &mut times.backward,
        Phase::AllReduce => &mut times.all_reduce,
        Phase::Optimizer => &mut times.optimizer,
        Phase::Other => &mut times.other,
    }
}

/// Charges the wall time between consecutive laps to the phase each lap names.
pub struct Stopwatch {
    last: Instant,
    times: PhaseTimes,
    /// The device to wait for before each lap, if any.
    sync: Option<Device>,
}

impl Default for Stopwatch {
    fn default() -> Self {
        Stopwatch::new()
    }
}

impl Stopwatch {
    /// Laps without waiting for any device: free, and exact on a CPU.
    pub fn new() -> Self {
        Stopwatch { last: Instant::now(), times: PhaseTimes::default(), sync: None }
    }

    /// Laps that first wait for `device` to finish its queued work.
    pub fn synced(device: &Device) -> Self {
        Stopwatch { sync: Some(device.clone()), ..Stopwatch::new() }
    }

    /// Charges the time since the previous lap (or since the start) to `phase`.
    pub fn lap(&mut self, phase: Phase) -> Result<()> {
        self.wait()?;
        let now = Instant::now();
        *slot(&mut self.times, phase) += (now - self.last).as_secs_f64();
        self.last = now;
        Ok(())
    }

    pub fn times(&self) -> PhaseTimes {
        self.times
    }

    /// candle's CPU synchronize returns at once, so a synced stopwatch times a CPU exactly as a plain one.
    fn wait(&self) -> Result<()> {
        match &self.sync {
            Some(device) => device.synchronize(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_charge_their_phase_and_sum_to_the_elapsed_time() -> Result<()> {
        let started = Instant::now();
        let mut watch = Stopwatch::synced(&Device::Cpu);
        std::thread::sleep(std::time::Duration::from_millis(20));
        watch.lap(Phase::Backward)?;
        watch.lap(Phase::Optimizer)?;
        let t = watch.times();
        assert!(t.backward >= 0.02 && t.forward == 0.0, "{t:?}");
        assert!(t.total() <= started.elapsed().as_secs_f64());
        Ok(())
    }
}
