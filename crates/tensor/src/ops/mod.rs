//! Tensor ops, one file per family, each op's forward beside its backward.

pub(crate) mod dispatch;
mod elementwise;
mod index;
mod matmul;
pub(crate) mod nn;
mod reduce;
mod shape;

use rayon::prelude::*;

use crate::{DType, Error, Result, Tensor};

/// Below this many elements an elementwise loop runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
/// Elements per rayon task in elementwise loops (a pure function of the length: reproducible).
const PAR_CHUNK: usize = 1 << 13;

/// `out[i] = f(x[i])`.
pub(crate) fn par_map_into(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    debug_assert_eq!(x.len(), out.len());
    if x.len() < PAR_MIN {
        out.iter_mut().zip(x).for_each(|(o, &a)| *o = f(a));
    } else {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(o, a)| {
            o.iter_mut().zip(a).for_each(|(o, &a)| *o = f(a));
        });
    }
}

pub(crate) fn par_map2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    debug_assert_eq!(x.len(), y.len());
    let mut out = vec![0.0f32; x.len()];
    if x.len() < PAR_MIN {
        for i in 0..x.len() {
            out[i] = f(x[i], y[i]);
        }
    } else {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK).zip(y.par_chunks(PAR_CHUNK))).for_each(
            |(o, (a, b))| {
                for i in 0..o.len() {
                    o[i] = f(a[i], b[i]);
                }
            },
        );
    }
    out
}

pub(crate) fn par_map3(x: &[f32], y: &[f32], z: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    debug_assert!(x.len() == y.len() && y.len() == z.len());
    let mut out = vec![0.0f32; x.len()];
    if x.len() < PAR_MIN {
        for i in 0..x.len() {
            out[i] = f(x[i], y[i], z[i]);
        }
    } else {
        out.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, o)| {
            let base = c * PAR_CHUNK;
            for i in 0..o.len() {
                o[i] = f(x[base + i], y[base + i], z[base + i]);
            }
        });
    }
    out
}

/// A float tensor on a device this process can use; ops with a CUDA path check this, then
/// dispatch on the device.
pub(crate) fn check_float_any_device(op: &'static str, t: &Tensor) -> Result<()> {
    t.device().check_available()?;
    if !t.dtype().is_float() {
        return Err(Error::UnsupportedDType { op, dtype: t.dtype(), why: "a float tensor is required" });
    }
    Ok(())
}

/// A float tensor on the CPU: the check of ops that only have a CPU path, so a CUDA tensor gets
/// an error naming the op instead of a silent round trip through the host.
pub(crate) fn check_float(op: &'static str, t: &Tensor) -> Result<()> {
    check_float_any_device(op, t)?;
    if t.device().is_cuda() {
        return Err(Error::NoCudaKernel { op });
    }
    Ok(())
}

/// Refuses an input the op passes no gradient to (`what` it is) when that input would want one:
/// a variable, or a result of variables, with gradients recorded. Detaching it (or running under
/// `no_grad`) says the gradient is not wanted; otherwise it would silently stay `None`.
pub(crate) fn check_no_gradient_wanted(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    if crate::backprop::is_grad_enabled() && t.requires_grad() {
        return Err(Error::invalid(
            op,
            format!("{what} is not differentiated here but requires a gradient: detach it, or run under no_grad"),
        ));
    }
    Ok(())
}

/// Two float tensors of one dtype on one device (any device): for ops with a CUDA path.
pub(crate) fn check_same_dtype_any_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    check_float_any_device(op, a)?;
    check_float_any_device(op, b)?;
    if a.device() != b.device() {
        return Err(Error::DeviceMismatch { op, lhs: a.device(), rhs: b.device() });
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DTypeMismatch { op, lhs: a.dtype(), rhs: b.dtype() });
    }
    Ok(a.dtype())
}

/// Two float tensors of one dtype on the CPU (see [`check_float`]).
pub(crate) fn check_same_dtype(op: &'static str, a: &Tensor, b: &Tensor) -> Result<DType> {
    let dtype = check_same_dtype_any_device(op, a, b)?;
    check_float(op, a)?;
    Ok(dtype)
}

pub(crate) fn check_shape(op: &'static str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::ShapeMismatch { op, lhs: t.dims().to_vec(), rhs: want.to_vec() });
    }
    Ok(())
}

/// Splits `shape` around `dim` into (outer, size, inner) element counts.
pub(crate) fn split_at_dim(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    let outer = shape[..dim].iter().product();
    let inner = shape[dim + 1..].iter().product();
    (outer, shape[dim], inner)
}

/// Gradient-slot helper: `Some(f()?)` when `need`, else `None`.
pub(crate) fn grad_if(need: bool, f: impl FnOnce() -> Result<Tensor>) -> Result<Option<Tensor>> {
    if need {
        f().map(Some)
    } else {
        Ok(None)
    }
}
