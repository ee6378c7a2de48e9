//! Loading acrf's fatbin, looking up its kernels, and handing tensors to them and results back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Layout, Result, Shape, Storage, StorageRef, Tensor};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaModule, CudaView, DeviceRepr};
use cudarc::nvrtc::Ptx;

static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/acrf_kernels.fatbin"));

/// Shared memory a block may use without opting in.
const DEFAULT_SHARED: u32 = 48 * 1024;

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
pub(crate) fn function(dev: &CudaDevice, name: &'static str, shared: u32) -> Result<CudaFunction> {
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
pub(crate) fn cuda_parts(t: &Tensor) -> Option<(StorageRef<'_>, Layout)> {
    if !t.is_contiguous() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    matches!(&*storage, Storage::Cuda(_)).then(|| (storage, layout.clone()))
}

/// The elements of a contiguous CUDA tensor held in `storage` with `layout`.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(storage: &'a Storage, layout: &Layout) -> Result<CudaView<'a, T>> {
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
    pub(crate) fn new<T: CudaDType>(
        slice: cudarc::driver::CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<Shape>,
    ) -> Self {
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
pub(crate) fn device_of(t: &Tensor) -> Option<&CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Some(d),
        _ => None,
    }
}
