//! Indexing: index_select / index_add (whole slices along a dim), gather / scatter_add
//! (elementwise, PyTorch semantics), embedding lookup and top-k.
//!
//! Scatters run sequentially over the source so duplicate indices add up in a fixed order.

use rayon::prelude::*;

use super::{check_float_any_device, split_at_dim};
use crate::backprop::backward_fn;
use crate::tensor::F32Data;
use crate::{Error, Result, Tensor};

/// The indices of `ids` as `usize`, each checked against `size`.
fn checked_indices(op: &'static str, ids: &Tensor, size: usize) -> Result<Vec<usize>> {
    ids.to_vec_i64()?
        .into_iter()
        .map(|i| {
            if i >= 0 && (i as usize) < size {
                Ok(i as usize)
            } else {
                Err(Error::IndexOutOfRange { op, index: i, size })
            }
        })
        .collect()
}

/// The indices `idx` (checked from `ids`) as a tensor of their own, for a backward: kept as
/// `ids` itself, a later in-place write to `ids` would move the gradient to other rows unseen
/// (the version check covers an op's inputs, which the indices are not).
fn kept_indices(ids: &Tensor, idx: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(idx.iter().map(|&i| i as i64).collect::<Vec<_>>(), ids.dims(), &ids.device())
}

fn with_dim(shape: &[usize], dim: usize, size: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[dim] = size;
    s
}

/// The row-major positions of slices `idx` along the middle axis of `[outer, n, inner]`, in the
/// order of `[outer, idx.len(), inner]`: how the CUDA path selects slices past a leading dim.
fn slice_elements((outer, n, inner): (usize, usize, usize), idx: &[usize]) -> Vec<usize> {
    let m = idx.len();
    (0..outer * m * inner).map(|p| (p / (m * inner) * n + idx[p / inner % m]) * inner + p % inner).collect()
}

impl Tensor {
    /// `self` with `src`'s elements (row-major) added at the row-major positions `flat`: the CUDA
    /// path of scatters past a leading dim, an index_add along the flattened tensor.
    fn add_at_elements(&self, flat: &[usize], src: &Tensor) -> Result<Tensor> {
        let ids: Vec<i64> = flat.iter().map(|&i| i as i64).collect();
        let ids = Tensor::from_vec(ids, &[flat.len()], &crate::Device::Cpu)?;
        self.flatten_all()?.index_add(0, &ids, &src.flatten_all()?)?.reshape(self.dims())
    }

    /// Slices `ids[j]` of `dim`, in order: `out.narrow(dim, j, 1) == self.narrow(dim, ids[j], 1)`.
    pub fn index_select(&self, dim: usize, ids: &Tensor) -> Result<Tensor> {
        check_float_any_device("index_select", self)?;
        self.layout().check_dim("index_select", dim)?;
        if ids.rank() != 1 {
            return Err(Error::invalid("index_select", format!("ids must be 1-D, got {:?}", ids.dims())));
        }
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let idx = checked_indices("index_select", ids, n)?;
        let m = idx.len();
        if self.device().is_cuda() {
            let shape = with_dim(self.dims(), dim, m);
            if outer == 1 {
                return crate::cuda::nn::index_select_rows(self, &idx, inner, &shape);
            }
            // Single elements of the flattened tensor.
            let flat = slice_elements((outer, n, inner), &idx);
            return crate::cuda::nn::index_select_rows(&self.flatten_all()?, &flat, 1, &[flat.len()])?.reshape(&shape);
        }
        let x = self.f32_data()?;
        let mut out = vec![0.0f32; outer * m * inner];
        if inner > 0 {
            out.par_chunks_mut(inner).enumerate().for_each(|(r, row)| {
                let (o, j) = (r / m, r % m);
                let src = (o * n + idx[j]) * inner;
                row.copy_from_slice(&x[src..src + inner]);
            });
        }
        let ids = kept_indices(ids, &idx)?;
        let back = backward_fn("index_select", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(inputs[0].zeros_like()?.index_add(dim, &ids, g)?)])
        });
        Ok(Tensor::from_op(out, &with_dim(self.dims(), dim, m), self.dtype(), &[self], back))
    }

    /// `self` with `src.narrow(dim, j, 1)` added into slice `ids[j]` of `dim`, for every j.
    pub fn index_add(&self, dim: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        super::check_same_dtype_any_device("index_add", self, src)?;
        self.layout().check_dim("index_add", dim)?;
        if ids.rank() > 1 {
            // As torch: the backward's index_select takes one row of indices.
            return Err(Error::invalid("index_add", format!("ids must be 0-D or 1-D, got shape {:?}", ids.dims())));
        }
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let idx = checked_indices("index_add", ids, n)?;
        let m = idx.len();
        if src.dims() != with_dim(self.dims(), dim, m).as_slice() {
            return Err(Error::ShapeMismatch {
                op: "index_add",
                lhs: with_dim(self.dims(), dim, m),
                rhs: src.dims().to_vec(),
            });
        }
        let ids_kept = kept_indices(ids, &idx)?.flatten_all()?;
        let back = backward_fn("index_add", move |_: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            Ok(vec![
                if needs[0] { Some(g.clone()) } else { None },
                if needs[1] { Some(g.index_select(dim, &ids_kept)?) } else { None },
            ])
        });
        if self.device().is_cuda() {
            if outer == 1 {
                return crate::cuda::index_add_rows(self, &idx, src, inner, back);
            }
            // Single elements of the flattened tensor.
            return self.add_at_elements(&slice_elements((outer, n, inner), &idx), src);
        }
        let mut out = self.f32_data()?.to_vec();
        let s = src.f32_data()?;
        for o in 0..outer {
            for (j, &t) in idx.iter().enumerate() {
                let (d, sr) = ((o * n + t) * inner, (o * m + j) * inner);
                for i in 0..inner {
                    out[d + i] += s[sr + i];
                }
            }
        }
        Ok(Tensor::from_op(out, self.dims(), self.dtype(), &[self, src], back))
    }

    /// Embedding lookup: `self` is the table `[vocab, dim]`, `ids` any shape -> `[..ids, dim]`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::invalid("embedding", format!("table must be [vocab, dim], got {:?}", self.dims())));
        }
        let mut shape = ids.dims().to_vec();
        shape.push(self.dims()[1]);
        self.index_select(0, &ids.flatten_all()?)?.reshape(&shape)
    }

    /// `out[.., j, ..] = self[.., idx[.., j, ..], ..]` along `dim` (PyTorch `gather`); `idx` has
    /// this tensor's shape except along `dim`.
    pub fn gather(&self, dim: usize, idx: &Tensor) -> Result<Tensor> {
        check_float_any_device("gather", self)?;
        self.layout().check_dim("gather", dim)?;
        let m = idx.dim(dim)?;
        if idx.dims() != with_dim(self.dims(), dim, m).as_slice() {
            return Err(Error::ShapeMismatch { op: "gather", lhs: self.dims().to_vec(), rhs: idx.dims().to_vec() });
        }
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let ix = checked_indices("gather", idx, n)?;
        if self.device().is_cuda() {
            return crate::cuda::gather(self, dim, &ix, idx.dims());
        }
        let x = self.f32_data()?;
        let mut out = vec![0.0f32; outer * m * inner];
        for o in 0..outer {
            for j in 0..m {
                for i in 0..inner {
                    let p = (o * m + j) * inner + i;
                    out[p] = x[(o * n + ix[p]) * inner + i];
                }
            }
        }
        let shape = idx.dims().to_vec();
        let idx = kept_indices(idx, &ix)?;
        let back = backward_fn("gather", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(inputs[0].zeros_like()?.scatter_add(dim, &idx, g)?)])
        });
        Ok(Tensor::from_op(out, &shape, self.dtype(), &[self], back))
    }

    /// `self` with `src[.., j, ..]` added at `[.., idx[.., j, ..], ..]` along `dim` (PyTorch
    /// `scatter_add`); `idx` and `src` have the same shape.
    pub fn scatter_add(&self, dim: usize, idx: &Tensor, src: &Tensor) -> Result<Tensor> {
        super::check_same_dtype_any_device("scatter_add", self, src)?;
        self.layout().check_dim("scatter_add", dim)?;
        if idx.dims() != src.dims() {
            return Err(Error::ShapeMismatch { op: "scatter_add", lhs: idx.dims().to_vec(), rhs: src.dims().to_vec() });
        }
        let m = idx.dim(dim)?;
        if idx.dims() != with_dim(self.dims(), dim, m).as_slice() {
            return Err(Error::ShapeMismatch {
                op: "scatter_add",
                lhs: self.dims().to_vec(),
                rhs: idx.dims().to_vec(),
            });
        }
        let (outer, n, inner) = split_at_dim(self.dims(), dim);
        let ix = checked_indices("scatter_add", idx, n)?;
        if self.device().is_cuda() {
            // An index_add of single elements of the flattened tensor (its backward: gather).
            return self.add_at_elements(&crate::cuda::flat_indices(self.dims(), dim, m, &ix), src);
        }
        let mut out = self.f32_data()?.to_vec();
        let s = src.f32_data()?;
        for o in 0..outer {
            for j in 0..m {
                for i in 0..inner {
                    let p = (o * m + j) * inner + i;
                    out[(o * n + ix[p]) * inner + i] += s[p];
                }
            }
        }
        let idx = kept_indices(idx, &ix)?;
        let back = backward_fn("scatter_add", move |_: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            Ok(vec![
                if needs[0] { Some(g.clone()) } else { None },
                if needs[1] { Some(g.gather(dim, &idx)?) } else { None },
            ])
        });
        Ok(Tensor::from_op(out, self.dims(), self.dtype(), &[self, src], back))
    }

    /// The `k` largest values along the last dim, in descending order, and their indices (i64).
    /// Ties go to the lower index; NaN ranks above every number. Values are differentiable
    /// (through `gather`), indices are not. On a GPU the values are ranked on the host (one copy
    /// out) and gathered on the GPU; the indices are host data, as every index tensor here.
    pub fn topk(&self, k: usize) -> Result<(Tensor, Tensor)> {
        check_float_any_device("topk", self)?;
        let last = self.rank().checked_sub(1).ok_or_else(|| Error::invalid("topk", "rank-0 tensor"))?;
        let n = self.dims()[last];
        if k > n {
            return Err(Error::invalid("topk", format!("k = {k} exceeds the last dim {n} of {:?}", self.dims())));
        }
        let x = if self.device().is_cuda() { F32Data::Owned(self.to_vec_f32()?) } else { self.f32_data()? };
        let rows = x.len().checked_div(n).unwrap_or(0);
        let mut idx = vec![0i64; rows * k];
        if k > 0 {
            idx.par_chunks_mut(k).enumerate().for_each(|(r, out)| {
                let row = &x[r * n..(r + 1) * n];
                let mut order: Vec<usize> = (0..n).collect();
                let key = |i: usize| if row[i].is_nan() { f32::INFINITY } else { row[i] };
                let cmp = |&a: &usize, &b: &usize| {
                    let (ka, kb) = (key(a), key(b));
                    let nan = (row[b].is_nan() as u8).cmp(&(row[a].is_nan() as u8));
                    nan.then(kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)).then(a.cmp(&b))
                };
                if k < n {
                    order.select_nth_unstable_by(k - 1, cmp);
                }
                order[..k].sort_by(cmp);
                for (o, &i) in out.iter_mut().zip(&order[..k]) {
                    *o = i as i64;
                }
            });
        }
        let shape = with_dim(self.dims(), last, k);
        let indices = Tensor::from_vec(idx, &shape, &crate::Device::Cpu)?;
        let values = self.gather(last, &indices)?;
        Ok((values, indices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_elements_name_what_index_select_picks() {
        let x =
            Tensor::from_vec((0..24).map(|v| v as f32).collect::<Vec<_>>(), &[2, 3, 4], &crate::Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![2i64, 0, 2], &[3], &crate::Device::Cpu).unwrap();
        let want = x.index_select(1, &ids).unwrap().to_vec_f32().unwrap();
        let picked: Vec<f32> = slice_elements((2, 3, 4), &[2, 0, 2]).iter().map(|&i| i as f32).collect();
        assert_eq!(picked, want);
    }
}
