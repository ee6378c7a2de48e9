//! acrf's own CUDA kernels (`kernels.cu`, compiled into a fatbin by the build script) and the device settings
//! a training process wants.
//!
//! candle's CUDA backend runs every element-wise op as its own kernel, through strided kernels that divide
//! 64-bit indices per element and dimension, and has no fused attention: on an H200 a full-size Z-Image step
//! ran 9× slower than PyTorch's. The kernels here replace the hot chains of a block with one kernel each
//! (attention forward and backward without a materialised score matrix, RMSNorm with its adaLN scale and the
//! residual add, qk-norm with RoPE, SwiGLU) and write straight into buffers that become the ops' outputs.
//!
//! Every function returns `None` where it does not apply (a CPU tensor, an unsupported dtype or head size):
//! the caller then runs the composed candle ops, which stay the reference.
//!
//! The fatbin holds SASS for sm_80, sm_89 and sm_90 and PTX for compute_80. SASS loads on any driver of the
//! build's CUDA major version (minor-version compatibility); only the PTX, for other GPUs, needs a driver at
//! least as new as the nvcc that built it.

mod attention;
mod elementwise;
mod launch;

use candle_core::cuda_backend::WrapErr;
use candle_core::{Device, Result};
use cudarc::driver::sys::CUmemPool_attribute;

pub use attention::{AttentionForward, attention_backward, attention_forward};
pub use elementwise::{rms_norm, rms_norm_backward, rms_norm_rope, rms_norm_rope_backward, swiglu, swiglu_backward};
pub use launch::Fresh;

/// Prepares a CUDA device for training; nothing on a CPU.
///
/// - cudarc records two events per buffer and use so that buffers can be shared between streams safely; acrf
///   runs all work of a device on one stream (candle's per-thread default stream, from the one thread that
///   trains, NCCL's calls included), so the events only cost host time on each of the ~10⁴ launches of a step.
/// - The stream-ordered allocator hands memory back to the driver at every synchronisation by default (release
///   threshold 0), and every step synchronises: each step would allocate its working set from the driver
///   again. Keeping it pooled makes the second step's allocations free; the peak is unchanged.
pub fn prepare(device: &Device) -> Result<()> {
    let Device::Cuda(dev) = device else { return Ok(()) };
    // SAFETY: as above, no buffer of this device is used on another stream than the one that made it.
    unsafe { dev.disable_event_tracking() };
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().w()?;
    let mut pool = std::mem::MaybeUninit::uninit();
    let threshold: u64 = u64::MAX;
    // SAFETY: the pool handle is written by the driver before it is read; the attribute takes a u64.
    unsafe {
        cudarc::driver::sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device()).result().w()?;
        cudarc::driver::sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &threshold as *const u64 as *mut std::ffi::c_void,
        )
        .result()
        .w()?;
    }
    Ok(())
}

/// The GPU, driver and library versions, for `acrf doctor`.
pub fn describe(device: &Device) -> Result<Vec<(String, String)>> {
    let Device::Cuda(dev) = device else { return Ok(vec![]) };
    let ctx = dev.cuda_stream().context().clone();
    let (major, minor) = ctx.compute_capability().w()?;
    let (free, total) = ctx.mem_get_info().w()?;
    let mut driver = 0i32;
    // SAFETY: writes one int.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver).result().w()? };
    let mut rows = vec![
        ("GPU".to_string(), ctx.name().w()?),
        ("compute capability".into(), format!("{major}.{minor}")),
        ("memory".into(), format!("{:.1} GiB, {:.1} GiB free", gib(total), gib(free))),
        ("driver CUDA version".into(), cuda_version(driver)),
        ("fatbin".into(), "SASS sm_80, sm_89, sm_90; PTX compute_80".into()),
    ];
    let nccl =
        cudarc::nccl::result::get_nccl_version().map(|v| format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100));
    rows.push(("NCCL".into(), nccl.unwrap_or_else(|e| format!("not loadable ({e:?})"))));
    Ok(rows)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}
