//! The collective's interface, apart from its implementations so that they and `connect` depend on it and
//! not on each other.

use candle_core::{Result, Tensor};

pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum of `t` over all ranks; every rank gets the same result.
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank.
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor>;
}

/// Breaks a group's collective from another thread, e.g. the worker's network side when the coordinator
/// reports a lost peer while the trainer is blocked in a collective: the trainer's call fails instead of
/// waiting for the dead peer, and the group can be formed again.
pub trait Abort: Send + Sync {
    fn abort(&self);
    /// Whether the collective broke (a peer failed, or an abort), as opposed to a failure of the job itself.
    fn is_broken(&self) -> bool;
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
