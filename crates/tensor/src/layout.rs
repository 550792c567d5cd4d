//! Shape, strides and offset of a tensor view over its storage. Every view op (transpose, permute,
//! narrow, broadcast, reshape of a contiguous tensor) only builds a new `Layout`.

use crate::{Error, Result};

/// Row-major strides of a contiguous tensor of this shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d;
    }
    strides
}

/// The shape two operands broadcast to (numpy rules: align right, 1 stretches).
pub fn broadcast_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(Error::ShapeMismatch { op, lhs: a.to_vec(), rhs: b.to_vec() }),
        };
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major contiguous (dims of size 1 may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    pub(crate) fn check_dim(&self, op: &'static str, dim: usize) -> Result<()> {
        if dim >= self.rank() {
            return Err(Error::DimOutOfRange { op, dim, rank: self.rank() });
        }
        Ok(())
    }

    pub fn transpose(&self, d0: usize, d1: usize) -> Result<Layout> {
        self.check_dim("transpose", d0)?;
        self.check_dim("transpose", d1)?;
        let mut l = self.clone();
        l.shape.swap(d0, d1);
        l.strides.swap(d0, d1);
        Ok(l)
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() {
            return Err(Error::invalid("permute", format!("{perm:?} is not a permutation of rank {}", self.rank())));
        }
        for &p in perm {
            if p >= self.rank() || seen[p] {
                return Err(Error::invalid(
                    "permute",
                    format!("{perm:?} is not a permutation of rank {}", self.rank()),
                ));
            }
            seen[p] = true;
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        self.check_dim("narrow", dim)?;
        // Checked: a wrapping `start + len` would pass and view memory outside the tensor.
        if start.checked_add(len).is_none_or(|end| end > self.shape[dim]) {
            return Err(Error::invalid(
                "narrow",
                format!("range of {len} from {start} exceeds size {} of dim {dim}", self.shape[dim]),
            ));
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }

    /// A view with stride 0 along the broadcast dimensions.
    pub fn broadcast_as(&self, shape: &[usize]) -> Result<Layout> {
        let err = || Error::Broadcast { op: "broadcast_as", from: self.shape.clone(), to: shape.to_vec() };
        if shape.len() < self.rank() {
            return Err(err());
        }
        let extra = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..self.rank() {
            let (from, to) = (self.shape[i], shape[i + extra]);
            strides[i + extra] = if from == to {
                self.strides[i]
            } else if from == 1 {
                0
            } else {
                return Err(err());
            };
        }
        Ok(Layout { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// Same elements under a new shape; only for contiguous layouts (the caller copies otherwise).
    pub(crate) fn reshaped(&self, shape: &[usize]) -> Layout {
        debug_assert!(self.is_contiguous());
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: self.offset }
    }

    /// Storage offsets of all elements in row-major order, visited run by run: `f(start, stride, len)`
    /// for each innermost row.
    pub(crate) fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        if self.rank() == 0 {
            f(self.offset, 1, 1);
            return;
        }
        if self.elem_count() == 0 {
            return;
        }
        if self.is_contiguous() {
            f(self.offset, 1, self.elem_count());
            return;
        }
        let last = self.rank() - 1;
        let (len, stride) = (self.shape[last], self.strides[last]);
        let mut idx = vec![0usize; last];
        let mut base = self.offset;
        loop {
            f(base, stride, len);
            // Advance the odometer over the outer dims.
            let mut d = last;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                base += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                base -= self.strides[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }

    /// Copies the viewed elements out of `src` in row-major order.
    pub(crate) fn gather<T: Copy>(&self, src: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.elem_count());
        self.for_each_run(|start, stride, len| {
            if stride == 1 {
                out.extend_from_slice(&src[start..start + len]);
            } else {
                out.extend((0..len).map(|i| src[start + i * stride]));
            }
        });
        out
    }
}

impl Layout {
    pub(crate) fn from_parts(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Layout {
        debug_assert_eq!(shape.len(), strides.len());
        Layout { shape, strides, offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_and_narrow_gather_the_right_elements() {
        let data: Vec<u32> = (0..24).collect();
        let l = Layout::contiguous(&[2, 3, 4]);
        let t = l.transpose(1, 2).unwrap();
        assert!(!t.is_contiguous());
        let g = t.gather(&data);
        assert_eq!(&g[..6], &[0, 4, 8, 1, 5, 9]);
        let n = l.narrow(2, 1, 2).unwrap();
        assert_eq!(n.gather(&data), vec![1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 21, 22]);
    }

    #[test]
    fn broadcast_rules() {
        assert_eq!(broadcast_shape("t", &[3, 1, 5], &[4, 1]).unwrap(), vec![3, 4, 5]);
        assert!(broadcast_shape("t", &[3, 2], &[4, 2]).is_err());
        let l = Layout::contiguous(&[3, 1]).broadcast_as(&[2, 3, 4]).unwrap();
        assert_eq!(l.strides(), &[0, 1, 0]);
        assert_eq!(l.gather(&[7u32, 8, 9]).len(), 24);
    }

    #[test]
    fn size_one_dims_do_not_break_contiguity() {
        let l = Layout::contiguous(&[4, 1, 3]).transpose(0, 1).unwrap();
        assert!(!l.is_contiguous() || l.shape()[0] == 1);
        assert!(Layout::contiguous(&[1, 5]).transpose(0, 1).unwrap().is_contiguous());
    }
}
