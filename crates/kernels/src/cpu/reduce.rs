//! Fixed-order, vectorisable reductions shared by the kernels.
//!
//! Each one accumulates into `LANES` independent accumulators, element `i` of the main part going
//! to lane `i % LANES`: the loops vectorise and the summation order depends only on the length, so
//! results are reproducible bit for bit. The elements past the last full group of `LANES` are summed
//! on their own, in order, into a tail. The lanes are summed in order at the end, then the tail is
//! added; a tree-shaped fold of the lanes makes LLVM vectorise the main loop only two lanes wide.
//!
//! `LANES` is chosen by each caller (and fixes its summation order): enough accumulators to hide the
//! add latency and fill wide SIMD registers.

/// Dot product of two equal-length vectors.
#[inline]
pub(crate) fn dot<const LANES: usize>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    for (x, y) in ca.zip(cb) {
        let (x, y): (&[f32; LANES], &[f32; LANES]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `sum(x)`.
#[inline]
pub(crate) fn sum<const LANES: usize>(x: &[f32]) -> f32 {
    sum_map::<LANES>(x, |v| v)
}

/// `sum(exp(x - max))`: the normaliser of a softmax whose inputs are shifted by their maximum.
#[inline]
pub(crate) fn sum_exp<const LANES: usize>(x: &[f32], max: f32) -> f32 {
    sum_map::<LANES>(x, |v| super::expf::expf(v - max))
}

/// `sum(f(x))`.
#[inline]
fn sum_map<const LANES: usize>(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().unwrap();
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Largest element; `-inf` for an empty slice. NaNs are skipped (as [`f32::max`] does).
#[inline]
pub(crate) fn max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}
