//! FP8 on the GPU (`fp8.rs` holds the ops and their CPU paths): quantisation into FP8 codes kept
//! on the GPU, dequantisation, the FP8 linear layer, whose Fprop, Dgrad and Wgrad GEMMs run on
//! the block-scaled FP8 GEMM kernels with the operands quantized on the GPU too, and the rounding
//! of the FP8 dispatch. The kernels' formats are the recipe's: E4M3 codes with f32 or
//! power-of-two scales. The GEMMs accumulate on the tensor cores and promote every 128 of K, as
//! DeepGEMM does.

use std::sync::Arc;

use whale_kernels::cpu::fp8::{Fp8Format, ScaleFormat, GRADIENT_MIN_AMAX, MIN_AMAX};
use whale_kernels::cuda::cudarc::driver::{CudaSlice, CudaView};
use whale_kernels::cuda::{Fp8Operand, Fp8View, Gpu};

use super::{alloc, check_gpu_float, driver_error, gpu_error, packed, tensor, with_buffer};
use crate::backprop::{backward_fn, NoBackward};
use crate::storage::{CudaBuf, CudaStorage, Storage};
use crate::{DType, Device, Error, Result, Tensor};

/// The weight of an FP8 linear layer.
#[derive(Clone, Copy)]
pub(crate) enum Fp8Weight<'a> {
    /// An f32 master weight on the GPU, quantized in 128x128 blocks every call (training).
    Master(&'a Tensor),
    /// A weight stored in FP8 (E4M3 codes and their 128x128-block scales, on the host or on the
    /// input's GPU): frozen, as loaded from a DeepSeek-V3 checkpoint.
    Stored { codes: &'a Tensor, scales: &'a Tensor },
}

/// A fresh CUDA tensor of FP8 codes, without history.
fn codes_tensor(g: Arc<Gpu>, codes: CudaSlice<u8>, shape: &[usize], format: Fp8Format) -> Tensor {
    super::wrap(g, CudaBuf::Fp8(codes, format), shape, &[], NoBackward)
}

/// Runs `f` on the GPU and the codes (and format) of a contiguous FP8 tensor on it, 16-byte
/// aligned as the tensor-core GEMMs' vector loads need (a view starting elsewhere in its buffer
/// is copied; fresh buffers are aligned).
fn with_codes<R>(t: &Tensor, f: impl FnOnce(&Arc<Gpu>, CudaView<'_, u8>, Fp8Format) -> Result<R>) -> Result<R> {
    if !t.is_contiguous() {
        return Err(Error::invalid("fp8 codes", "FP8 codes on a GPU must be contiguous"));
    }
    let guard = t.0.storage.read().expect("tensor storage lock poisoned");
    let (start, n) = (t.layout().offset(), t.elem_count());
    match &*guard {
        Storage::Cuda(CudaStorage { gpu, buf: CudaBuf::Fp8(codes, format) }) if start % 16 != 0 => {
            let copy = gpu.stream.clone_dtod(&codes.slice(start..start + n));
            f(gpu, copy.map_err(driver_error(t.device(), "aligning FP8 codes"))?.slice(..), *format)
        }
        Storage::Cuda(CudaStorage { gpu, buf: CudaBuf::Fp8(codes, format) }) => {
            f(gpu, codes.slice(start..start + n), *format)
        }
        _ => Err(Error::UnsupportedDType { op: "fp8 codes", dtype: t.dtype(), why: "FP8 codes on a GPU are needed" }),
    }
}

/// The codes of `t` (`[rows, cols]`) on the host or on a GPU, as a CUDA tensor.
pub(crate) fn codes_to_device(t: &Tensor, ordinal: usize) -> Result<Tensor> {
    let format = t.dtype().fp8_format().ok_or_else(|| Error::invalid("to_device", "not FP8 codes"))?;
    if t.device() == Device::Cuda(ordinal) {
        return Ok(t.clone());
    }
    let g = crate::device::gpu(ordinal)?;
    let codes = super::upload(&g, Device::Cuda(ordinal), &t.fp8_codes()?)?;
    Ok(codes_tensor(g, codes, t.dims(), format))
}

/// E4M3 codes (a CUDA tensor of `x`'s shape) and the scales of the 2-D `x` in `block_rows` x 128
/// blocks (1 or 128; the caller checks), each block scaled for at least `floor.0`, its scale an
/// f32 or a power of two (`floor.1`).
pub(crate) fn quantize(x: &Tensor, block_rows: usize, floor: (f32, ScaleFormat)) -> Result<(Tensor, Tensor)> {
    check_gpu_float("quantize_fp8", x)?;
    let (rows, cols, dev) = (x.dims()[0], x.dims()[1], x.device());
    let xp = packed(x)?;
    let (g, q) = with_buffer(&xp, |g, xb| {
        let q = g.fp8_quantize_dev(&xb.slice(..), (rows, cols), block_rows, floor);
        Ok((g.clone(), q.map_err(gpu_error(dev))?))
    })?;
    let grid = [rows.div_ceil(block_rows), cols.div_ceil(128)];
    let scales = tensor(g.clone(), q.scales, &grid, DType::F32, &[], NoBackward)?;
    Ok((codes_tensor(g, q.codes, &[rows, cols], Fp8Format::E4M3), scales))
}

/// `code * scale` per block of CUDA codes with their scales on the same GPU (any block, either
/// format; the caller checked the scale grid's shape).
pub(crate) fn dequantize(codes: &Tensor, scales: &Tensor, block: (usize, usize)) -> Result<Tensor> {
    check_gpu_float("dequantize_fp8 (scales)", scales)?;
    let (rows, cols, dev) = (codes.dims()[0], codes.dims()[1], codes.device());
    let sp = packed(scales)?;
    let (g, out) = with_codes(codes, |g, cv, format| {
        with_buffer(&sp, |_, sb| {
            let mut out = alloc(g, dev, rows * cols)?;
            g.fp8_dequantize_dev((&cv, &sb.slice(..)), &mut out, (rows, cols), (block, format))
                .map_err(gpu_error(dev))?;
            Ok((g.clone(), out))
        })
    })?;
    tensor(g, out, &[rows, cols], DType::F32, &[], NoBackward)
}

/// `x @ Wᵀ` for `x` `[..., k]` (f32 or bf16 on a GPU) and `weight` `[n, k]`, with the three GEMMs
/// in FP8, as the CPU's `fp8_linear`: Fprop on `x` in 1x128 tiles and W in 128x128 blocks; Dgrad
/// on `dy` in 1x128 tiles and Wᵀ (the forward's blocks transposed: they are square); Wgrad on
/// `dyᵀ` and `xᵀ` in 1x128 tiles along the tokens. `x`'s tiles take `scales.1`, the master
/// weight's blocks and `dy`'s tiles `scales.0` (the recipe's `input_scales` and
/// `scale_format`). A master weight's FP8 blocks are kept from the forward for the Dgrad GEMM
/// (one byte per weight), and its gradient comes back in its own dtype; a stored weight is
/// frozen.
pub(crate) fn linear(
    x: &Tensor,
    weight: Fp8Weight<'_>,
    (n, k): (usize, usize),
    (w_scales, x_scales): (ScaleFormat, ScaleFormat),
) -> Result<Tensor> {
    check_gpu_float("fp8_linear", x)?;
    let dev = x.device();
    let m = x.elem_count() / k.max(1);
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let xp = packed(x)?;
    // Each operand is quantized under its own read lock, released before the next is taken.
    let (g, xq) = with_buffer(&xp, |g, xb| {
        Ok((g.clone(), g.fp8_quantize_dev(&xb.slice(..), (m, k), 1, (MIN_AMAX, x_scales)).map_err(gpu_error(dev))?))
    })?;
    let mut y = alloc(&g, dev, m * n)?;
    let mut gemm =
        |w: &Fp8View<'_>| g.fp8_gemm_dev(&xq.view(), w, &mut y, g.fp8_gemm_kernel(k)).map_err(gpu_error(dev));
    // What the Dgrad GEMM reads: a master weight's blocks from here, a stored weight as it is.
    let kept = match weight {
        Fp8Weight::Master(w) => {
            let wq = weight_blocks(w, w_scales)?;
            gemm(&wq.view())?;
            Kept::Blocks(wq)
        }
        Fp8Weight::Stored { codes, scales } => {
            with_stored(&g, (codes, scales), |w| gemm(w))?;
            Kept::Stored(codes.clone(), scales.clone())
        }
    };
    let back = backward_fn("fp8_linear", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, needs: &[bool]| {
        // A master weight comes back as the op's second input.
        let weight = inputs.get(1).filter(|_| needs[1]).map(|w| (w.dims(), w.dtype()));
        let (dx, dw) = linear_grads(&inputs[0], Some(&kept), grad, (w_scales, x_scales), (needs[0], weight))?;
        Ok(std::iter::once(dx).chain(inputs.get(1).map(|_| dw)).collect())
    });
    let inputs: Vec<&Tensor> = match weight {
        Fp8Weight::Master(w) => vec![x, w],
        Fp8Weight::Stored { .. } => vec![x],
    };
    tensor(g, y, &out_shape, x.dtype(), &inputs, back)
}

/// The FP8 weight a linear layer's backward reads (for the Dgrad GEMM): a master weight's
/// blocks, quantized in the forward, or a stored weight's codes and scales.
pub(crate) enum Kept {
    Blocks(Arc<Fp8Operand>),
    Stored(Tensor, Tensor),
}

/// The FP8 linear layer's backward on a GPU, for `x` `[..., k]` and `dy` `[..., n]`: Dgrad on
/// `dy` in 1x128 tiles and Wᵀ (the weight's blocks transposed: they are square) when `need_x`
/// (which needs `weight`); Wgrad on `dyᵀ` and `xᵀ` in 1x128 tiles along the tokens when
/// `dw` gives the master weight's shape and dtype. `scales` as [`linear`]'s.
pub(crate) fn linear_grads(
    x: &Tensor,
    weight: Option<&Kept>,
    grad: &Tensor,
    (w_scales, x_scales): (ScaleFormat, ScaleFormat),
    (need_x, dw): (bool, Option<(&[usize], DType)>),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (dev, k, n) = (x.device(), x.dims()[x.rank() - 1], grad.dims()[grad.rank() - 1]);
    let m = x.elem_count() / k.max(1);
    let dy = packed(grad)?.reshape(&[m, n])?;
    let dx = if need_x {
        let weight = weight.ok_or_else(|| Error::invalid("fp8_linear", "the input's gradient needs the weight"))?;
        // Dgrad: [m, n] x ([k, n])ᵀ, K = n.
        let dx = with_buffer(&dy, |g, dyb| {
            let dyq =
                g.fp8_quantize_dev(&dyb.slice(..), (m, n), 1, (GRADIENT_MIN_AMAX, w_scales)).map_err(gpu_error(dev))?;
            let transpose = |w: &Fp8View<'_>| g.fp8_transpose_dev(w).map_err(gpu_error(dev));
            let wt = match weight {
                Kept::Blocks(wq) => transpose(&wq.view())?,
                Kept::Stored(codes, scales) => with_stored(g, (codes, scales), transpose)?,
            };
            let mut dx = alloc(g, dev, m * k)?;
            g.fp8_gemm_dev(&dyq.view(), &wt.view(), &mut dx, g.fp8_gemm_kernel(n)).map_err(gpu_error(dev))?;
            Ok((g.clone(), dx))
        })?;
        Some(tensor(dx.0, dx.1, x.dims(), x.dtype(), &[], NoBackward)?)
    } else {
        None
    };
    let dw = match dw {
        Some((dims, dtype)) => {
            // Wgrad: dyᵀ [n, m] x (xᵀ [k, m])ᵀ, K = m (the tokens): both transposes quantized
            // in 1x128 tiles along it, straight from dy and x, zero-padded to a multiple of 16
            // tokens so that any token count (an expert's) runs on the tensor cores.
            let xp = packed(x)?;
            let (g, dw) = super::with_buffers([&dy, &xp], |g, [dyb, xb]| {
                let quantize = |b: &CudaSlice<f32>, cols, floor| {
                    g.fp8_quantize_transposed_dev(&b.slice(..), (m, cols), floor, 16).map_err(gpu_error(dev))
                };
                let (dyt, xt) =
                    (quantize(dyb, n, (GRADIENT_MIN_AMAX, w_scales))?, quantize(xb, k, (MIN_AMAX, x_scales))?);
                let mut dw = alloc(g, dev, n * k)?;
                g.fp8_gemm_dev(&dyt.view(), &xt.view(), &mut dw, g.fp8_gemm_kernel(dyt.cols))
                    .map_err(gpu_error(dev))?;
                Ok((g.clone(), dw))
            })?;
            Some(tensor(g, dw, dims, dtype, &[], NoBackward)?)
        }
        None => None,
    };
    Ok((dx, dw))
}

/// The 128x128 blocks of a master weight `[n, k]` on a GPU.
pub(crate) fn weight_blocks(w: &Tensor, scales: ScaleFormat) -> Result<Arc<Fp8Operand>> {
    check_gpu_float("fp8_linear (weight)", w)?;
    let (n, k, dev) = (w.dims()[0], w.dims()[1], w.device());
    let wq = with_buffer(&packed(w)?, |g, wb| {
        g.fp8_quantize_dev(&wb.slice(..), (n, k), 128, (MIN_AMAX, scales)).map_err(gpu_error(dev))
    })?;
    Ok(Arc::new(wq))
}

/// `x` (rows of `cols` values, f32 or bf16) through the FP8 wire and back: E4M3 in 1x128 tiles
/// with power-of-two scales, each for at least `min_amax`, decoded. The values only (no
/// history), in `x`'s dtype and shape; `op` names the caller in errors. Twin:
/// `fp8_comm_quantize(x, cols, min_amax).dequantize()`.
pub(crate) fn comm_round(op: &'static str, x: &Tensor, cols: usize, min_amax: f32) -> Result<Tensor> {
    check_gpu_float(op, x)?;
    let rows = x.elem_count().checked_div(cols).unwrap_or(0);
    let (codes, scales) = quantize(&x.detach().reshape(&[rows, cols])?, 1, (min_amax, ScaleFormat::Ue8m0))?;
    dequantize(&codes, &scales, (1, 128))?.reshape(x.dims())?.to_dtype(x.dtype())
}

/// Runs `f` on a stored FP8 weight (`[n, k]` E4M3 codes in 128x128 blocks) as a GEMM operand on
/// `g`: read in place when its codes are on this GPU, copied in when they are on the host.
fn with_stored<R>(
    g: &Arc<Gpu>,
    (codes, scales): (&Tensor, &Tensor),
    f: impl FnOnce(&Fp8View<'_>) -> Result<R>,
) -> Result<R> {
    let dev = Device::Cuda(g.ordinal);
    if !codes.device().is_cuda() {
        let blocks = Tensor::fp8_blocks(codes, scales, (128, 128))?;
        let op = g.upload_fp8(&blocks).map_err(gpu_error(dev))?;
        return f(&op.view());
    }
    let (n, k) = (codes.dims()[0], codes.dims()[1]);
    let sp = packed(scales)?;
    with_codes(codes, |_, cv, format| {
        if format != Fp8Format::E4M3 {
            return Err(Error::invalid("fp8_linear", "the GPU's FP8 GEMM reads E4M3 weights"));
        }
        with_buffer(&sp, |_, sb| f(&Fp8View { codes: cv, scales: sb.slice(..), rows: n, cols: k, block_rows: 128 }))
    })
}
