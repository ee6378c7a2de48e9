//! How a value computed outside candle's graph enters it with a hand-written backward: the lean ops compute
//! their value without a graph (no intermediate kept) and attach a rule that returns only the gradients
//! training needs.

use std::sync::{Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::profile::{self, Site};

/// The backward of a value computed outside the graph from one input.
pub(crate) trait Grad1: Send + Sync + 'static {
    const NAME: &'static str;
    /// dL/dx from the input, the value and dL/dvalue, all detached.
    fn grad(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Tensor>;
}

/// The backward of a value computed outside the graph from three inputs.
pub(crate) trait Grad3: Send + Sync + 'static {
    const NAME: &'static str;
    /// The gradients of the inputs that `want` marks, from the inputs, the value and dL/dvalue, all detached;
    /// `None` for the others, which nothing reads.
    fn grads(&self, inputs: [&Tensor; 3], y: &Tensor, g: &Tensor, want: [bool; 3]) -> Result<[Option<Tensor>; 3]>;
}

/// The backward of a value computed outside the graph from two inputs.
pub(crate) trait Grad2: Send + Sync + 'static {
    const NAME: &'static str;
    /// The gradients of both inputs, from the inputs, the value and dL/dvalue, all detached.
    fn grads(&self, a: &Tensor, b: &Tensor, y: &Tensor, g: &Tensor) -> Result<[Tensor; 2]>;
}

/// A value computed outside the graph.
pub(crate) enum Value {
    /// A tensor made by other ops: entering the graph copies its buffer once, since a custom op must return
    /// storage of its own.
    Tensor(Tensor),
    /// A buffer that a CUDA kernel wrote for this value alone: it becomes the graph node's output as it is.
    #[cfg(feature = "cuda")]
    Fresh(crate::cuda::Fresh),
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}

impl Value {
    fn into_tensor(self) -> Tensor {
        match self {
            Value::Tensor(t) => t,
            #[cfg(feature = "cuda")]
            Value::Fresh(f) => f.tensor(),
        }
    }
}

/// A precomputed value entered into the graph as the output of a custom op whose backward is `R`.
///
/// The op takes the value out of its slot when candle runs the forward, so the graph keeps the op's output
/// alone rather than both. The backward sees detached tensors: ops on the inputs would otherwise record a
/// graph that keeps every temporary of the backward alive until the inputs' own gradients are consumed.
struct Attach<R> {
    value: Mutex<Option<Value>>,
    rule: R,
    /// The profiler's site where the value was made, whose time the backward is charged to.
    site: Option<Site>,
}

impl<R> Attach<R> {
    fn new(value: Value, rule: R) -> Result<Self> {
        // Storage clones copy the whole buffer and ignore the layout, so a copied value must begin its buffer.
        let value = match value {
            Value::Tensor(t) if !(t.is_contiguous() && t.layout().start_offset() == 0) => {
                Value::Tensor(t.force_contiguous()?)
            }
            v => v,
        };
        Ok(Attach { value: Mutex::new(Some(value)), rule, site: profile::current_site() })
    }

    fn take(&self, name: &str) -> Result<Value> {
        let value = self.value.lock().unwrap_or_else(PoisonError::into_inner).take();
        value.ok_or_else(|| candle_core::Error::Msg(format!("{name}: the forward ran twice")))
    }

    fn output<S: BackendStorage>(&self, name: &str, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
        match self.take(name)? {
            Value::Tensor(value) => copy_out(name, &value, pick),
            #[cfg(feature = "cuda")]
            Value::Fresh(_) => candle_core::bail!("{name}: a GPU value on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_output(&self, name: &str) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.take(name)? {
            Value::Tensor(value) => copy_out(name, &value, cuda_storage),
            Value::Fresh(f) => Ok(f.into_parts()),
        }
    }
}

/// A copy of `value`'s buffer, of the backend `pick` selects.
fn copy_out<S: BackendStorage>(name: &str, value: &Tensor, pick: fn(&Storage) -> Option<&S>) -> Result<(S, Shape)> {
    let (storage, layout) = value.storage_and_layout();
    let storage = pick(&storage)
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: the value is on another device than the op")))?;
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

fn cpu_storage(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_storage(s: &Storage) -> Option<&candle_core::CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

impl<R: Grad1> CustomOp1 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(R::NAME)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let _span = self.site.map(profile::span);
        Ok(Some(self.rule.grad(&x.detach(), &y.detach(), &g.detach())?))
    }
}

impl<R: Grad2> CustomOp2 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(R::NAME)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _span = self.site.map(profile::span);
        let [ga, gb] = self.rule.grads(&a.detach(), &b.detach(), &y.detach(), &g.detach())?;
        Ok((a.track_op().then_some(ga), b.track_op().then_some(gb)))
    }
}

impl<R: Grad3> CustomOp3 for Attach<R> {
    fn name(&self) -> &'static str {
        R::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output(R::NAME, cpu_storage)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output(R::NAME)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _span = self.site.map(profile::span);
        // candle would store a gradient for an untracked input too, where nothing reads it.
        let want = [a.track_op(), b.track_op(), c.track_op()];
        let [ga, gb, gc] = self.rule.grads([&a.detach(), &b.detach(), &c.detach()], &y.detach(), &g.detach(), want)?;
        Ok((ga, gb, gc))
    }
}

/// `value`, computed from `x` without a graph, with the backward `rule` towards `x`.
pub(crate) fn attach1<R: Grad1>(x: &Tensor, value: impl Into<Value>, rule: R) -> Result<Tensor> {
    let value = value.into();
    if !x.track_op() {
        return Ok(value.into_tensor());
    }
    x.apply_op1(Attach::new(value, rule)?)
}

/// `value`, computed from `a` and `b` without a graph, with the backward `rule` towards both.
pub(crate) fn attach2<R: Grad2>(a: &Tensor, b: &Tensor, value: impl Into<Value>, rule: R) -> Result<Tensor> {
    let value = value.into();
    if !(a.track_op() || b.track_op()) {
        return Ok(value.into_tensor());
    }
    a.apply_op2(b, Attach::new(value, rule)?)
}

/// `value`, computed from `a`, `b` and `c` without a graph, with the backward `rule` towards all three.
pub(crate) fn attach3<R: Grad3>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: impl Into<Value>,
    rule: R,
) -> Result<Tensor> {
    let value = value.into();
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value.into_tensor());
    }
    a.apply_op3(b, c, Attach::new(value, rule)?)
}
