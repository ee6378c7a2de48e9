//! Collectives between the ranks of one data-parallel group, behind one small trait: the trainer sums its
//! flat LoRA gradient and its step metrics across ranks, and takes rank 0's initial LoRA, without knowing
//! whether the ranks are one process, CPU processes on a TCP ring, or GPUs on NCCL. [`connect`] chooses and
//! forms the one a rank uses.

mod api;
pub mod flat;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;

use std::sync::{Arc, Mutex, PoisonError};

use acrf_common::config::Collective as Choice;
use candle_core::Device;

pub use api::{Abort, Collective, Local};
use ring::{Ring, RingConfig, RingError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The job's `distributed.collective` cannot carry this group: a failure of the job, not of a peer.
    #[error("{0}")]
    Choice(String),
    #[error("forming the ring: {}", .0.full_message())]
    Ring(RingError),
    #[error("forming the NCCL communicator: {0}")]
    Nccl(candle_core::Error),
    /// The caller gave up (its `cancel` flag) while the ring formed.
    #[error("cancelled while forming the ring")]
    Cancelled,
}

impl ConnectError {
    /// Whether a peer (or the network between the ranks) failed, which a new formation of the group may
    /// not repeat, as opposed to a setting that no formation can satisfy.
    pub fn is_peer_lost(&self) -> bool {
        matches!(self, ConnectError::Ring(_) | ConnectError::Nccl(_))
    }
}

/// A rank's formed collective, and the handle that breaks it from another thread (none for one rank).
pub struct Connected {
    pub collective: Box<dyn Collective>,
    pub abort: Option<Arc<dyn Abort>>,
}

/// What carries a rank's collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Local,
    Ring,
    Nccl,
}

/// `distributed.collective` resolved for this rank's device and the group's size. Every rank decides on its
/// own, so a group that mixes CPU and GPU ranks under `auto` fails at its first collective, where the ring
/// names the mismatch; such a group sets `ring`.
fn transport(choice: Choice, cuda: bool, world: usize) -> Result<Transport, ConnectError> {
    Ok(match (choice, cuda, world) {
        (Choice::Nccl, false, _) => {
            return Err(ConnectError::Choice(
                "distributed.collective = \"nccl\" needs a CUDA device, and this worker runs on the CPU".into(),
            ));
        }
        (_, _, 1) => Transport::Local,
        (Choice::Local, _, n) => {
            return Err(ConnectError::Choice(format!(
                "distributed.collective = \"local\" trains on one worker, the group has {n}"
            )));
        }
        (Choice::Ring, ..) | (Choice::Auto, false, _) => Transport::Ring,
        (Choice::Nccl | Choice::Auto, true, _) => Transport::Nccl,
    })
}

/// Forms the collective `choice` selects for the rank of `ring` on `device`: nothing for one rank, the TCP
/// ring, or NCCL on top of the ring between GPUs. `abort` holds the current abort handle from the moment
/// the ring exists, so that another thread can break a rank still waiting for NCCL's peers.
pub fn connect(
    choice: Choice,
    device: &Device,
    ring: RingConfig,
    abort: &Mutex<Option<Arc<dyn Abort>>>,
) -> Result<Connected, ConnectError> {
    let transport = transport(choice, device.is_cuda(), ring.world)?;
    if transport == Transport::Local {
        return Ok(Connected { collective: Box::new(Local), abort: None });
    }
    let cancel = ring.cancel.clone();
    let formed = Ring::connect(ring);
    if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ConnectError::Cancelled);
    }
    let ring = formed.map_err(ConnectError::Ring)?;
    let handle: Arc<dyn Abort> = Arc::new(ring.abort_handle());
    *abort.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle.clone());
    if transport == Transport::Ring {
        return Ok(Connected { collective: Box::new(ring), abort: Some(handle) });
    }
    let (collective, handle) = nccl(ring, device).map_err(ConnectError::Nccl)?;
    *abort.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle.clone());
    Ok(Connected { collective, abort: Some(handle) })
}

/// NCCL over the formed `ring`, with its abort handle.
#[cfg(feature = "cuda")]
fn nccl(ring: Ring, device: &Device) -> candle_core::Result<(Box<dyn Collective>, Arc<dyn Abort>)> {
    let nccl = nccl::Nccl::connect(ring, device)?;
    let handle: Arc<dyn Abort> = Arc::new(nccl.abort_handle());
    Ok((Box::new(nccl), handle))
}

/// Only a CUDA device selects NCCL, and a build without CUDA has none.
#[cfg(not(feature = "cuda"))]
fn nccl(_: Ring, _: &Device) -> candle_core::Result<(Box<dyn Collective>, Arc<dyn Abort>)> {
    candle_core::bail!("this acrf was built without CUDA support (cargo feature `cuda`)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Choice as C;

    #[test]
    fn auto_takes_nccl_between_gpus_and_the_ring_between_cpus() {
        assert_eq!(transport(C::Auto, true, 4).unwrap(), Transport::Nccl);
        assert_eq!(transport(C::Auto, false, 4).unwrap(), Transport::Ring);
        assert_eq!(transport(C::Ring, true, 4).unwrap(), Transport::Ring);
        assert_eq!(transport(C::Nccl, true, 2).unwrap(), Transport::Nccl);
    }

    #[test]
    fn one_rank_needs_no_collective() {
        for (choice, cuda) in [(C::Auto, false), (C::Auto, true), (C::Ring, false), (C::Local, false), (C::Nccl, true)]
        {
            assert_eq!(transport(choice, cuda, 1).unwrap(), Transport::Local, "{choice:?} cuda={cuda}");
        }
    }

    #[test]
    fn nccl_on_a_cpu_and_local_in_a_group_are_errors() {
        for world in [1, 3] {
            let e = transport(C::Nccl, false, world).unwrap_err().to_string();
            assert!(e.contains("needs a CUDA device"), "{e}");
        }
        let e = transport(C::Local, false, 3).unwrap_err().to_string();
        assert!(e.contains("one worker, the group has 3"), "{e}");
    }
}
