//! Softmax and log-softmax over the last dimension, row by row, with backward.

use rayon::prelude::*;

use super::expf::expf;
use super::{reduce, rows_per_task, wide_fn};

/// Accumulator lanes of the row reductions (see [`super::reduce`]); fixes their summation order.
const LANES: usize = 16;

/// `x`, `y`: [rows, dim]. Numerically stable (max subtracted).
pub fn softmax_forward(x: &[f32], dim: usize, y: &mut [f32]) {
    rowwise(x, x, dim, y, "softmax_forward", |x, _, y| softmax_row_wide(x, y));
}

wide_fn!(fn softmax_row_wide => softmax_row(x: &[f32], y: &mut [f32]));

/// `y = exp(x - max(x))`; returns `max(x)`.
#[inline(always)]
fn exp_less_max(x: &[f32], y: &mut [f32]) -> f32 {
    let max = reduce::max(x);
    for (y, &x) in y.iter_mut().zip(x) {
        *y = expf(x - max);
    }
    max
}

#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32]) {
    exp_less_max(x, y);
    let sum = reduce::sum::<LANES>(y);
    for y in y.iter_mut() {
        *y /= sum;
    }
}

/// `dx = y * (dy - sum(dy * y))` per row, from the forward output `y`.
pub fn softmax_backward(y: &[f32], dy: &[f32], dim: usize, dx: &mut [f32]) {
    rowwise(y, dy, dim, dx, "softmax_backward", |y, dy, dx| {
        let s = reduce::dot::<LANES>(dy, y);
        for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
            *dx = y * (dy - s);
        }
    });
}

/// `y = x - logsumexp(x)` per row.
pub fn log_softmax_forward(x: &[f32], dim: usize, y: &mut [f32]) {
    rowwise(x, x, dim, y, "log_softmax_forward", |x, _, y| log_softmax_row_wide(x, y));
}

wide_fn!(fn log_softmax_row_wide => log_softmax_row(x: &[f32], y: &mut [f32]));

#[inline(always)]
fn log_softmax_row(x: &[f32], y: &mut [f32]) {
    let max = exp_less_max(x, y);
    let log_sum = reduce::sum::<LANES>(y).ln();
    // (x - max) - ln(sum) rather than x - lse: the first difference is exact near the max.
    for (y, &x) in y.iter_mut().zip(x) {
        *y = (x - max) - log_sum;
    }
}

/// `dx = dy - exp(y) * sum(dy)` per row, from the forward output `y`.
pub fn log_softmax_backward(y: &[f32], dy: &[f32], dim: usize, dx: &mut [f32]) {
    rowwise(y, dy, dim, dx, "log_softmax_backward", log_softmax_backward_row_wide);
}

wide_fn!(fn log_softmax_backward_row_wide => log_softmax_backward_row(y: &[f32], dy: &[f32], dx: &mut [f32]));

#[inline(always)]
fn log_softmax_backward_row(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let s = reduce::sum::<LANES>(dy);
    for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
        *dx = dy - expf(y) * s;
    }
}

/// Runs `f(a_row, b_row, out_row)` over the rows of three [rows, dim] buffers, in parallel chunks
/// whose size depends only on `dim`.
fn rowwise(
    a: &[f32],
    b: &[f32],
    dim: usize,
    out: &mut [f32],
    what: &str,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) {
    assert_eq!(a.len(), out.len(), "{what}: input and output differ in length");
    assert_eq!(b.len(), out.len(), "{what}: inputs differ in length");
    if dim == 0 {
        return;
    }
    assert_eq!(out.len() % dim, 0, "{what}: length {} is not a multiple of dim {dim}", out.len());
    let chunk = rows_per_task(dim) * dim;
    out.par_chunks_mut(chunk).zip(a.par_chunks(chunk)).zip(b.par_chunks(chunk)).for_each(|((out, a), b)| {
        for ((out, a), b) in out.chunks_exact_mut(dim).zip(a.chunks_exact(dim)).zip(b.chunks_exact(dim)) {
            f(a, b, out);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, bits, Rng};

    /// f64 reference log-softmax of each row.
    fn reference_log_softmax(x: &[f32], dim: usize) -> Vec<f64> {
        let mut out = vec![];
        for row in x.chunks(dim) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            out.extend(row.iter().map(|&v| v as f64 - lse));
        }
        out
    }

    /// f64 reference Jacobian-vector products: dx_j = sum_k dy_k * d y_k / d x_j.
    fn reference_backward(x: &[f32], dy: &[f32], dim: usize, log: bool) -> Vec<f64> {
        let p: Vec<f64> = reference_log_softmax(x, dim).iter().map(|l| l.exp()).collect();
        let mut dx = vec![0.0; x.len()];
        for r in 0..x.len() / dim {
            let (p, dy) = (&p[r * dim..][..dim], &dy[r * dim..][..dim]);
            for j in 0..dim {
                dx[r * dim + j] = (0..dim)
                    .map(|k| {
                        let delta = if j == k { 1.0 } else { 0.0 };
                        // d log p_k / d x_j = delta - p_j;  d p_k / d x_j = p_k (delta - p_j).
                        let jac = if log { delta - p[j] } else { p[k] * (delta - p[j]) };
                        dy[k] as f64 * jac
                    })
                    .sum();
            }
        }
        dx
    }

    #[test]
    fn softmax_forward_and_backward_match_reference() {
        let mut rng = Rng::new(1);
        for (rows, dim, scale) in [(4, 37, 3.0), (6, 1, 1.0), (2, 300, 30.0), (1100, 17, 5.0)] {
            let x = rng.vec(rows * dim, scale);
            let dy = rng.vec(rows * dim, 1.0);
            let mut y = vec![0.0; rows * dim];
            softmax_forward(&x, dim, &mut y);
            let want: Vec<f64> = reference_log_softmax(&x, dim).iter().map(|l| l.exp()).collect();
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-5 * w, "softmax[{i}]: {g} vs {w}");
            }
            let mut dx = vec![0.0; rows * dim];
            softmax_backward(&y, &dy, dim, &mut dx);
            assert_close(&dx, &reference_backward(&x, &dy, dim, false), 1e-5, "softmax dx");
        }
    }

    #[test]
    fn log_softmax_forward_and_backward_match_reference() {
        let mut rng = Rng::new(2);
        for (rows, dim, scale) in [(4, 37, 3.0), (6, 1, 1.0), (2, 300, 30.0), (1100, 17, 5.0)] {
            let x = rng.vec(rows * dim, scale);
            let dy = rng.vec(rows * dim, 1.0);
            let mut y = vec![0.0; rows * dim];
            log_softmax_forward(&x, dim, &mut y);
            let want = reference_log_softmax(&x, dim);
            for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "log_softmax[{i}]: {g} vs {w}");
            }
            let mut dx = vec![0.0; rows * dim];
            log_softmax_backward(&y, &dy, dim, &mut dx);
            assert_close(&dx, &reference_backward(&x, &dy, dim, true), 1e-5, "log_softmax dx");
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = [1000.0f32, 999.0, -1000.0];
        let mut y = [0.0; 3];
        softmax_forward(&x, 3, &mut y);
        assert!((y[0] - 0.7310586).abs() < 1e-6 && (y[1] - 0.26894143).abs() < 1e-6 && y[2] == 0.0);
        log_softmax_forward(&x, 3, &mut y);
        // ln(1 + e^-1 + e^-2000) = 0.313_261_687_5...
        assert!((y[0] as f64 + 0.313_261_687_5).abs() < 1e-6 && (y[2] as f64 + 2_000.313_261_687_5).abs() < 1e-3);
    }

    #[test]
    fn empty_input_is_a_no_op() {
        softmax_forward(&[], 5, &mut []);
        softmax_backward(&[], &[], 5, &mut []);
        log_softmax_forward(&[], 5, &mut []);
        log_softmax_backward(&[], &[], 5, &mut []);
    }

    #[test]
    fn deterministic() {
        let (rows, dim) = (3000, 31);
        let mut rng = Rng::new(9);
        let (x, dy) = (rng.vec(rows * dim, 4.0), rng.vec(rows * dim, 1.0));
        let run = || {
            let (mut y, mut dx, mut ly, mut ldx) =
                (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
            softmax_forward(&x, dim, &mut y);
            softmax_backward(&y, &dy, dim, &mut dx);
            log_softmax_forward(&x, dim, &mut ly);
            log_softmax_backward(&ly, &dy, dim, &mut ldx);
            [y, dx, ly, ldx].map(|v| bits(&v))
        };
        assert_eq!(run(), run());
    }
}
