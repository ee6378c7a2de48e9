//! A collective between GPU ranks over NCCL, on the device memory and the CUDA stream the trainer already
//! uses: NCCL's kernels queue behind the backward that produced the gradient, so nothing waits for the GPU
//! before a call.
//!
//! The TCP ring the group forms first stays its control path. It carries NCCL's unique id from rank 0 to the
//! others, so the coordinator needs no CUDA; it carries host tensors (such as the trainer's start header);
//! and breaking it is how the group is aborted.
//!
//! An abort must reach a rank that waits on the GPU for a peer that died: only `ncclCommAbort`, called from
//! another thread, makes NCCL's kernels give up. cudarc's safe `Comm` cannot do that: it hides the raw
//! handle, aborts only when dropped by its owner, and is `!Send`. The communicator is therefore held here, on
//! cudarc's `result` layer, behind a lock shared with [`NcclAbort`].
//!
//! Calls are issued from the thread that runs the trainer. candle's CUDA device uses the per-thread default
//! stream, so a call issued from that thread queues behind that thread's kernels. A call from any other
//! thread would not.

use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, DeviceLocation, Storage, Tensor};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
use cudarc::nccl::{result, sys};
use tracing::warn;

use super::api::{Abort, Collective};
use super::ring::{Ring, RingAbort};

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("{op} failed: {code:?}")]
    Call { op: &'static str, code: sys::ncclResult_t },
    #[error("the group was aborted (a peer failed, or this rank gave up)")]
    Aborted,
    #[error("NCCL sums tensors on this rank's GPU, got one on {0:?}")]
    Device(DeviceLocation),
    #[error("NCCL here carries f32 and f64 tensors, got {0:?}")]
    DType(DType),
}

impl From<NcclError> for candle_core::Error {
    fn from(e: NcclError) -> Self {
        candle_core::Error::msg(format!("NCCL collective: {e}"))
    }
}

/// The raw communicator. NCCL lets any thread use a communicator as long as the calls on it are serialised,
/// which the lock in [`Comm`] does.
struct RawComm(sys::ncclComm_t);

// SAFETY: see `RawComm`; the pointer is only used under `Comm`'s lock.
unsafe impl Send for RawComm {}

/// The communicator shared by the collective and its abort handles; `None` once aborted, so it is freed
/// exactly once and never used afterwards.
struct Comm(Mutex<Option<RawComm>>);

impl Comm {
    /// Runs `call` on the live communicator. The lock is held for the call only (NCCL enqueues the work and
    /// returns), never while the GPU runs it, so an abort can always come in while the trainer waits.
    fn call(
        &self,
        op: &'static str,
        call: impl FnOnce(sys::ncclComm_t) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<(), NcclError> {
        let comm = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let comm = comm.as_ref().ok_or(NcclError::Aborted)?;
        call(comm.0).map(drop).map_err(|e| NcclError::Call { op, code: e.0 })
    }

    fn abort(&self) {
        if let Some(RawComm(comm)) = self.0.lock().unwrap_or_else(PoisonError::into_inner).take() {
            // SAFETY: the communicator came from `ncclCommInitRank` and, taken out of the lock, is never used
            // again.
            if let Err(e) = unsafe { result::comm_abort(comm) } {
                warn!("ncclCommAbort failed: {:?}", e.0);
            }
        }
    }
}

/// Aborts the ring, then the communicator. In that order, a trainer whose GPU wait the communicator's abort
/// ends finds the ring broken when it checks, and discards what the cut-short kernels left behind.
#[derive(Clone)]
pub struct NcclAbort {
    ring: RingAbort,
    comm: Arc<Comm>,
}

impl Abort for NcclAbort {
    fn abort(&self) {
        self.ring.abort();
        self.comm.abort();
    }

    fn is_broken(&self) -> bool {
        self.ring.is_broken()
    }
}

pub struct Nccl {
    ring: Ring,
    device: Device,
    abort: NcclAbort,
}

#[derive(Clone, Copy)]
enum Op {
    Sum,
    Broadcast { root: usize },
}

impl Nccl {
    /// Forms the communicator of `ring`'s group, with this rank on `device`. Every rank calls this once the
    /// ring is formed.
    ///
    /// An abort breaks the exchange of the id, but not `ncclCommInitRank` itself; NCCL's bootstrap fails on
    /// its own when a peer's connection drops.
    pub fn connect(mut ring: Ring, device: &Device) -> candle_core::Result<Nccl> {
        let stream = device.as_cuda_device()?.cuda_stream();
        let id = share_id(&mut ring)?;
        // NCCL takes its GPU from the calling thread's current context.
        stream.context().bind_to_thread().map_err(candle_core::Error::wrap)?;
        let (rank, world) = (ring.rank() as c_int, ring.world_size() as c_int);
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful call, and only read after one.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world, id, rank)
                .map_err(|e| NcclError::Call { op: "ncclCommInitRank", code: e.0 })?;
            comm.assume_init()
        };
        let abort = NcclAbort { ring: ring.abort_handle(), comm: Arc::new(Comm(Mutex::new(Some(RawComm(comm))))) };
        Ok(Nccl { ring, device: device.clone(), abort })
    }

    pub fn abort_handle(&self) -> NcclAbort {
        self.abort.clone()
    }

    fn intact(&self) -> Result<(), NcclError> {
        if self.abort.is_broken() { Err(NcclError::Aborted) } else { Ok(()) }
    }

    /// Runs `op` from `t` into a fresh buffer and waits for it. The wait lets an abort (after which NCCL's
    /// kernels return early with partial data) fail the call before anything uses the result, as a failure
    /// of the ring does; it costs nothing, since the trainer reads the reduced statistics back right after.
    fn run(&self, t: &Tensor, op: Op) -> candle_core::Result<Tensor> {
        match t.dtype() {
            DType::F32 => self.run_typed::<f32>(t, op, sys::ncclDataType_t::ncclFloat32),
            // The trainer's exact sums: NCCL adds f64 natively, in a fixed order per world size.
            DType::F64 => self.run_typed::<f64>(t, op, sys::ncclDataType_t::ncclFloat64),
            other => Err(NcclError::DType(other).into()),
        }
    }

    fn run_typed<T: CudaDType + DeviceRepr>(
        &self,
        t: &Tensor,
        op: Op,
        dtype: sys::ncclDataType_t,
    ) -> candle_core::Result<Tensor> {
        self.intact()?;
        let t = t.contiguous()?;
        let n = t.elem_count();
        let cuda = self.device.as_cuda_device()?;
        let stream = cuda.cuda_stream();
        let out = {
            let (storage, layout) = t.storage_and_layout();
            let (Storage::Cuda(storage), true) = (&*storage, t.device().same_device(&self.device)) else {
                return Err(NcclError::Device(t.device().location()).into());
            };
            let start = layout.start_offset();
            let input = storage.as_cuda_slice::<T>()?.slice(start..start + n);
            // SAFETY: NCCL writes every element before the tensor is built from it.
            let mut out = unsafe { cuda.alloc::<T>(n) }?;
            let called = {
                let (src, _src_used) = input.device_ptr(&stream);
                let (dst, _dst_used) = out.device_ptr_mut(&stream);
                let (src, dst, s) = (src as *const _, dst as *mut _, stream.cu_stream() as sys::cudaStream_t);
                match op {
                    // SAFETY: both buffers hold `n` elements of `dtype` on this rank's GPU and outlive the work
                    // queued on the stream, which `_src_used` and `_dst_used` record.
                    Op::Sum => self.abort.comm.call("ncclAllReduce", |comm| unsafe {
                        result::all_reduce(src, dst, n, dtype, sys::ncclRedOp_t::ncclSum, comm, s)
                    }),
                    // SAFETY: as above.
                    Op::Broadcast { root } => self.abort.comm.call("ncclBroadcast", |comm| unsafe {
                        result::broadcast(src, dst, n, dtype, root as c_int, comm, s)
                    }),
                }
            };
            if let Err(e) = called {
                // The peers wait in the same collective; breaking the group lets the coordinator re-form it.
                self.abort.abort();
                return Err(e.into());
            }
            out
        };
        self.device.synchronize()?;
        self.intact()?;
        let out = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cuda.clone()));
        Ok(Tensor::from_storage(out, t.shape(), BackpropOp::none(), false))
    }
}

/// Rank 0 draws the id and the ring carries it to the other ranks, one float per byte (exact for 0 to 255).
fn share_id(ring: &mut Ring) -> candle_core::Result<sys::ncclUniqueId> {
    let mut floats = vec![0f32; 128];
    if ring.rank() == 0 {
        let id = result::get_uniqueid().map_err(|e| NcclError::Call { op: "ncclGetUniqueId", code: e.0 })?;
        floats = id.internal.iter().map(|&b| b as u8 as f32).collect();
    }
    ring.broadcast(&mut floats, 0)?;
    Ok(sys::ncclUniqueId { internal: std::array::from_fn(|i| floats[i] as u8 as _) })
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
        if t.device().is_cuda() { self.run(t, Op::Sum) } else { self.ring.all_reduce_sum(t) }
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        if t.device().is_cuda() {
            self.run(t, Op::Broadcast { root })
        } else {
            Collective::broadcast(&mut self.ring, t, root)
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.abort.abort();
    }
}
