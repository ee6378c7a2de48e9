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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Layout, Result, Shape, Storage, StorageRef, Tensor};
use cudarc::driver::sys::{CUfunction_attribute, CUmemPool_attribute};
use cudarc::driver::{CudaFunction, CudaModule, CudaView, DeviceRepr};
use cudarc::nvrtc::Ptx;

pub use attention::{AttentionForward, attention_backward, attention_forward};
pub use elementwise::{rms_norm, rms_norm_backward, rms_norm_rope, rms_norm_rope_backward, swiglu, swiglu_backward};

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/acrf_kernels.fatbin"));

/// Shared memory a block may use without opting in.
const DEFAULT_SHARED: u32 = 48 * 1024;

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

/// The loaded fatbin of each device, and the functions looked up in it.
#[derive(Default)]
struct Loaded {
    modules: HashMap<DeviceId, Arc<CudaModule>>,
    functions: HashMap<(DeviceId, &'static str), CudaFunction>,
}

fn loaded() -> &'static Mutex<Loaded> {
    static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
    LOADED.get_or_init(Mutex::default)
}

/// The kernel `name` on `dev`, allowed `shared` bytes of dynamic shared memory.
fn function(dev: &CudaDevice, name: &'static str, shared: u32) -> Result<CudaFunction> {
    let mut l = loaded().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(f) = l.functions.get(&(dev.id(), name)) {
        return Ok(f.clone());
    }
    let module = match l.modules.get(&dev.id()) {
        Some(m) => m.clone(),
        None => {
            let m = dev.cuda_stream().context().load_module(Ptx::from_binary(FATBIN.to_vec())).w()?;
            l.modules.insert(dev.id(), m.clone());
            m
        }
    };
    let f = module.load_function(name).w()?;
    if shared > DEFAULT_SHARED {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared as i32).w()?;
    }
    l.functions.insert((dev.id(), name), f.clone());
    Ok(f)
}

/// A tensor's CUDA storage and layout, if it is a contiguous CUDA tensor.
fn cuda_parts(t: &Tensor) -> Option<(StorageRef<'_>, Layout)> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    matches!(&*storage, Storage::Cuda(_)).then(|| (storage, layout.clone()))
}

/// The elements of a contiguous CUDA tensor held in `storage` with `layout`.
fn view<'a, T: CudaDType + DeviceRepr>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else { candle_core::bail!("acrf kernel: a tensor is not on the GPU") };
    let start = layout.start_offset();
    Ok(s.as_cuda_slice::<T>()?.slice(start..start + layout.shape().elem_count()))
}

/// A result computed into a buffer of its own: it becomes a tensor, or a graph node's output, without a copy.
pub struct Fresh {
    storage: CudaStorage,
    shape: Shape,
}

impl Fresh {
    fn new<T: CudaDType>(slice: cudarc::driver::CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Self {
        Fresh { storage: T::wrap_cuda_slice(slice, dev.clone()), shape: shape.into() }
    }

    /// As a tensor outside any graph.
    pub fn tensor(self) -> Tensor {
        Tensor::from_storage(Storage::Cuda(self.storage), self.shape, BackpropOp::none(), false)
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The buffer and its shape, for a custom op's `cuda_fwd`.
    pub fn into_parts(self) -> (CudaStorage, Shape) {
        (self.storage, self.shape)
    }
}

/// The CUDA device of `t`, if it is on one.
fn device_of(t: &Tensor) -> Option<&CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Some(d),
        _ => None,
    }
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
