//! Where the time of an optimizer step goes, measured with wall-clock laps at the boundaries of its phases.
//!
//! On a CPU every op has finished when it returns, so a lap is exact. A GPU runs ops asynchronously and a lap
//! would charge queued work to whichever phase happens to wait for it; a [`Stopwatch::synced`] one waits for
//! the device before every lap, which costs the overlap between phases and is therefore only for benchmarks.

use std::time::Instant;

use candle_core::{Device, Result};
use serde::{Deserialize, Serialize};

/// A part of an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Seconds spent in each [`Phase`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub forward: f64,
    pub recompute: f64,
    pub backward: f64,
    pub all_reduce: f64,
    pub optimizer: f64,
    pub other: f64,
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.forward + self.recompute + self.backward + self.all_reduce + self.optimizer + self.other
    }

    /// The phase-wise sum of two.
    pub fn add(&self, o: &PhaseTimes) -> PhaseTimes {
        PhaseTimes {
            forward: self.forward + o.forward,
            recompute: self.recompute + o.recompute,
            backward: self.backward + o.backward,
            all_reduce: self.all_reduce + o.all_reduce,
            optimizer: self.optimizer + o.optimizer,
            other: self.other + o.other,
        }
    }

    /// Every phase times `k`.
    pub fn scale(&self, k: f64) -> PhaseTimes {
        PhaseTimes {
            forward: self.forward * k,
            recompute: self.recompute * k,
            backward: self.backward * k,
            all_reduce: self.all_reduce * k,
            optimizer: self.optimizer * k,
            other: self.other * k,
        }
    }

    fn slot(&mut self, phase: Phase) -> &mut f64 {
        match phase {
            Phase::Forward => &mut self.forward,
            Phase::Recompute => &mut self.recompute,
            Phase::Backward => &mut self.backward,
            Phase::AllReduce => &mut self.all_reduce,
            Phase::Optimizer => &mut self.optimizer,
            Phase::Other => &mut self.other,
        }
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
        *self.times.slot(phase) += (now - self.last).as_secs_f64();
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
