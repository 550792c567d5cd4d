//! `Tensor`: a cheap handle (`Arc`) over shared storage plus a layout. Cloning a tensor or taking
//! a view never copies data. A tensor that depends on a variable also records the op that made it,
//! which is all reverse-mode autograd needs (see `backprop`).

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard};

use half::{bf16, f16};
use whale_kernels::cpu::attention::RowLayout;
use whale_kernels::cpu::fp8::Fp8Format;

use crate::backprop::{self, BackwardOp, GradInfo, VarKind};
use crate::layout::Layout;
use crate::rng::Rng;
use crate::storage::{CpuStorage, SharedStorage, Storage};
use crate::{DType, Device, Error, Result};

/// A unique id per tensor handle, the key of gradient maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl TensorId {
    fn next() -> Self {
        TensorId(NEXT_ID.fetch_add(1, Ordering::Relaxed))
    }

    /// An id below every id handed out after this call: the tensors a computation makes from
    /// here on are the ones at or above it.
    pub(crate) fn watermark() -> Self {
        TensorId(NEXT_ID.load(Ordering::Relaxed))
    }
}

pub(crate) struct Inner {
    pub(crate) id: TensorId,
    pub(crate) storage: Arc<SharedStorage>,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    pub(crate) grad: GradInfo,
}

#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor[{:?}, {:?}, {:?}", self.dims(), self.dtype(), self.device())?;
        match &self.0.grad {
            GradInfo::None => {}
            GradInfo::Leaf { kind, .. } => write!(f, ", {kind:?} variable")?,
            GradInfo::Node { op, .. } => write!(f, ", grad_fn={}", op.name())?,
        }
        write!(f, "]")
    }
}

/// Element types that can be moved in and out of tensors.
pub trait WithDType: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    fn from_storage(s: &CpuStorage, layout: &Layout) -> Option<Vec<Self>>;
}

macro_rules! with_dtype {
    ($t:ty, $variant:ident) => {
        impl WithDType for $t {
            const DTYPE: DType = DType::$variant;
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn from_storage(s: &CpuStorage, layout: &Layout) -> Option<Vec<Self>> {
                match s {
                    CpuStorage::$variant(v) => Some(layout.gather(v)),
                    _ => None,
                }
            }
        }
    };
}
with_dtype!(f32, F32);
with_dtype!(bf16, BF16);
with_dtype!(f16, F16);
with_dtype!(u32, U32);
with_dtype!(i64, I64);

/// Read access to a tensor's values as a contiguous f32 slice: borrowed when the tensor already is
/// contiguous f32, converted/gathered into an owned buffer otherwise.
pub(crate) enum F32Data<'a> {
    Borrowed(RwLockReadGuard<'a, Storage>, usize, usize),
    Owned(Vec<f32>),
}

impl Deref for F32Data<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Borrowed(guard, start, len) => match &**guard {
                Storage::Cpu(CpuStorage::F32(v)) => &v[*start..*start + *len],
                _ => unreachable!("F32Data::Borrowed only wraps f32 host storage"),
            },
            F32Data::Owned(v) => v,
        }
    }
}

impl Tensor {
    /// Wraps fresh storage as a tensor with no autograd history.
    pub(crate) fn from_storage(storage: CpuStorage, shape: &[usize], device: Device) -> Tensor {
        let dtype = storage.dtype();
        debug_assert_eq!(storage.len(), shape.iter().product::<usize>());
        Tensor(Arc::new(Inner {
            id: TensorId::next(),
            storage: SharedStorage::new(Storage::Cpu(storage)),
            layout: Layout::contiguous(shape),
            dtype,
            device,
            grad: GradInfo::None,
        }))
    }

    /// The result of an op: fresh f32 values stored in `dtype`, recording `op` for autograd when any
    /// of `inputs` requires a gradient and gradients are enabled.
    pub(crate) fn from_op(
        values: Vec<f32>,
        shape: &[usize],
        dtype: DType,
        inputs: &[&Tensor],
        op: impl BackwardOp + 'static,
    ) -> Tensor {
        // Host values make a host tensor, whatever its inputs: a CPU op that missed its device
        // check then fails loudly (device mismatch) instead of mislabelling host data.
        let storage = SharedStorage::new(Storage::Cpu(CpuStorage::from_f32(values, dtype)));
        Self::with_history_on(storage, Layout::contiguous(shape), dtype, Device::Cpu, inputs, op)
    }

    /// An op defined outside this crate (a collective of whale-parallel, a foreign kernel): its
    /// f32 results stored as `dtype`, with `op` as the backward over `inputs`. The op's backward
    /// receives the gradient of this output and returns one per input.
    pub fn from_custom_op(
        values: Vec<f32>,
        shape: &[usize],
        dtype: DType,
        inputs: &[&Tensor],
        op: impl BackwardOp + 'static,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(Error::invalid("from_custom_op", format!("{} values for shape {shape:?}", values.len())));
        }
        Ok(Self::from_op(values, shape, dtype, inputs, op))
    }

    /// A tensor over `storage`/`layout` that records `op` when it needs to (see [`Tensor::from_op`]).
    pub(crate) fn with_history(
        storage: Arc<SharedStorage>,
        layout: Layout,
        dtype: DType,
        inputs: &[&Tensor],
        op: impl BackwardOp + 'static,
    ) -> Tensor {
        let device = inputs.first().map(|t| t.device()).unwrap_or(Device::Cpu);
        Self::with_history_on(storage, layout, dtype, device, inputs, op)
    }

    /// [`Tensor::with_history`] on an explicit device (an op whose result lives elsewhere than its
    /// inputs: `to_device`).
    pub(crate) fn with_history_on(
        storage: Arc<SharedStorage>,
        layout: Layout,
        dtype: DType,
        device: Device,
        inputs: &[&Tensor],
        op: impl BackwardOp + 'static,
    ) -> Tensor {
        let grad = if backprop::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad()) {
            GradInfo::Node {
                input_path: inputs.iter().any(|t| t.on_input_path()),
                op: Box::new(op),
                inputs: inputs.iter().map(|&t| t.clone()).collect(),
                versions: inputs.iter().map(|t| t.0.storage.version()).chain([storage.version()]).collect(),
            }
        } else {
            GradInfo::None
        };
        Tensor(Arc::new(Inner { id: TensorId::next(), storage, layout, dtype, device, grad }))
    }

    // ---------------------------------------------------------------- constructors

    /// The element count of `shape`, an error where it overflows (a config's sizes multiplied
    /// past usize would wrap to a small tensor with enormous dimensions).
    fn checked_count(op: &'static str, shape: &[usize]) -> Result<usize> {
        shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(|| Error::InvalidArgument {
            op,
            msg: format!("shape {shape:?} has more elements than memory can address"),
        })
    }

    pub fn from_vec<T: WithDType>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
        device.check_available()?;
        let expected = Self::checked_count("from_vec", shape)?;
        if data.len() != expected {
            return Err(Error::DataLength { len: data.len(), shape: shape.to_vec(), expected });
        }
        Self::from_storage(T::into_storage(data), shape, Device::Cpu).to_device(device)
    }

    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        Self::from_vec(data.to_vec(), shape, device)
    }

    /// A rank-0 f32 tensor.
    pub fn scalar(value: f32) -> Tensor {
        Self::from_storage(CpuStorage::F32(vec![value]), &[], Device::Cpu)
    }

    pub fn full(value: f32, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        device.check_available()?;
        let n = Self::checked_count("full", shape)?;
        if let Device::Cuda(i) = device {
            return crate::cuda::full(value, shape, dtype, *i);
        }
        Ok(Self::from_storage(CpuStorage::from_f32(vec![value; n], dtype), shape, *device))
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::full(0.0, shape, dtype, device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::full(1.0, shape, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Self::zeros(self.dims(), self.dtype(), &self.device())
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Self::ones(self.dims(), self.dtype(), &self.device())
    }

    /// `[0, 1, ..., n-1]` as i64.
    pub fn arange(n: usize, device: &Device) -> Result<Tensor> {
        Self::from_vec((0..n as i64).collect::<Vec<_>>(), &[n], device)
    }

    /// Normal(mean, std) samples drawn from `rng`, stored as `dtype`.
    pub fn randn(shape: &[usize], mean: f32, std: f32, dtype: DType, rng: &mut Rng) -> Result<Tensor> {
        let n = Self::checked_count("randn", shape)?;
        let v = (0..n).map(|_| mean + std * rng.normal()).collect();
        Ok(Self::from_storage(CpuStorage::from_f32(v, dtype), shape, Device::Cpu))
    }

    /// Uniform [lo, hi) samples drawn from `rng`, stored as `dtype`.
    pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, dtype: DType, rng: &mut Rng) -> Result<Tensor> {
        let n = Self::checked_count("rand_uniform", shape)?;
        let v = (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect();
        Ok(Self::from_storage(CpuStorage::from_f32(v, dtype), shape, Device::Cpu))
    }

    // ---------------------------------------------------------------- accessors

    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub fn dims(&self) -> &[usize] {
        self.0.layout.shape()
    }

    /// Size of dimension `d`; an error names the op when `d` is out of range.
    pub fn dim(&self, d: usize) -> Result<usize> {
        self.0.layout.check_dim("dim", d)?;
        Ok(self.dims()[d])
    }

    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }

    pub fn elem_count(&self) -> usize {
        self.0.layout.elem_count()
    }

    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    pub fn device(&self) -> Device {
        self.0.device
    }

    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }

    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }

    /// Whether two tensors view the same storage buffer (views share; ops allocate).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    // ---------------------------------------------------------------- reading values

    /// The values as contiguous f32 on the host, for the CPU kernels. CPU ops refuse CUDA tensors
    /// before they get here (`ops::check_float`); reading a CUDA tensor copies it to the host,
    /// which only the explicit readers below (`to_vec_f32`, ...) do; a failed copy is an error
    /// (no stand-in values).
    pub(crate) fn f32_data(&self) -> Result<F32Data<'_>> {
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        if matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) && self.is_contiguous() {
            return Ok(F32Data::Borrowed(guard, self.0.layout.offset(), self.elem_count()));
        }
        // A view of part of a GPU buffer (the last position's logits of a prompt) is packed on
        // the GPU first, so only its values cross to the host, not the whole buffer.
        if let Storage::Cuda(c) = &*guard {
            if self.elem_count() == 0 {
                return Ok(F32Data::Owned(Vec::new()));
            }
            if !self.spans_its_buffer(c.len()) && c.dtype().fp8_format().is_none() {
                drop(guard);
                return match crate::cuda::copy(&self.detach()) {
                    Ok(packed) => Ok(F32Data::Owned(packed.to_vec_f32()?)),
                    // A view the strided copy cannot take (rank over 6, a dimension over 32
                    // bits): gathered on the host from the whole buffer, as before.
                    Err(Error::InvalidArgument { .. }) => self.gathered_on_host(),
                    Err(e) => Err(e),
                };
            }
        }
        drop(guard);
        self.gathered_on_host()
    }

    /// The values gathered on the host from the whole buffer (copied from the GPU first there).
    fn gathered_on_host(&self) -> Result<F32Data<'_>> {
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        Ok(F32Data::Owned(guard.host(self.device())?.gather_f32(&self.0.layout)))
    }

    /// Whether this tensor is the whole of its `len`-element buffer, in order.
    pub(crate) fn spans_its_buffer(&self, len: usize) -> bool {
        self.is_contiguous() && self.0.layout.offset() == 0 && len == self.elem_count()
    }

    /// Where the rows of a `[batch, heads, len, dim]` host f32 tensor lie in its storage, when
    /// each row's values are contiguous: (offset, strides, elements spanned).
    fn rows_in_place(&self) -> Option<(usize, RowLayout, usize)> {
        let (d, st) = (self.dims(), self.0.layout.strides());
        let f32_host =
            matches!(&*self.0.storage.read().expect("tensor storage lock poisoned"), Storage::Cpu(CpuStorage::F32(_)));
        let rows_contiguous =
            d.len() == 4 && !d.contains(&0) && (d[3] == 1 || st[3] == 1) && (d[2] == 1 || st[2] >= d[3]);
        if !(f32_host && rows_contiguous) {
            return None;
        }
        // A stride of a dimension of one element is never applied.
        let rows = RowLayout { batch: st[0], head: st[1], row: if d[2] == 1 { d[3] } else { st[2] } };
        Some((self.0.layout.offset(), rows, rows.span(d[0], d[1], d[2], d[3])))
    }

    /// Runs `f` on the values of `[batch, heads, len, dim]` tensors as f32 rows and where each row
    /// lies: a host f32 view whose rows are contiguous (a decode cache's first positions of a
    /// longer buffer, an MLA latent's first columns) is read in place, anything else packed. One
    /// read lock per storage, however many of the tensors share it.
    pub(crate) fn with_f32_rows<R, const N: usize>(
        ts: [&Tensor; N],
        f: impl FnOnce([(&[f32], RowLayout); N]) -> R,
    ) -> Result<R> {
        let places = ts.map(Tensor::rows_in_place);
        let mut packed: Vec<Option<Vec<f32>>> = Vec::with_capacity(N);
        for (t, place) in ts.iter().zip(&places) {
            packed.push(if place.is_none() { Some(t.to_vec_f32()?) } else { None });
        }
        let (guards, slots) = read_storages(ts);
        let rows = std::array::from_fn(|i| match (&places[i], &packed[i]) {
            (Some((offset, rows, span)), _) => match &*guards[slots[i]] {
                Storage::Cpu(CpuStorage::F32(v)) => (&v[*offset..offset + span], *rows),
                _ => unreachable!("rows_in_place only places host f32 storage"),
            },
            (None, Some(values)) => {
                let d = ts[i].dims();
                let rows =
                    if d.len() == 4 { RowLayout::contiguous(d[1], d[2], d[3]) } else { RowLayout::contiguous(0, 0, 0) };
                (&values[..], rows)
            }
            (None, None) => unreachable!("a tensor not read in place is packed"),
        });
        Ok(f(rows))
    }

    /// The values as f32 in row-major order (any dtype; floats widen exactly, integers convert),
    /// copied to the host from a GPU.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(self.f32_data()?.to_vec())
    }

    /// A tensor of FP8 codes (`format`'s bit patterns) with dtype F8E4M3 or F8E5M2.
    pub fn from_fp8_codes(codes: Vec<u8>, shape: &[usize], format: Fp8Format) -> Result<Tensor> {
        let n = Self::checked_count("from_fp8_codes", shape)?;
        if codes.len() != n {
            return Err(Error::invalid("from_fp8_codes", format!("{} codes for shape {shape:?}", codes.len())));
        }
        let storage = CpuStorage::from_fp8_codes(codes, format);
        Ok(Self::from_storage(storage, shape, Device::Cpu))
    }

    /// The codes of an FP8 tensor in row-major order; an error for other dtypes.
    pub fn fp8_codes(&self) -> Result<Vec<u8>> {
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        match &*guard.host(self.device())? {
            CpuStorage::F8E4M3(v) | CpuStorage::F8E5M2(v) => Ok(self.0.layout.gather(v)),
            other => Err(Error::UnsupportedDType { op: "fp8_codes", dtype: other.dtype(), why: "not an FP8 tensor" }),
        }
    }

    /// The values of an index tensor (u32 or i64) in row-major order.
    pub fn to_vec_i64(&self) -> Result<Vec<i64>> {
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        guard.host(self.device())?.gather_i64("to_vec_i64", &self.0.layout)
    }

    /// The values in their own element type; an error if `T` is not this tensor's dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        T::from_storage(&*guard.host(self.device())?, &self.0.layout).ok_or(Error::DTypeMismatch {
            op: "to_vec",
            lhs: self.dtype(),
            rhs: T::DTYPE,
        })
    }

    /// The single value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(Error::invalid("to_scalar", format!("tensor has shape {:?}, not one element", self.dims())));
        }
        Ok(self.f32_data()?[0])
    }

    /// Rows of a rank-2 tensor as f32.
    pub fn to_vec2_f32(&self) -> Result<Vec<Vec<f32>>> {
        if self.rank() != 2 {
            return Err(Error::invalid("to_vec2_f32", format!("rank {} is not 2", self.rank())));
        }
        let (rows, cols) = (self.dims()[0], self.dims()[1]);
        if cols == 0 {
            return Ok(vec![Vec::new(); rows]);
        }
        Ok(self.to_vec_f32()?.chunks(cols).map(|c| c.to_vec()).collect())
    }

    /// This tensor's values on `device` (the same tensor when already there); differentiable.
    /// CUDA tensors are f32 or bf16, or FP8 codes (which move as they are).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        device.check_available()?;
        crate::cuda::to_device(self, device)
    }

    // ---------------------------------------------------------------- in-place writes

    /// Runs `f` on this tensor's values as a mutable f32 slice. For parameters (optimizer steps,
    /// checkpoint loading): the tensor must be contiguous f32. A CUDA tensor's values make a round
    /// trip through the host (fine for small or rare writes; optimizers update on the GPU).
    pub fn with_f32_mut<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        if !self.is_contiguous() {
            return Err(Error::invalid("with_f32_mut", "tensor is not contiguous"));
        }
        // Checked before the write lock: a refused call writes nothing, so it takes no new
        // version (a backward through the tensor would be refused for it).
        if self.dtype() != DType::F32 {
            return Err(Error::UnsupportedDType {
                op: "with_f32_mut",
                dtype: self.dtype(),
                why: "in-place updates need f32 (master weights are f32)",
            });
        }
        if self.device().is_cuda() {
            return crate::cuda::with_f32_mut(self, f);
        }
        let mut guard = self.0.storage.write().expect("tensor storage lock poisoned");
        let (start, len) = (self.0.layout.offset(), self.elem_count());
        match &mut *guard {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(f(&mut v[start..start + len])),
            _ => Err(Error::invalid("with_f32_mut", "the storage changed kind while it was checked")),
        }
    }

    /// Writes `src` into positions `start..start + src.dims()[dim]` along `dim` of this tensor, in
    /// place: how a decode cache appends tokens to its buffers without copying what they hold.
    /// This tensor must be contiguous; `src` has its shape except along `dim`, its dtype and its
    /// device. Not differentiable (a cache is never trained through): a `src` that requires a
    /// gradient is refused unless gradients are off.
    pub fn write_window(&self, dim: usize, start: usize, src: &Tensor) -> Result<()> {
        crate::ops::check_no_gradient_wanted("write_window", "the written tensor", src)?;
        let same_but_dim = src.rank() == self.rank()
            && dim < self.rank()
            && src.dims().iter().zip(self.dims()).enumerate().all(|(d, (a, b))| d == dim || a == b);
        if !same_but_dim {
            return Err(Error::ShapeMismatch {
                op: "write_window",
                lhs: self.dims().to_vec(),
                rhs: src.dims().to_vec(),
            });
        }
        if src.dtype() != self.dtype() {
            return Err(Error::DTypeMismatch { op: "write_window", lhs: self.dtype(), rhs: src.dtype() });
        }
        if src.device() != self.device() {
            return Err(Error::DeviceMismatch { op: "write_window", lhs: self.device(), rhs: src.device() });
        }
        if !self.is_contiguous() {
            return Err(Error::invalid("write_window", "the destination is not contiguous"));
        }
        let window = self.0.layout.narrow(dim, start, src.dims()[dim])?;
        if src.elem_count() == 0 {
            return Ok(());
        }
        if self.device().is_cuda() {
            return crate::cuda::write_window(self, &window, src);
        }
        let values = {
            let guard = src.0.storage.read().expect("tensor storage lock poisoned");
            guard.host(src.device())?.gather_same(&src.0.layout)
        };
        let mut guard = self.0.storage.write().expect("tensor storage lock poisoned");
        let Storage::Cpu(dst) = &mut *guard else {
            return Err(Error::invalid("write_window", "a GPU tensor reached the host path"));
        };
        // The window of a contiguous tensor: `outer` blocks of `block` contiguous values, one
        // per index before `dim`, `stride` apart. From the dims, not the strides: a dimension of
        // one element may carry any stride in a contiguous tensor.
        let block = src.dims()[dim..].iter().product::<usize>();
        let inner = self.dims()[dim + 1..].iter().product::<usize>();
        let (outer, stride) = (src.elem_count() / block, self.dims()[dim..].iter().product::<usize>());
        dst.write_blocks(self.0.layout.offset() + start * inner, stride, outer, block, &values)
    }

    /// Copies `src`'s values into this tensor's storage in place (same shape).
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.dims() != self.dims() {
            return Err(Error::ShapeMismatch { op: "assign", lhs: self.dims().to_vec(), rhs: src.dims().to_vec() });
        }
        let values = src.to_vec_f32()?;
        self.with_f32_mut(|dst| dst.copy_from_slice(&values))
    }

    /// A copy with its own storage and no history.
    pub fn deep_clone(&self) -> Result<Tensor> {
        if let Device::Cuda(_) = self.device() {
            return crate::cuda::copy(&self.detach());
        }
        let guard = self.0.storage.read().expect("tensor storage lock poisoned");
        Ok(Self::from_storage(guard.host(self.device())?.gather_same(&self.0.layout), self.dims(), self.device()))
    }

    /// The same values with no autograd history (shares storage).
    pub fn detach(&self) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::next(),
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.dtype(),
            device: self.device(),
            grad: GradInfo::None,
        }))
    }

    fn make_leaf(&self, kind: VarKind) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::next(),
            storage: self.0.storage.clone(),
            layout: self.0.layout.clone(),
            dtype: self.dtype(),
            device: self.device(),
            grad: GradInfo::Leaf { kind, grad: Mutex::new(None) },
        }))
    }

    /// A trainable weight: a leaf whose gradient accumulates across `backward` calls and whose
    /// gradient work may be deferred by a split backward (see [`crate::backprop`]).
    pub fn variable(&self) -> Tensor {
        self.make_leaf(VarKind::Weight)
    }

    /// An activation that needs its gradient (for example a pipeline stage's input): a split
    /// backward computes it in the input-gradient pass.
    pub fn input_variable(&self) -> Tensor {
        self.make_leaf(VarKind::Input)
    }

    pub fn is_variable(&self) -> bool {
        matches!(self.0.grad, GradInfo::Leaf { .. })
    }

    pub fn requires_grad(&self) -> bool {
        !matches!(self.0.grad, GradInfo::None)
    }

    /// Depends on an input variable (not only on weights).
    pub(crate) fn on_input_path(&self) -> bool {
        match &self.0.grad {
            GradInfo::None => false,
            GradInfo::Leaf { kind, .. } => *kind == VarKind::Input,
            GradInfo::Node { input_path, .. } => *input_path,
        }
    }

    /// The accumulated gradient of a variable, if any.
    pub fn grad(&self) -> Option<Tensor> {
        match &self.0.grad {
            GradInfo::Leaf { grad, .. } => grad.lock().expect("grad lock poisoned").clone(),
            _ => None,
        }
    }

    /// Removes and returns the accumulated gradient.
    pub fn take_grad(&self) -> Option<Tensor> {
        match &self.0.grad {
            GradInfo::Leaf { grad, .. } => grad.lock().expect("grad lock poisoned").take(),
            _ => None,
        }
    }

    pub fn zero_grad(&self) {
        self.take_grad();
    }

    /// Replaces the accumulated gradient (data parallelism writes the all-reduced one back). It
    /// must have this variable's shape and dtype and live on its device (as torch's `.grad =`).
    pub fn set_grad(&self, g: Option<Tensor>) -> Result<()> {
        let GradInfo::Leaf { grad, .. } = &self.0.grad else {
            return Err(Error::invalid("set_grad", "only variables hold gradients"));
        };
        if let Some(g) = &g {
            if g.dims() != self.dims() || g.dtype() != self.dtype() || g.device() != self.device() {
                return Err(Error::invalid(
                    "set_grad",
                    format!(
                        "a {:?} {:?} gradient on {:?} for a {:?} {:?} variable on {:?}",
                        g.dims(),
                        g.dtype(),
                        g.device(),
                        self.dims(),
                        self.dtype(),
                        self.device()
                    ),
                ));
            }
        }
        *grad.lock().expect("grad lock poisoned") = g;
        Ok(())
    }
}

/// The storages behind `ts`, each once (a tensor may appear twice, or two views share one
/// buffer: one read lock each, never two on the same lock), read-locked, and which of them each
/// tensor uses.
pub(crate) fn read_storages<'a, const N: usize>(
    ts: [&'a Tensor; N],
) -> (Vec<RwLockReadGuard<'a, Storage>>, [usize; N]) {
    let mut unique: Vec<&Arc<SharedStorage>> = Vec::new();
    let slots = ts.map(|t| match unique.iter().position(|u| Arc::ptr_eq(u, &t.0.storage)) {
        Some(i) => i,
        None => {
            unique.push(&t.0.storage);
            unique.len() - 1
        }
    });
    let guards = unique.iter().map(|s| s.read().expect("tensor storage lock poisoned")).collect();
    (guards, slots)
}
