//! Reductions over one dimension (sum, mean, max, argmax, logsumexp) and over everything.

use rayon::prelude::*;

use super::{check_float_any_device, split_at_dim};
use crate::backprop::backward_fn;
use crate::{DType, Device, Error, Result, Tensor};

/// Reduces `[outer, n, inner]` over the middle axis with `f(values along n) -> value`, in parallel
/// over outer rows.
fn reduce_mid(
    x: &[f32],
    outer: usize,
    n: usize,
    inner: usize,
    f: impl Fn(&mut dyn Iterator<Item = f32>) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = vec![0.0f32; outer * inner];
    if inner == 0 {
        return out;
    }
    out.par_chunks_mut(inner).enumerate().for_each(|(o, row)| {
        let base = o * n * inner;
        for (i, r) in row.iter_mut().enumerate() {
            *r = f(&mut (0..n).map(|j| x[base + j * inner + i]));
        }
    });
    out
}

fn keepdim_shape(shape: &[usize], dim: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[dim] = 1;
    s
}

impl Tensor {
    /// Sum over `dim`, keeping it as size 1. Accumulates in f64.
    pub fn sum_keepdim(&self, dim: usize) -> Result<Tensor> {
        check_float_any_device("sum", self)?;
        self.layout().check_dim("sum", dim)?;
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        if self.device().is_cuda() {
            return crate::cuda::sum_mid(self, (outer, n, inner), &keepdim_shape(self.dims(), dim));
        }
        let out = reduce_mid(&self.f32_data()?, outer, n, inner, |it| it.map(f64::from).sum::<f64>() as f32);
        let back = backward_fn("sum", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(g.broadcast_as(inputs[0].dims())?)])
        });
        Ok(Tensor::from_op(out, &keepdim_shape(self.dims(), dim), self.dtype(), &[self], back))
    }

    pub fn sum(&self, dim: usize) -> Result<Tensor> {
        self.sum_keepdim(dim)?.squeeze(dim)
    }

    /// The mean over `dim`, kept as size 1: for bf16/f16, summed and scaled in f32 and rounded
    /// once, as torch's mean (rounded after the sum and again after the scale, `mean([1, 2, 258])`
    /// in bf16 gave 86.5 where torch gives 87).
    pub fn mean_keepdim(&self, dim: usize) -> Result<Tensor> {
        let n = self.dim(dim)?;
        self.in_f32(|x| x.sum_keepdim(dim)?.div_by_count(n))
    }

    /// This sum divided by the `n` values it summed, as torch's mean (`sum / n`, and the gradient
    /// `g / n`): a product with a rounded `1 / n` is one ulp off about a quarter of the time.
    fn div_by_count(&self, n: usize) -> Result<Tensor> {
        self.div(&Tensor::full(n as f32, &[], self.dtype(), &self.device())?)
    }

    /// `f` of this tensor widened to f32 (a bf16/f16 one; an f32 one as it is), rounded back to
    /// this dtype once.
    fn in_f32(&self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self.dtype() {
            DType::BF16 | DType::F16 => f(&self.to_dtype(DType::F32)?)?.to_dtype(self.dtype()),
            _ => f(self),
        }
    }

    pub fn mean(&self, dim: usize) -> Result<Tensor> {
        self.mean_keepdim(dim)?.squeeze(dim)
    }

    /// Sum of all elements, a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        self.flatten_all()?.sum(0)
    }

    /// The mean of all elements, a rank-0 tensor (bf16/f16 rounded once, as [`Tensor::mean_keepdim`]).
    pub fn mean_all(&self) -> Result<Tensor> {
        let n = self.elem_count();
        self.in_f32(|x| x.sum_all()?.div_by_count(n))
    }

    /// Max over `dim`, kept as size 1. The gradient goes to the first maximal element.
    pub fn max_keepdim(&self, dim: usize) -> Result<Tensor> {
        let idx = self.argmax_keepdim(dim)?;
        self.gather(dim, &idx)
    }

    pub fn max(&self, dim: usize) -> Result<Tensor> {
        self.max_keepdim(dim)?.squeeze(dim)
    }

    /// Index (i64) of the first maximum along `dim`, kept as size 1. NaN counts as the maximum.
    /// An empty `dim` is an error (as torch: no index to give).
    pub fn argmax_keepdim(&self, dim: usize) -> Result<Tensor> {
        check_float_any_device("argmax", self)?;
        self.layout().check_dim("argmax", dim)?;
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let shape = keepdim_shape(self.dims(), dim);
        if n == 0 && outer * inner > 0 {
            return Err(Error::invalid("argmax", format!("dimension {dim} of {:?} is empty", self.dims())));
        }
        if self.device().is_cuda() {
            return crate::cuda::argmax(self, (outer, n, inner), &shape);
        }
        let x = self.f32_data()?;
        let mut out = vec![0i64; outer * inner];
        if inner > 0 {
            out.par_chunks_mut(inner).enumerate().for_each(|(o, row)| {
                let base = o * n * inner;
                for (i, r) in row.iter_mut().enumerate() {
                    let mut best = (0usize, f32::NEG_INFINITY);
                    for j in 0..n {
                        let v = x[base + j * inner + i];
                        if v.is_nan() {
                            best.0 = j;
                            break;
                        }
                        if v > best.1 || j == 0 {
                            best = (j, v);
                        }
                    }
                    *r = best.0 as i64;
                }
            });
        }
        Tensor::from_vec(out, &shape, &Device::Cpu)
    }

    pub fn argmax(&self, dim: usize) -> Result<Tensor> {
        self.argmax_keepdim(dim)?.squeeze(dim)
    }

    /// `log(sum(exp(x)))` over `dim`, kept as size 1, computed stably (max subtracted).
    pub fn logsumexp_keepdim(&self, dim: usize) -> Result<Tensor> {
        check_float_any_device("logsumexp", self)?;
        self.layout().check_dim("logsumexp", dim)?;
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let back = backward_fn("logsumexp", |inputs: &[Tensor], out: &Tensor, g: &Tensor, _: &[bool]| {
            // d lse / dx = softmax(x) = exp(x - lse)
            let p = inputs[0].sub(out)?.exp()?;
            Ok(vec![Some(p.mul(g)?)])
        });
        if self.device().is_cuda() {
            return crate::cuda::logsumexp(self, (outer, n, inner), &keepdim_shape(self.dims(), dim), back);
        }
        let x = self.f32_data()?;
        let out = reduce_mid(&x, outer, n, inner, |it| {
            let v: Vec<f32> = it.collect();
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m.is_infinite() {
                // All -inf: -inf; a +inf: +inf; NaN if a NaN is there too (f32::max skips it), as
                // torch.logsumexp.
                return if v.iter().any(|x| x.is_nan()) { f32::NAN } else { m };
            }
            m + v.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32
        });
        Ok(Tensor::from_op(out, &keepdim_shape(self.dims(), dim), self.dtype(), &[self], back))
    }

    pub fn logsumexp(&self, dim: usize) -> Result<Tensor> {
        self.logsumexp_keepdim(dim)?.squeeze(dim)
    }

    /// Sums broadcast dimensions away so the result has `shape` (the backward of broadcasting).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let extra = self.rank().checked_sub(shape.len()).ok_or_else(|| crate::Error::Broadcast {
            op: "sum_to_shape",
            from: shape.to_vec(),
            to: self.dims().to_vec(),
        })?;
        let mut t = self.clone();
        for _ in 0..extra {
            t = t.sum(0)?;
        }
        for (d, &s) in shape.iter().enumerate() {
            if s == 1 && t.dims()[d] != 1 {
                t = t.sum_keepdim(d)?;
            }
        }
        if t.dims() != shape {
            return Err(crate::Error::Broadcast { op: "sum_to_shape", from: shape.to_vec(), to: self.dims().to_vec() });
        }
        Ok(t)
    }
}
