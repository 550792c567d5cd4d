//! The CUDA backend: tensors whose storage lives on a GPU (f32 or bf16 values, or FP8 codes for
//! the FP8 ops), and the ops that run there. Each op keeps its CPU home (`ops/`, `fp8.rs`), which
//! dispatches here for CUDA tensors; the backward closures are the CPU ops' own where they are
//! written in tensor ops (which dispatch again), and GPU kernels where the CPU computes a
//! derivative directly (elementwise maps, the fused ops).
//!
//! Every op of the tensor API runs on the GPU: `to_device` both ways, views (free: layouts
//! only), `contiguous`, elementwise maps, broadcasting binary ops, reductions, matmul through
//! cuBLAS, the fused NN ops (`nn.rs`), MoE token permutation (`dispatch.rs`), FP8 quantisation
//! and the FP8 linear (`fp8.rs`), AdamW. Ops compute in f32: bf16 operands are widened on the
//! way in and results rounded to bf16 on the way out, the CPU's rule (bf16 matmuls run on
//! cuBLAS's bf16 GEMM). Index tensors are host data. What the GPU does not hold (f16) is an
//! error that names the op (`check_gpu_float`): nothing silently computes on the host.

use std::sync::{Arc, RwLockReadGuard};

use half::bf16;

use whale_kernels::cuda::cudarc::cublas::{CudaBlas, Gemm};
use whale_kernels::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, DriverError};
use whale_kernels::cuda::{BinaryOp, BlasFloat, GemmShape, Gpu, GpuError, MidReduction, Strided, UnaryOp};

use crate::backprop::{backward_fn, BackwardOp};
use crate::device::gpu;
use crate::layout::Layout;
use crate::storage::{CudaBuf, CudaStorage, SharedStorage, Storage};
use crate::tensor::read_storages;
use crate::{DType, Device, Error, Result, Tensor};

pub(crate) mod dispatch;
pub(crate) mod fp8;
pub(crate) mod nn;

/// A launcher's error: a shape it refuses is an invalid argument (the device works); anything
/// else is the device's.
pub(crate) fn gpu_error(device: Device) -> impl Fn(GpuError) -> Error {
    move |e| match e {
        GpuError::Shape(msg) => Error::InvalidArgument { op: "CUDA kernel", msg },
        e => Error::DeviceUnavailable { device, why: e.to_string() },
    }
}

/// A failed driver call (a copy, an allocation) on `device` as an error naming what failed.
pub(crate) fn driver_error(device: Device, what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::DeviceUnavailable { device, why: format!("{what} failed: {e:?}") }
}

/// `v` copied to the GPU (one default value for an empty slice: the driver allocates nothing
/// empty, and no kernel reads it then).
pub(crate) fn upload<T: DeviceRepr + Default + Copy>(g: &Gpu, device: Device, v: &[T]) -> Result<CudaSlice<T>> {
    let v = if v.is_empty() { vec![T::default()] } else { v.to_vec() };
    g.stream.clone_htod(&v).map_err(driver_error(device, "copying to the GPU"))
}

/// The GPU behind `device` (for an op named `op` that only runs there).
pub(crate) fn gpu_of(op: &'static str, device: Device) -> Result<Arc<Gpu>> {
    match device {
        Device::Cuda(i) => gpu(i),
        Device::Cpu => Err(Error::invalid(op, "a host tensor reached the CUDA backend")),
    }
}

/// The CUDA storage behind a read guard.
fn on_gpu<'a>(guard: &'a RwLockReadGuard<'_, Storage>) -> Result<&'a CudaStorage> {
    match &**guard {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(Error::invalid("cuda", "a host tensor reached the CUDA backend")),
    }
}

/// Runs `f` on the GPU and the f32 buffers behind CUDA tensors (read-locked for the call, not
/// copied; bf16 storage is widened into a temporary f32 buffer from its start up to the end of
/// what the views read, so they keep their offsets).
pub(crate) fn with_buffers<R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce(&Arc<Gpu>, [&CudaSlice<f32>; N]) -> Result<R>,
) -> Result<R> {
    let (guards, slots) = read_storages(ts);
    let storages = guards.iter().map(on_gpu).collect::<Result<Vec<_>>>()?;
    let first = storages.first().ok_or_else(|| Error::invalid("cuda", "no tensors"))?;
    // How much of each storage the tensors reach (bf16 is widened up to there, not beyond).
    let mut reach = vec![0usize; storages.len()];
    for (t, &slot) in ts.iter().zip(&slots) {
        reach[slot] = reach[slot].max(end_of(t));
    }
    let widened = storages
        .iter()
        .zip(&reach)
        .map(|(c, &end)| match &c.buf {
            CudaBuf::Bf16(bits) => {
                widen(&c.gpu, Device::Cuda(c.gpu.ordinal), &bits.slice(..end.min(bits.len()))).map(Some)
            }
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let bufs = storages
        .iter()
        .zip(&widened)
        .map(|(c, w)| w.as_ref().map_or_else(|| c.f32("a CUDA op"), Ok))
        .collect::<Result<Vec<_>>>()?;
    f(&first.gpu, slots.map(|i| bufs[i]))
}

/// Runs `f` on the bf16 bits behind bf16 CUDA tensors, as they are (cuBLAS's bf16 GEMM).
fn with_bf16_buffers<R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce(&Arc<Gpu>, [&CudaSlice<bf16>; N]) -> Result<R>,
) -> Result<R> {
    let (guards, slots) = read_storages(ts);
    let storages = guards.iter().map(on_gpu).collect::<Result<Vec<_>>>()?;
    let bits = storages
        .iter()
        .map(|c| match &c.buf {
            CudaBuf::Bf16(b) => Ok(b),
            _ => Err(Error::UnsupportedDType { op: "cuda", dtype: c.dtype(), why: "bf16 storage is needed here" }),
        })
        .collect::<Result<Vec<_>>>()?;
    let first = storages.first().ok_or_else(|| Error::invalid("cuda", "no tensors"))?;
    f(&first.gpu, slots.map(|i| bits[i]))
}

/// One past the last storage element `t`'s view reads.
fn end_of(t: &Tensor) -> usize {
    let l = t.layout();
    if t.elem_count() == 0 {
        return l.offset();
    }
    l.offset() + l.shape().iter().zip(l.strides()).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1
}

/// bf16 bits as f32 values in a fresh buffer.
fn widen(g: &Gpu, device: Device, bits: &CudaView<'_, bf16>) -> Result<CudaSlice<f32>> {
    // SAFETY: the conversion below writes every value.
    let mut out = unsafe { alloc_unset::<f32>(g, device, bits.len()) }?;
    g.bf16_to_f32_dev(bits, &mut out, bits.len()).map_err(gpu_error(device))?;
    Ok(out)
}

/// [`with_buffers`] for one tensor.
pub(crate) fn with_buffer<R>(t: &Tensor, f: impl FnOnce(&Arc<Gpu>, &CudaSlice<f32>) -> Result<R>) -> Result<R> {
    with_buffers([t], |g, [b]| f(g, b))
}

/// `n` values (at least one) left unset, for a buffer the next kernel overwrites entirely (the
/// bf16 conversions on every bf16 op), so it is not zeroed first.
///
/// # Safety
/// The caller writes all `n` values before anything reads them.
unsafe fn alloc_unset<T: DeviceRepr>(g: &Gpu, device: Device, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the caller's contract.
    unsafe { g.stream.alloc::<T>(n.max(1)) }.map_err(driver_error(device, "allocating"))
}

pub(crate) fn alloc(g: &Gpu, device: Device, n: usize) -> Result<CudaSlice<f32>> {
    g.stream
        .alloc_zeros::<f32>(n.max(1))
        .map_err(|e| Error::DeviceUnavailable { device, why: format!("allocating {n} floats failed: {e:?}") })
}

/// A fresh contiguous CUDA tensor of `dtype` over the f32 values `buf` (rounded to bf16 for a
/// bf16 result, as the CPU stores its results), recording `op` over `inputs` when it needs to.
fn tensor(
    g: Arc<Gpu>,
    buf: CudaSlice<f32>,
    shape: &[usize],
    dtype: DType,
    inputs: &[&Tensor],
    op: impl BackwardOp + 'static,
) -> Result<Tensor> {
    let device = Device::Cuda(g.ordinal);
    let buf = match dtype {
        DType::F32 => CudaBuf::F32(buf),
        DType::BF16 => {
            // SAFETY: the conversion below writes every value.
            let mut bits = unsafe { alloc_unset::<bf16>(&g, device, buf.len()) }?;
            g.f32_to_bf16_dev(&buf.slice(..), &mut bits, buf.len()).map_err(gpu_error(device))?;
            CudaBuf::Bf16(bits)
        }
        other => return Err(Error::UnsupportedDType { op: "cuda", dtype: other, why: GPU_DTYPES }),
    };
    Ok(wrap(g, buf, shape, inputs, op))
}

/// A fresh contiguous CUDA tensor over `buf` (its dtype is the buffer's).
pub(crate) fn wrap(
    g: Arc<Gpu>,
    buf: CudaBuf,
    shape: &[usize],
    inputs: &[&Tensor],
    op: impl BackwardOp + 'static,
) -> Tensor {
    let device = Device::Cuda(g.ordinal);
    let storage = CudaStorage { gpu: g, buf };
    let dtype = storage.dtype();
    Tensor::with_history_on(
        SharedStorage::new(Storage::Cuda(storage)),
        Layout::contiguous(shape),
        dtype,
        device,
        inputs,
        op,
    )
}

const GPU_DTYPES: &str = "CUDA tensors are f32 or bf16 (FP8 codes feed only the FP8 ops)";

/// A dtype the CUDA ops compute in: f32 or bf16.
fn check_gpu_dtype(op: &'static str, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::UnsupportedDType { op, dtype, why: GPU_DTYPES });
    }
    Ok(())
}

/// A tensor the CUDA ops compute on: f32 or bf16.
pub(crate) fn check_gpu_float(op: &'static str, t: &Tensor) -> Result<()> {
    check_gpu_dtype(op, t.dtype())
}

/// Row ids for the gather/scatter kernels, which take 32-bit ids: a larger one is an error (cast,
/// it would pick another row).
pub(crate) fn ids_u32(op: &'static str, idx: &[usize]) -> Result<Vec<u32>> {
    idx.iter()
        .map(|&i| {
            u32::try_from(i).map_err(|_| Error::InvalidArgument {
                op,
                msg: format!("index {i} is beyond the 32-bit ids of the CUDA kernels"),
            })
        })
        .collect()
}

/// `value` everywhere, on GPU `ordinal`.
pub(crate) fn full(value: f32, shape: &[usize], dtype: DType, ordinal: usize) -> Result<Tensor> {
    let device = Device::Cuda(ordinal);
    check_gpu_dtype("full", dtype)?;
    let g = gpu(ordinal)?;
    let n = shape.iter().product();
    let mut buf = alloc(&g, device, n)?;
    if value != 0.0 {
        g.fill_dev(&mut buf, n, value).map_err(gpu_error(device))?;
    }
    tensor(g, buf, shape, dtype, &[], crate::backprop::NoBackward)
}

/// The values of `t` (on any device) on `device`; differentiable (the gradient moves back).
pub(crate) fn to_device(t: &Tensor, device: &Device) -> Result<Tensor> {
    let back = backward_fn("to_device", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
        Ok(vec![Some(g.to_device(&inputs[0].device())?)])
    });
    if let Some(format) = t.dtype().fp8_format() {
        // FP8 codes move as they are (they carry no gradient).
        return match *device {
            Device::Cpu => Tensor::from_fp8_codes(t.fp8_codes()?, t.dims(), format),
            Device::Cuda(i) => fp8::codes_to_device(t, i),
        };
    }
    match *device {
        Device::Cpu => {
            // f32 and bf16 values both convert exactly.
            let storage = Storage::Cpu(crate::storage::CpuStorage::from_f32(t.to_vec_f32()?, t.dtype()));
            let layout = Layout::contiguous(t.dims());
            Ok(Tensor::with_history_on(SharedStorage::new(storage), layout, t.dtype(), Device::Cpu, &[t], back))
        }
        Device::Cuda(i) => {
            check_gpu_float("to_device", t)?;
            let g = gpu(i)?;
            let buf =
                if t.device() == *device { contiguous_buffer(t)?.1 } else { upload(&g, *device, &t.to_vec_f32()?)? };
            tensor(g, buf, t.dims(), t.dtype(), &[t], back)
        }
    }
}

/// `t` stored as `dtype` (f32 and bf16 on a GPU), differentiable (the gradient converts back).
pub(crate) fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    check_gpu_float("to_dtype", t)?;
    check_gpu_dtype("to_dtype", dtype)?;
    let (g, buf) = contiguous_buffer(t)?;
    let back = backward_fn("to_dtype", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
        Ok(vec![Some(g.to_dtype(inputs[0].dtype())?)])
    });
    tensor(g, buf, t.dims(), dtype, &[t], back)
}

/// The strided view `s.a` of `t`'s buffer as a fresh contiguous buffer.
fn contiguous_buffer(t: &Tensor) -> Result<(Arc<Gpu>, CudaSlice<f32>)> {
    let l = t.layout();
    let n = t.elem_count();
    with_buffer(t, |g, buf| {
        let mut out = alloc(g, t.device(), n)?;
        if n > 0 {
            let s = Strided::new(l.shape(), (l.strides(), l.offset()), (l.strides(), l.offset()))
                .map_err(gpu_error(t.device()))?;
            g.strided_copy_dev(buf, &s, &mut out, n).map_err(gpu_error(t.device()))?;
        }
        Ok((g.clone(), out))
    })
}

/// A row-major copy of a CUDA view.
pub(crate) fn contiguous(t: &Tensor) -> Result<Tensor> {
    check_gpu_float("contiguous", t)?;
    let (g, buf) = contiguous_buffer(t)?;
    let op = backward_fn("contiguous", |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| Ok(vec![Some(g.clone())]));
    tensor(g, buf, t.dims(), t.dtype(), &[t], op)
}

/// Zeros of `shape` with `g` written at `start` along `dim`: narrow's backward.
pub(crate) fn pad_into(g: &Tensor, shape: &[usize], dim: usize, start: usize) -> Result<Tensor> {
    check_gpu_float("narrow (backward)", g)?;
    let gp = packed(g)?;
    let (dev, n) = (g.device(), g.elem_count());
    let window = Layout::contiguous(shape).narrow(dim, start, g.dims()[dim])?;
    let s = Strided::new(window.shape(), (window.strides(), window.offset()), (window.strides(), window.offset()))
        .map_err(gpu_error(dev))?;
    let (gpu, out) = with_buffer(&gp, |gpu, gb| {
        let mut out = alloc(gpu, dev, shape.iter().product())?;
        if n > 0 {
            gpu.strided_write_dev(&gb.slice(..), &s, &mut out, n).map_err(gpu_error(dev))?;
        }
        Ok((gpu.clone(), out))
    })?;
    let len = g.dims()[dim];
    let back = backward_fn("pad", move |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
        Ok(vec![Some(g.narrow(dim, start, len)?)])
    });
    tensor(gpu, out, shape, g.dtype(), &[g], back)
}

/// A copy with its own buffer and no history.
pub(crate) fn copy(t: &Tensor) -> Result<Tensor> {
    if let (Some(format), Device::Cuda(i)) = (t.dtype().fp8_format(), t.device()) {
        // FP8 codes (a stored FP8 weight being duplicated: rare) go through the host.
        return fp8::codes_to_device(&Tensor::from_fp8_codes(t.fp8_codes()?, t.dims(), format)?, i);
    }
    let (g, buf) = contiguous_buffer(t)?;
    tensor(g, buf, t.dims(), t.dtype(), &[], crate::backprop::NoBackward)
}

/// `t` itself when it is contiguous from the start of its buffer, else a contiguous copy (no
/// history: callers record their own op).
pub(crate) fn packed(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() && t.layout().offset() == 0 {
        Ok(t.clone())
    } else {
        contiguous(&t.detach())
    }
}

/// `op(t)` elementwise, with the derivative kernel as its backward.
pub(crate) fn unary(t: &Tensor, name: &'static str, op: UnaryOp) -> Result<Tensor> {
    check_gpu_float(name, t)?;
    let x = packed(t)?;
    let n = t.elem_count();
    let (g, buf) = with_buffer(&x, |g, xb| {
        let mut out = alloc(g, t.device(), n)?;
        g.unary_dev(op, &xb.slice(..), &mut out, n).map_err(gpu_error(t.device()))?;
        Ok((g.clone(), out))
    })?;
    let back = backward_fn(name, move |inputs: &[Tensor], output: &Tensor, grad: &Tensor, _: &[bool]| {
        let (x, gr) = (packed(&inputs[0])?, packed(grad)?);
        let dx = with_buffers([&x, output, &gr], |g, [xb, yb, gb]| {
            let mut dx = alloc(g, x.device(), n)?;
            g.unary_backward_dev(op, (&xb.slice(..), &yb.slice(..), &gb.slice(..)), &mut dx, n)
                .map_err(gpu_error(x.device()))?;
            tensor(g.clone(), dx, x.dims(), x.dtype(), &[], crate::backprop::NoBackward)
        })?;
        Ok(vec![Some(dx)])
    });
    tensor(g, buf, t.dims(), t.dtype(), &[t], back)
}

/// `a op b` with broadcasting into `shape` (strides of 0 along broadcast dims) as `dtype`,
/// recording `back` over `inputs` (the CPU op's backward, written in tensor ops).
pub(crate) fn binary(
    (a, b): (&Tensor, &Tensor),
    (shape, dtype): (&[usize], DType),
    (name, op): (&'static str, BinaryOp),
    inputs: &[&Tensor],
    back: impl BackwardOp + 'static,
) -> Result<Tensor> {
    check_gpu_float(name, a)?;
    check_gpu_float(name, b)?;
    let (ba, bb) = (a.broadcast_as(shape)?, b.broadcast_as(shape)?);
    let (la, lb) = (ba.layout(), bb.layout());
    let s =
        Strided::new(shape, (la.strides(), la.offset()), (lb.strides(), lb.offset())).map_err(gpu_error(a.device()))?;
    let n: usize = shape.iter().product();
    let (g, buf) = with_buffers([a, b], |g, [ab, bb]| {
        let mut out = alloc(g, a.device(), n)?;
        if n > 0 {
            g.binary_dev(op, (ab, bb), &s, &mut out, n).map_err(gpu_error(a.device()))?;
        }
        Ok((g.clone(), out))
    })?;
    tensor(g, buf, shape, dtype, inputs, back)
}

/// Sum over the middle axis of `t` seen as `[outer, n, inner]` into `out_shape`.
pub(crate) fn sum_mid(t: &Tensor, (outer, n, inner): (usize, usize, usize), out_shape: &[usize]) -> Result<Tensor> {
    check_gpu_float("sum", t)?;
    let x = packed(t)?;
    let (g, buf) = with_buffer(&x, |g, xb| {
        let mut out = alloc(g, t.device(), outer * inner)?;
        g.sum_mid_dev(&xb.slice(..), &mut out, (outer, n, inner)).map_err(gpu_error(t.device()))?;
        Ok((g.clone(), out))
    })?;
    let back = backward_fn("sum", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
        Ok(vec![Some(g.broadcast_as(inputs[0].dims())?.contiguous()?)])
    });
    tensor(g, buf, out_shape, t.dtype(), &[t], back)
}

/// `a[batch.., m, k] @ b[batch.., k, n]` (both already broadcast to the batch) through cuBLAS.
/// A 2-D `b` that is the transpose of a contiguous `[n, k]` (a linear layer's `w.t()`) is read in
/// place; other views are made contiguous first.
pub(crate) fn matmul(
    (a, b): (&Tensor, &Tensor),
    (batch, m, n, k): (usize, usize, usize, usize),
    out_shape: &[usize],
    inputs: &[&Tensor],
    back: impl BackwardOp + 'static,
) -> Result<Tensor> {
    check_gpu_float("matmul", a)?;
    check_gpu_float("matmul", b)?;
    let lb = b.layout();
    let b_transposed = b.rank() == 2 && lb.strides() == [1, k] && lb.offset() == 0 && k > 0;
    let a = packed(a)?;
    let b = if b_transposed { b.clone() } else { packed(b)? };
    let shape = GemmShape { batch, m, n, k, b_transposed };
    let dev = a.device();
    if a.dtype() == DType::BF16 && b.dtype() == DType::BF16 {
        // cuBLAS's bf16 GEMM on the stored bits (f32 accumulation, the product rounded to bf16
        // once: the CPU's arithmetic, in another summation order) on the tensor cores.
        let (g, out) = with_bf16_buffers([&a, &b], |g, [ab, bb]| Ok((g.clone(), gemm(g, dev, &shape, ab, bb)?)))?;
        return Ok(wrap(g, CudaBuf::Bf16(out), out_shape, inputs, back));
    }
    let (g, buf) = with_buffers([&a, &b], |g, [ab, bb]| Ok((g.clone(), gemm(g, dev, &shape, ab, bb)?)))?;
    tensor(g, buf, out_shape, a.dtype(), inputs, back)
}

/// `shape`'s product of the packed operands `a` and `b` into a fresh buffer, through cuBLAS.
fn gemm<T: BlasFloat>(
    g: &Gpu,
    dev: Device,
    shape: &GemmShape,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
) -> Result<CudaSlice<T>>
where
    CudaBlas: Gemm<T>,
{
    let GemmShape { batch, m, n, k, .. } = *shape;
    let c_len = batch * m * n;
    let mut out = g.stream.alloc_zeros::<T>(c_len.max(1)).map_err(driver_error(dev, "allocating"))?;
    if c_len > 0 {
        let mut view = out.slice_mut(..c_len);
        g.gemm_dev(shape, &a.slice(..batch * m * k), &b.slice(..batch * k * n), &mut view).map_err(gpu_error(dev))?;
    }
    Ok(out)
}

/// `tensors` (already checked: same rank, dtype, and dims but `dim`) concatenated along `dim`;
/// each is written into its window of the result. `back` is the CPU op's backward (narrow views).
pub(crate) fn cat(tensors: &[Tensor], dim: usize, shape: &[usize], back: impl BackwardOp + 'static) -> Result<Tensor> {
    let dev = tensors[0].device();
    let g = gpu_of("cat", dev)?;
    let mut out = alloc(&g, dev, shape.iter().product())?;
    let mut at = 0;
    for t in tensors {
        check_gpu_float("cat", t)?;
        if t.device() != dev {
            return Err(Error::DeviceMismatch { op: "cat", lhs: dev, rhs: t.device() });
        }
        let len = t.dims()[dim];
        let window = Layout::contiguous(shape).narrow(dim, at, len)?;
        let s = Strided::new(window.shape(), (window.strides(), window.offset()), (window.strides(), window.offset()))
            .map_err(gpu_error(dev))?;
        let tp = packed(t)?;
        if t.elem_count() > 0 {
            with_buffer(&tp, |g, tb| {
                g.strided_write_dev(&tb.slice(..), &s, &mut out, t.elem_count()).map_err(gpu_error(dev))
            })?;
        }
        at += len;
    }
    let refs: Vec<&Tensor> = tensors.iter().collect();
    tensor(g, out, shape, tensors[0].dtype(), &refs, back)
}

/// For PyTorch's `gather`/`scatter_add` along `dim` of a tensor of `dims`: the row-major flat
/// position each index of `ix` (in the index tensor's row-major order, `m` along `dim`) names.
pub(crate) fn flat_indices(dims: &[usize], dim: usize, m: usize, ix: &[usize]) -> Vec<usize> {
    let (_, n, inner) = crate::ops::split_at_dim(dims, dim);
    (0..ix.len())
        .map(|p| {
            let (o, i) = (p / (m * inner), p % inner);
            (o * n + ix[p]) * inner + i
        })
        .collect()
}

/// PyTorch's `gather` along `dim` with host indices `ix` (checked): an index_select of single
/// elements of the flattened tensor, whose backward is the scatter-add gather needs.
pub(crate) fn gather(x: &Tensor, dim: usize, ix: &[usize], out_shape: &[usize]) -> Result<Tensor> {
    let flat = flat_indices(x.dims(), dim, out_shape[dim], ix);
    let picked = nn::index_select_rows(&x.flatten_all()?, &flat, 1, &[flat.len()])?;
    picked.reshape(out_shape)
}

/// `on_true` where `cond` is non-zero, else `on_false`, all broadcast to `shape`; `back` is the
/// CPU op's backward.
pub(crate) fn select(
    (cond, on_true, on_false): (&Tensor, &Tensor, &Tensor),
    shape: &[usize],
    back: impl BackwardOp + 'static,
) -> Result<Tensor> {
    for t in [cond, on_true, on_false] {
        check_gpu_float("where_cond", t)?;
    }
    let dev = on_true.device();
    let full = |t: &Tensor| packed(&t.broadcast_as(shape)?);
    let (c, t, f) = (full(cond)?, full(on_true)?, full(on_false)?);
    let n: usize = shape.iter().product();
    let (g, out) = with_buffers([&c, &t, &f], |g, [cb, tb, fb]| {
        let mut out = alloc(g, dev, n)?;
        if n > 0 {
            g.select_dev((&cb.slice(..), &tb.slice(..), &fb.slice(..)), &mut out, n).map_err(gpu_error(dev))?;
        }
        Ok((g.clone(), out))
    })?;
    tensor(g, out, shape, on_true.dtype(), &[cond, on_true, on_false], back)
}

/// A reduction over the middle axis of `t` seen as `[outer, n, inner]`: its values on the GPU.
fn reduce_mid(
    t: &Tensor,
    reduction: MidReduction,
    (outer, n, inner): (usize, usize, usize),
) -> Result<(Arc<Gpu>, CudaSlice<f32>)> {
    let x = packed(t)?;
    with_buffer(&x, |g, xb| {
        let mut out = alloc(g, t.device(), outer * inner)?;
        if outer * inner > 0 {
            g.reduce_mid_dev(reduction, &xb.slice(..), &mut out, (outer, n, inner)).map_err(gpu_error(t.device()))?;
        }
        Ok((g.clone(), out))
    })
}

/// The first maximum's index along the middle axis, as host i64 indices (index tensors are host
/// data here), shaped `out_shape`.
pub(crate) fn argmax(t: &Tensor, split: (usize, usize, usize), out_shape: &[usize]) -> Result<Tensor> {
    check_gpu_float("argmax", t)?;
    // The kernel writes indices into an f32 buffer: exact up to 2^24.
    if split.1 > 1 << 24 {
        return Err(Error::invalid(
            "argmax",
            format!("a dimension of {} entries on a GPU (indices are exact up to 2^24); move it to the CPU", split.1),
        ));
    }
    let (g, out) = reduce_mid(t, MidReduction::Argmax, split)?;
    let n = split.0 * split.2;
    let host = g.stream.clone_dtoh(&out).map_err(driver_error(t.device(), "copying indices to the host"))?;
    Tensor::from_vec(host[..n].iter().map(|&i| i as i64).collect::<Vec<_>>(), out_shape, &Device::Cpu)
}

/// `log Σ exp` along the middle axis into `out_shape`; `back` is the CPU op's backward.
pub(crate) fn logsumexp(
    t: &Tensor,
    split: (usize, usize, usize),
    out_shape: &[usize],
    back: impl BackwardOp + 'static,
) -> Result<Tensor> {
    check_gpu_float("logsumexp", t)?;
    let (g, out) = reduce_mid(t, MidReduction::LogSumExp, split)?;
    tensor(g, out, out_shape, t.dtype(), &[t], back)
}

/// `x` with rows `src[j]` added into rows `idx[j]` (a leading dimension; duplicates add up, in
/// an order the GPU's atomics choose). `back` is the CPU op's backward.
pub(crate) fn index_add_rows(
    x: &Tensor,
    idx: &[usize],
    src: &Tensor,
    inner: usize,
    back: impl BackwardOp + 'static,
) -> Result<Tensor> {
    check_gpu_float("index_add", x)?;
    let dev = x.device();
    let (xp, sp) = (packed(x)?, packed(src)?);
    let ids = ids_u32("index_add", idx)?;
    let (g, out) = with_buffers([&xp, &sp], |g, [xb, sb]| {
        let mut out = g.stream.clone_dtod(xb).map_err(driver_error(dev, "copying on the GPU"))?;
        if !ids.is_empty() && inner > 0 {
            let ids_dev = upload(g, dev, &ids)?;
            g.embedding_backward_dev((&sb.slice(..), &ids_dev), &mut out, (ids.len(), inner))
                .map_err(gpu_error(dev))?;
        }
        Ok((g.clone(), out))
    })?;
    tensor(g, out, x.dims(), x.dtype(), &[x, src], back)
}

/// `src` written into the `window` (a view of its storage) of the contiguous CUDA tensor `dst`,
/// in place ([`Tensor::write_window`]).
pub(crate) fn write_window(dst: &Tensor, window: &Layout, src: &Tensor) -> Result<()> {
    let dev = dst.device();
    let s = Strided::new(window.shape(), (window.strides(), window.offset()), (window.strides(), window.offset()))
        .map_err(gpu_error(dev))?;
    // A contiguous source in a storage of its own: dst's is write-locked while it is read.
    let sp = if Arc::ptr_eq(&src.0.storage, &dst.0.storage) { contiguous(&src.detach())? } else { packed(src)? };
    let n = src.elem_count();
    let source = sp.0.storage.read().expect("tensor storage lock poisoned");
    let mut target = dst.0.storage.write().expect("tensor storage lock poisoned");
    let (Storage::Cuda(d), Storage::Cuda(sc)) = (&mut *target, &*source) else {
        return Err(Error::invalid("write_window", "a host tensor reached the CUDA backend"));
    };
    let g = d.gpu.clone();
    match (&mut d.buf, &sc.buf) {
        (CudaBuf::F32(d), CudaBuf::F32(x)) => g.strided_write_dev(&x.slice(..), &s, d, n),
        (CudaBuf::Bf16(d), CudaBuf::Bf16(x)) => g.strided_write_dev(&x.slice(..), &s, d, n),
        _ => return Err(Error::UnsupportedDType { op: "write_window", dtype: dst.dtype(), why: GPU_DTYPES }),
    }
    .map_err(gpu_error(dev))
}

/// Runs `f` on the values of a contiguous CUDA tensor in place, through the host (copy out, `f`,
/// copy back): for small, rare writes such as the router's balancing bias or loading a
/// checkpoint, not for anything per element per step.
pub(crate) fn with_f32_mut<R>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    let (start, len, dev) = (t.layout().offset(), t.elem_count(), t.device());
    let mut guard = t.0.storage.write().expect("tensor storage lock poisoned");
    let Storage::Cuda(c) = &mut *guard else {
        return Err(Error::invalid("with_f32_mut", "a host tensor reached the CUDA backend"));
    };
    let stream = c.gpu.stream.clone();
    let buf = c.f32_mut("with_f32_mut")?;
    let mut host =
        stream.clone_dtoh(&buf.slice(start..start + len)).map_err(driver_error(dev, "copying to the host"))?;
    let r = f(&mut host);
    if len > 0 {
        let back = &mut buf.slice_mut(start..start + len);
        stream.memcpy_htod(&host, back).map_err(driver_error(dev, "copying to the GPU"))?;
    }
    Ok(r)
}

/// One fused AdamW step of a contiguous CUDA parameter with its gradient and moments (f32 or bf16
/// CUDA tensors of the parameter's length), all updated in place on the GPU.
pub(crate) fn adamw_step(
    p: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hp: &whale_kernels::cpu::adamw::AdamWStep,
) -> Result<()> {
    if !p.is_contiguous() {
        return Err(Error::Params("AdamW updates a parameter in place: it must be contiguous, not a view".into()));
    }
    let (start, n, dev) = (p.layout().offset(), p.elem_count(), p.device());
    // One GPU for all four: a kernel on the parameter's GPU reading another's buffers faults
    // (or, with peer access, silently works across the link).
    if let Some(t) = [grad, m, v].into_iter().find(|t| t.device() != dev) {
        return Err(Error::DeviceMismatch { op: "AdamW", lhs: dev, rhs: t.device() });
    }
    let g = packed(grad)?;
    let gguard = g.0.storage.read().expect("tensor storage lock poisoned");
    let (mut pg, mut mg, mut vg) = (
        p.0.storage.write().expect("tensor storage lock poisoned"),
        m.0.storage.write().expect("tensor storage lock poisoned"),
        v.0.storage.write().expect("tensor storage lock poisoned"),
    );
    match (&mut *pg, &*gguard, &mut *mg, &mut *vg) {
        (Storage::Cuda(pc), Storage::Cuda(gc), Storage::Cuda(mc), Storage::Cuda(vc)) => {
            let gpu = pc.gpu.clone();
            let (pb, gb) = (pc.f32_mut("AdamW")?, gc.f32("AdamW")?);
            let (mut pv, gv) = (pb.slice_mut(start..start + n), gb.slice(..n));
            match (&mut mc.buf, &mut vc.buf) {
                (CudaBuf::F32(m), CudaBuf::F32(v)) => {
                    gpu.adamw_step_dev(&mut pv, &gv, (m, v), n, hp).map_err(gpu_error(dev))
                }
                // bf16 moments (DeepSeek-V3's recipe), as on the CPU: widened to f32 (exact), one
                // f32 step, rounded back to nearest even; one fused launch.
                (CudaBuf::Bf16(m), CudaBuf::Bf16(v)) => {
                    gpu.adamw_step_bf16_dev(&mut pv, &gv, (m, v), n, hp).map_err(gpu_error(dev))
                }
                _ => Err(Error::invalid("AdamW", "the two moments of a parameter must share a dtype (f32 or bf16)")),
            }
        }
        _ => Err(Error::invalid("AdamW", "a CUDA parameter needs its gradient and moments on the same GPU")),
    }
}
