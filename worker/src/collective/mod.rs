//! Collectives between the ranks of one data-parallel group, behind one small trait: the trainer sums its
//! flat LoRA gradient and its step metrics across ranks, and takes rank 0's initial LoRA, without knowing
//! whether the ranks are one process, CPU processes on a TCP ring, or GPUs on NCCL.

pub mod ring;

use candle_core::{Result, Tensor};

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `t` over all ranks; every rank gets the same result.
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank.
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// One rank: every collective is the identity.
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast(&mut self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
}
