//! Matrix multiplication and batched matmul, on the `gemm` crate through whale-kernels.
//!
//! Operands are passed to gemm with their strides, so `x.matmul(&w.t())` (an HF linear layer) reads
//! the weight in place. Batch dims broadcast like numpy's `matmul`.

use rayon::prelude::*;
use whale_kernels::cpu::matmul::{matmul as gemm_matmul, MatRef};

use super::{check_same_dtype_any_device, grad_if};
use crate::backprop::backward_fn;
use crate::layout::broadcast_shape;
use crate::storage::{CpuStorage, Storage};
use crate::{DType, Error, Result, Tensor};

/// Below this many multiply-adds per matrix, batches run in parallel with single-threaded gemms.
const SMALL_GEMM: usize = 1 << 18;

impl Tensor {
    /// `[..., m, k] @ [..., k, n] -> [..., m, n]`.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("matmul", self, rhs)?;
        let (ra, rb) = (self.rank(), rhs.rank());
        if ra < 2 || rb < 2 {
            return Err(Error::invalid(
                "matmul",
                format!("operands need rank >= 2, got {:?} and {:?}", self.dims(), rhs.dims()),
            ));
        }
        let (m, k) = (self.dims()[ra - 2], self.dims()[ra - 1]);
        let (k2, n) = (rhs.dims()[rb - 2], rhs.dims()[rb - 1]);
        if k != k2 {
            return Err(Error::ShapeMismatch { op: "matmul", lhs: self.dims().to_vec(), rhs: rhs.dims().to_vec() });
        }
        if rb == 2 && ra > 2 {
            // [..., m, k] @ [k, n]: one big gemm over the flattened rows.
            let lead = &self.dims()[..ra - 1];
            let rows: usize = lead.iter().product();
            let mut out_shape = lead.to_vec();
            out_shape.push(n);
            return self.reshape(&[rows, k])?.matmul(rhs)?.reshape(&out_shape);
        }
        let batch = broadcast_shape("matmul", &self.dims()[..ra - 2], &rhs.dims()[..rb - 2])?;
        let a_shape: Vec<usize> = batch.iter().copied().chain([m, k]).collect();
        let b_shape: Vec<usize> = batch.iter().copied().chain([k, n]).collect();
        let out_shape: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
        let back = backward_fn("matmul", |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let (a, b) = (&inputs[0], &inputs[1]);
            Ok(vec![
                grad_if(needs[0], || g.matmul(&b.t()?)?.sum_to_shape(a.dims()))?,
                grad_if(needs[1], || a.t()?.matmul(g)?.sum_to_shape(b.dims()))?,
            ])
        });
        if self.device().is_cuda() {
            // In the operands' own dtype: cuBLAS multiplies bf16 on the tensor cores.
            let (a, b) = (self.detach().broadcast_as(&a_shape)?, rhs.detach().broadcast_as(&b_shape)?);
            let count = batch.iter().product();
            return crate::cuda::matmul((&a, &b), (count, m, n, k), &out_shape, &[self, rhs], back);
        }
        let a = as_f32(self)?.broadcast_as(&a_shape)?;
        let b = as_f32(rhs)?.broadcast_as(&b_shape)?;
        let out = batched_gemm(&a, &b, &batch, m, n, k);
        Ok(Tensor::from_op(out, &out_shape, dtype, &[self, rhs], back))
    }
}

/// The same values with f32 storage (no copy when already f32), without autograd history.
fn as_f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t.detach())
    } else {
        crate::no_grad(|| t.to_dtype(DType::F32))
    }
}

/// Offsets of each batch item's matrix in storage, for a layout whose last two dims are the matrix.
fn batch_offsets(t: &Tensor, batch: &[usize]) -> Vec<usize> {
    let strides = t.layout().strides();
    let mut offsets = vec![t.layout().offset()];
    for (d, &size) in batch.iter().enumerate() {
        offsets = offsets.iter().flat_map(|&o| (0..size).map(move |i| o + i * strides[d])).collect();
    }
    offsets
}

fn batched_gemm(a: &Tensor, b: &Tensor, batch: &[usize], m: usize, n: usize, k: usize) -> Vec<f32> {
    let (ga, gb) = (a.0.storage.read().expect("lock"), b.0.storage.read().expect("lock"));
    let (Storage::Cpu(CpuStorage::F32(da)), Storage::Cpu(CpuStorage::F32(db))) = (&*ga, &*gb) else {
        unreachable!("as_f32 made both f32 host tensors")
    };
    let (sa, sb) = (a.layout().strides(), b.layout().strides());
    let r = sa.len();
    let (oa, ob) = (batch_offsets(a, batch), batch_offsets(b, batch));
    let mat = |data, offset, s: &[usize]| MatRef {
        data,
        offset,
        row_stride: s[r - 2] as isize,
        col_stride: s[r - 1] as isize,
    };
    let mut out = vec![0.0f32; oa.len() * m * n];
    if m * n == 0 {
        return out;
    }
    let threads = rayon::current_num_threads();
    if oa.len() > 1 && m * n * k < SMALL_GEMM {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            gemm_matmul(m, n, k, mat(da, oa[i], sa), mat(db, ob[i], sb), c, false, 1);
        });
    } else {
        for (i, c) in out.chunks_mut(m * n).enumerate() {
            gemm_matmul(m, n, k, mat(da, oa[i], sa), mat(db, ob[i], sb), c, false, threads);
        }
    }
    out
}

impl Tensor {
    /// Grouped matmul (the MoE expert GEMM): rows of `x` (`[rows, in]`) come in consecutive
    /// groups of `group_sizes[e]` rows, and group `e` is multiplied by `weights[e]^T`
    /// (`weights[e]`: `[out, in]`, HF layout) -> `[rows, out]`. One gemm per non-empty group; the
    /// backward gives each weight only its own group's gradient and never materialises per-group
    /// copies of `x`.
    pub fn grouped_matmul(x: &Tensor, group_sizes: &[usize], weights: &[Tensor]) -> Result<Tensor> {
        let op = "grouped_matmul";
        if group_sizes.len() != weights.len() {
            return Err(Error::invalid(op, format!("{} group sizes for {} weights", group_sizes.len(), weights.len())));
        }
        if x.rank() != 2 {
            return Err(Error::invalid(op, format!("x must be [rows, in], got {:?}", x.dims())));
        }
        let (rows, k) = (x.dims()[0], x.dims()[1]);
        if group_sizes.iter().sum::<usize>() != rows {
            return Err(Error::invalid(op, format!("group sizes {group_sizes:?} do not add up to {rows} rows")));
        }
        let first = weights.first().ok_or_else(|| Error::invalid(op, "no groups"))?;
        let n = first.dims().first().copied().unwrap_or(0);
        for w in weights {
            check_same_dtype_any_device(op, x, w)?;
            if w.dims() != [n, k] {
                return Err(Error::ShapeMismatch { op, lhs: vec![n, k], rhs: w.dims().to_vec() });
            }
        }
        if x.device().is_cuda() {
            // One cuBLAS product per group, through differentiable views and cat. An empty group's
            // product is [0, n] but keeps its weight in the graph: its gradient is zeros, as on
            // the CPU (AdamW still decays an expert that got no tokens this step).
            let mut parts = Vec::with_capacity(weights.len());
            let mut start = 0;
            for (w, &g) in weights.iter().zip(group_sizes) {
                parts.push(x.narrow(0, start, g)?.matmul(&w.t()?)?);
                start += g;
            }
            return Tensor::cat(&parts, 0);
        }
        let xs = x.f32_data()?;
        let mut out = vec![0.0f32; rows * n];
        let threads = rayon::current_num_threads();
        let mut start = 0;
        for (w, &g) in weights.iter().zip(group_sizes) {
            if g > 0 {
                let wd = w.f32_data()?;
                let a = MatRef { data: &xs, offset: start * k, row_stride: k as isize, col_stride: 1 };
                let b = MatRef { data: &wd, offset: 0, row_stride: 1, col_stride: k as isize }; // W^T
                gemm_matmul(g, n, k, a, b, &mut out[start * n..(start + g) * n], false, threads);
            }
            start += g;
        }
        let sizes = group_sizes.to_vec();
        let back = backward_fn(op, move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let (x, ws) = (&inputs[0], &inputs[1..]);
            let gd = g.f32_data()?;
            let threads = rayon::current_num_threads();
            let mut grads: Vec<Option<Tensor>> = vec![None; inputs.len()];
            if needs[0] {
                // dx[group] = dy[group] @ W_e
                let mut dx = vec![0.0f32; rows * k];
                let mut start = 0;
                for (w, &s) in ws.iter().zip(&sizes) {
                    if s > 0 {
                        let wd = w.f32_data()?;
                        let a = MatRef { data: &gd, offset: start * n, row_stride: n as isize, col_stride: 1 };
                        let b = MatRef { data: &wd, offset: 0, row_stride: k as isize, col_stride: 1 };
                        gemm_matmul(s, k, n, a, b, &mut dx[start * k..(start + s) * k], false, threads);
                    }
                    start += s;
                }
                grads[0] = Some(Tensor::from_op(dx, x.dims(), x.dtype(), &[], crate::backprop::NoBackward));
            }
            let xs = x.f32_data()?;
            let mut start = 0;
            for (e, (w, &s)) in ws.iter().zip(&sizes).enumerate() {
                if needs[1 + e] {
                    // dW_e = dy[group]^T @ x[group]
                    let mut dw = vec![0.0f32; n * k];
                    if s > 0 {
                        let a = MatRef { data: &gd, offset: start * n, row_stride: 1, col_stride: n as isize };
                        let b = MatRef { data: &xs, offset: start * k, row_stride: k as isize, col_stride: 1 };
                        gemm_matmul(n, k, s, a, b, &mut dw, false, threads);
                    }
                    grads[1 + e] = Some(Tensor::from_op(dw, w.dims(), w.dtype(), &[], crate::backprop::NoBackward));
                }
                start += s;
            }
            Ok(grads)
        });
        let inputs: Vec<&Tensor> = std::iter::once(x).chain(weights.iter()).collect();
        Ok(Tensor::from_op(out, &[rows, n], x.dtype(), &inputs, back))
    }
}
