//! Views (reshape, transpose, permute, narrow, broadcast, squeeze/unsqueeze) that share storage,
//! and the copying shape ops (contiguous, dtype casts, cat, stack).

use super::{check_float, split_at_dim};
use crate::backprop::backward_fn;
use crate::layout::Layout;
use crate::{DType, Device, Error, Result, Tensor};

impl Tensor {
    /// A view of the same storage under a new layout, differentiable through `back`.
    fn view(
        &self,
        layout: Layout,
        name: &'static str,
        back: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Tensor {
        let op = backward_fn(name, move |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(back(&inputs[0], g)?)])
        });
        Tensor::with_history(self.0.storage.clone(), layout, self.dtype(), &[self], op)
    }

    /// Same elements, new shape. A view when the tensor is contiguous; otherwise a copy first.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        // Checked: a product that wraps could equal the element count.
        let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if n != Some(self.elem_count()) {
            return Err(Error::invalid(
                "reshape",
                format!("cannot view {:?} ({} elements) as {shape:?}", self.dims(), self.elem_count()),
            ));
        }
        if !self.is_contiguous() {
            return self.contiguous()?.reshape(shape);
        }
        Ok(self.view(self.layout().reshaped(shape), "reshape", |x, g| g.reshape(x.dims())))
    }

    pub fn flatten_all(&self) -> Result<Tensor> {
        self.reshape(&[self.elem_count()])
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Tensor> {
        let layout = self.layout().transpose(d0, d1)?;
        Ok(self.view(layout, "transpose", move |_, g| g.transpose(d0, d1)))
    }

    /// Swaps the last two dimensions (a matrix transpose of every batch item).
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return Err(Error::invalid("t", format!("rank {} has no last two dims", self.rank())));
        }
        self.transpose(self.rank() - 2, self.rank() - 1)
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let layout = self.layout().permute(perm)?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(self.view(layout, "permute", move |_, g| g.permute(&inverse)))
    }

    /// Elements `start..start+len` of `dim`, a view.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let layout = self.layout().narrow(dim, start, len)?;
        Ok(self.view(layout, "narrow", move |x, g| g.pad_into(x.dims(), dim, start)))
    }

    /// A zero tensor of `shape` with `self` written at `start` along `dim` (narrow's backward).
    fn pad_into(&self, shape: &[usize], dim: usize, start: usize) -> Result<Tensor> {
        if self.device().is_cuda() {
            return crate::cuda::pad_into(self, shape, dim, start);
        }
        let (outer, full, inner) = split_at_dim(shape, dim);
        let len = self.dims()[dim];
        let src = self.f32_data()?;
        let mut out = vec![0.0f32; outer * full * inner];
        for o in 0..outer {
            let dst = (o * full + start) * inner;
            out[dst..dst + len * inner].copy_from_slice(&src[o * len * inner..(o + 1) * len * inner]);
        }
        let back = backward_fn("pad", move |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(g.narrow(dim, start, len)?)])
        });
        Ok(Tensor::from_op(out, shape, self.dtype(), &[self], back))
    }

    /// A stride-0 view repeating size-1 (or missing leading) dims up to `shape`.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as(shape)?;
        Ok(self.view(layout, "broadcast_as", |x, g| g.sum_to_shape(x.dims())))
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        self.layout().check_dim("squeeze", dim)?;
        if self.dims()[dim] != 1 {
            return Err(Error::invalid("squeeze", format!("dim {dim} of {:?} is not 1", self.dims())));
        }
        let mut shape = self.dims().to_vec();
        shape.remove(dim);
        let mut strides = self.layout().strides().to_vec();
        strides.remove(dim);
        let layout = Layout::from_parts(shape, strides, self.layout().offset());
        Ok(self.view(layout, "squeeze", move |_, g| g.unsqueeze(dim)))
    }

    /// Inserts a dimension of size 1 at `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return Err(Error::DimOutOfRange { op: "unsqueeze", dim, rank: self.rank() });
        }
        let mut shape = self.dims().to_vec();
        shape.insert(dim, 1);
        let mut strides = self.layout().strides().to_vec();
        let s = if dim < self.rank() { strides[dim] * self.dims()[dim] } else { 1 };
        strides.insert(dim, s);
        let layout = Layout::from_parts(shape, strides, self.layout().offset());
        Ok(self.view(layout, "unsqueeze", move |_, g| g.squeeze(dim)))
    }

    /// A row-major copy unless already contiguous (then `self`).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        if self.device().is_cuda() {
            return crate::cuda::contiguous(self);
        }
        let storage = self.0.storage.read().expect("tensor storage lock poisoned");
        let storage = crate::storage::Storage::Cpu(storage.host(self.device())?.gather_same(self.layout()));
        let storage = crate::storage::SharedStorage::new(storage);
        let op =
            backward_fn("contiguous", |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| Ok(vec![Some(g.clone())]));
        Ok(Tensor::with_history(storage, Layout::contiguous(self.dims()), self.dtype(), &[self], op))
    }

    /// Converts to `dtype` (float to float rounds to nearest even; the gradient is cast back;
    /// integer to integer is exact, wrapping into u32 as torch's cast does).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if self.device().is_cuda() {
            return crate::cuda::to_dtype(self, dtype);
        }
        if !self.dtype().is_float() && !dtype.is_float() {
            // Not through f32, whose 24-bit mantissa would round an index past 2^24.
            let v = self.to_vec_i64()?;
            return match dtype {
                DType::U32 => {
                    Tensor::from_vec(v.into_iter().map(|x| x as u32).collect::<Vec<u32>>(), self.dims(), &Device::Cpu)
                }
                _ => Tensor::from_vec(v, self.dims(), &Device::Cpu),
            };
        }
        let values = self.f32_data()?.to_vec();
        if self.dtype().is_float() && dtype.is_float() {
            let back = backward_fn("to_dtype", |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
                Ok(vec![Some(g.to_dtype(inputs[0].dtype())?)])
            });
            Ok(Tensor::from_op(values, self.dims(), dtype, &[self], back))
        } else {
            Ok(Tensor::from_op(values, self.dims(), dtype, &[], crate::backprop::NoBackward))
        }
    }

    /// Concatenates along `dim`; all other dims must agree.
    pub fn cat(tensors: &[Tensor], dim: usize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| Error::invalid("cat", "no tensors"))?;
        first.layout().check_dim("cat", dim)?;
        for t in tensors {
            super::check_float_any_device("cat", t)?;
            if t.dtype() != first.dtype() {
                return Err(Error::DTypeMismatch { op: "cat", lhs: first.dtype(), rhs: t.dtype() });
            }
            let ok = t.rank() == first.rank()
                && t.dims().iter().zip(first.dims()).enumerate().all(|(d, (a, b))| d == dim || a == b);
            if !ok {
                return Err(Error::ShapeMismatch { op: "cat", lhs: first.dims().to_vec(), rhs: t.dims().to_vec() });
            }
        }
        let total: usize = tensors.iter().map(|t| t.dims()[dim]).sum();
        let mut shape = first.dims().to_vec();
        shape[dim] = total;
        let narrows = |starts: Vec<(usize, usize)>| {
            backward_fn("cat", move |_: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
                starts
                    .iter()
                    .zip(needs)
                    .map(|(&(s, l), &n)| if n { g.narrow(dim, s, l).map(Some) } else { Ok(None) })
                    .collect()
            })
        };
        if first.device().is_cuda() {
            let starts = tensors
                .iter()
                .scan(0, |at, t| {
                    let len = t.dims()[dim];
                    *at += len;
                    Some((*at - len, len))
                })
                .collect();
            return crate::cuda::cat(tensors, dim, &shape, narrows(starts));
        }
        for t in tensors {
            check_float("cat", t)?;
        }
        let (outer, _, inner) = split_at_dim(&shape, dim);
        let mut out = vec![0.0f32; shape.iter().product()];
        let mut at = 0;
        let mut starts = Vec::with_capacity(tensors.len());
        for t in tensors {
            let len = t.dims()[dim];
            let src = t.f32_data()?;
            for o in 0..outer {
                let dst = (o * total + at) * inner;
                out[dst..dst + len * inner].copy_from_slice(&src[o * len * inner..(o + 1) * len * inner]);
            }
            starts.push((at, len));
            at += len;
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        Ok(Tensor::from_op(out, &shape, first.dtype(), &refs, narrows(starts)))
    }

    /// Stacks equally shaped tensors along a new dimension `dim`.
    pub fn stack(tensors: &[Tensor], dim: usize) -> Result<Tensor> {
        let expanded = tensors.iter().map(|t| t.unsqueeze(dim)).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&expanded, dim)
    }

    /// Splits `dim` into consecutive views of the given sizes (which must add up to the dim).
    pub fn split(&self, sizes: &[usize], dim: usize) -> Result<Vec<Tensor>> {
        let n = self.dim(dim)?;
        if sizes.iter().sum::<usize>() != n {
            return Err(Error::invalid(
                "split",
                format!("sizes {sizes:?} do not add up to {n} (dim {dim} of {:?})", self.dims()),
            ));
        }
        let mut at = 0;
        sizes
            .iter()
            .map(|&s| {
                let t = self.narrow(dim, at, s);
                at += s;
                t
            })
            .collect()
    }

    /// Splits `dim` into `n` nearly equal views (the last may be smaller).
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let size = self.dim(dim)?;
        if n == 0 {
            return Err(Error::invalid("chunk", "zero chunks"));
        }
        let step = size.div_ceil(n);
        let mut sizes = Vec::new();
        let mut left = size;
        while left > 0 {
            sizes.push(step.min(left));
            left -= step.min(left);
        }
        self.split(&sizes, dim)
    }
}
