//! Fused RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * weight`, row by row.

use rayon::prelude::*;

use super::reduce;
use super::rows_per_task;

/// Accumulator lanes of the row reductions (see [`super::reduce`]); fixes their summation order.
const LANES: usize = 16;

/// At most this many per-chunk partial sums of `dweight` are kept, so the scratch stays
/// `O(dim)` however many rows there are.
const MAX_DWEIGHT_PARTIALS: usize = 64;

/// `x`: `[rows, dim]`, `weight`: `[dim]` -> `y`: `[rows, dim]`, `rstd`: `[rows]` (saved for backward).
pub fn rmsnorm_forward(x: &[f32], weight: &[f32], dim: usize, eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let rows = rstd.len();
    assert_eq!(x.len(), rows * dim, "rmsnorm_forward: x is not [rows, dim]");
    assert_eq!(y.len(), x.len(), "rmsnorm_forward: y is not [rows, dim]");
    assert_eq!(weight.len(), dim, "rmsnorm_forward: weight is not [dim]");
    if dim == 0 {
        // The mean of no squares is taken as 0.
        rstd.fill(1.0 / eps.sqrt());
        return;
    }
    let chunk = rows_per_task(dim);
    y.par_chunks_mut(chunk * dim).zip(x.par_chunks(chunk * dim)).zip(rstd.par_chunks_mut(chunk)).for_each(
        |((y, x), rstd)| {
            for ((y, x), r) in y.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(rstd) {
                *r = 1.0 / (reduce::dot::<LANES>(x, x) / dim as f32 + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                    *y = x * *r * w;
                }
            }
        },
    );
}

/// Backward of [`rmsnorm_forward`]. `dx` (`[rows, dim]`) and `dweight` (`[dim]`) are each optional so the
/// input gradient and the weight gradient can be computed in separate calls (ZeroBubble B/W split).
/// Both are overwritten, not accumulated.
pub fn rmsnorm_backward(
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dim: usize,
    dx: Option<&mut [f32]>,
    dweight: Option<&mut [f32]>,
) {
    let rows = rstd.len();
    assert_eq!(x.len(), rows * dim, "rmsnorm_backward: x is not [rows, dim]");
    assert_eq!(dy.len(), x.len(), "rmsnorm_backward: dy is not [rows, dim]");
    assert_eq!(weight.len(), dim, "rmsnorm_backward: weight is not [dim]");
    if let Some(dx) = &dx {
        assert_eq!(dx.len(), x.len(), "rmsnorm_backward: dx is not [rows, dim]");
    }
    if let Some(dw) = &dweight {
        assert_eq!(dw.len(), dim, "rmsnorm_backward: dweight is not [dim]");
    }
    if dim == 0 {
        return;
    }

    let Some(dweight) = dweight else {
        if let Some(dx) = dx {
            let chunk = rows_per_task(dim);
            dx.par_chunks_mut(chunk * dim)
                .zip(x.par_chunks(chunk * dim))
                .zip(dy.par_chunks(chunk * dim))
                .zip(rstd.par_chunks(chunk))
                .for_each(|(((dx, x), dy), rstd)| input_grad(x, weight, rstd, dy, dx));
        }
        return;
    };

    // dweight sums over rows: each chunk of rows writes its own partial sum (in parallel, and the
    // dx of those rows alongside when requested), then the partials are added in chunk order. The
    // chunking depends only on the sizes, so the result is reproducible bit for bit.
    let chunk = rows_per_task(dim).max(rows.div_ceil(MAX_DWEIGHT_PARTIALS));
    let mut partials = vec![0.0f32; rows.div_ceil(chunk) * dim];
    let chunks = partials
        .par_chunks_mut(dim)
        .zip(x.par_chunks(chunk * dim))
        .zip(dy.par_chunks(chunk * dim))
        .zip(rstd.par_chunks(chunk));
    match dx {
        Some(dx) => chunks.zip(dx.par_chunks_mut(chunk * dim)).for_each(|((((dw, x), dy), rstd), dx)| {
            input_grad(x, weight, rstd, dy, dx);
            weight_grad(x, rstd, dy, dw);
        }),
        None => chunks.for_each(|(((dw, x), dy), rstd)| weight_grad(x, rstd, dy, dw)),
    }
    dweight.fill(0.0);
    for partial in partials.chunks_exact(dim) {
        for (dw, p) in dweight.iter_mut().zip(partial) {
            *dw += p;
        }
    }
}

/// `dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x))` for each row of a block.
fn input_grad(x: &[f32], weight: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32]) {
    let dim = weight.len();
    let mut wdy = vec![0.0f32; dim];
    for (((dx, x), dy), &r) in dx.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(dy.chunks_exact(dim)).zip(rstd) {
        for ((g, &d), &w) in wdy.iter_mut().zip(dy).zip(weight) {
            *g = w * d;
        }
        let c = r * r * (reduce::dot::<LANES>(&wdy, x) / dim as f32);
        for ((dx, &g), &x) in dx.iter_mut().zip(&wdy).zip(x) {
            *dx = r * (g - x * c);
        }
    }
}

/// `dw = sum over the rows of a block of dy * x * rstd`, in row order.
fn weight_grad(x: &[f32], rstd: &[f32], dy: &[f32], dw: &mut [f32]) {
    let dim = dw.len();
    for ((x, dy), &r) in x.chunks_exact(dim).zip(dy.chunks_exact(dim)).zip(rstd) {
        for ((dw, &x), &d) in dw.iter_mut().zip(x).zip(dy) {
            *dw += d * x * r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, bits, Rng};

    /// f64 reference: (y, rstd).
    fn reference_forward(x: &[f32], w: &[f32], dim: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; x.len()];
        let mut rstd = vec![];
        for (yr, xr) in y.chunks_mut(dim).zip(x.chunks(dim)) {
            let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            for j in 0..dim {
                yr[j] = xr[j] as f64 * r * w[j] as f64;
            }
            rstd.push(r);
        }
        (y, rstd)
    }

    /// f64 reference gradients by differentiating `sum(dy * y)` analytically: (dx, dweight).
    fn reference_backward(x: &[f32], w: &[f32], dy: &[f32], dim: usize, eps: f32) -> (Vec<f64>, Vec<f64>) {
        let (_, rstd) = reference_forward(x, w, dim, eps);
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; dim];
        for (row, &r) in rstd.iter().enumerate() {
            let xr = &x[row * dim..][..dim];
            let dyr = &dy[row * dim..][..dim];
            let c: f64 = (0..dim).map(|j| w[j] as f64 * dyr[j] as f64 * xr[j] as f64).sum::<f64>() / dim as f64;
            for j in 0..dim {
                dx[row * dim + j] = r * (w[j] as f64 * dyr[j] as f64 - xr[j] as f64 * r * r * c);
                dw[j] += dyr[j] as f64 * xr[j] as f64 * r;
            }
        }
        (dx, dw)
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = Rng::new(7);
        for (rows, dim) in [(5, 37), (3, 1), (2049, 8), (1, 300)] {
            let x = rng.vec(rows * dim, 1.0);
            let w = rng.vec(dim, 1.0);
            let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
            rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
            let (want_y, want_rstd) = reference_forward(&x, &w, dim, 1e-6);
            assert_close(&y, &want_y, 1e-5, "y");
            for (&r, &want) in rstd.iter().zip(&want_rstd) {
                assert!((r as f64 - want).abs() <= 1e-5 * want, "rstd {r} vs {want}");
            }
        }
    }

    #[test]
    fn backward_reference_matches_finite_differences() {
        let (rows, dim, eps) = (3, 5, 1e-2);
        let mut rng = Rng::new(11);
        let (x, w, dy) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
        let (dx, dw) = reference_backward(&x, &w, &dy, dim, eps);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let (y, _) = reference_forward(x, w, dim, eps);
            y.iter().zip(&dy).map(|(y, &d)| y * d as f64).sum()
        };
        // The reference takes f32 inputs; perturb by a representable step and divide by it exactly.
        let h = 1.0f32 / 1024.0;
        for i in 0..x.len() {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * h as f64);
            assert!((fd - dx[i]).abs() < 1e-4, "dx[{i}]: fd {fd} vs {}", dx[i]);
        }
        for j in 0..dim {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[j] += h;
            wm[j] -= h;
            let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * h as f64);
            assert!((fd - dw[j]).abs() < 1e-6, "dw[{j}]: fd {fd} vs {}", dw[j]);
        }
    }

    #[test]
    fn backward_matches_reference_together_and_split() {
        let mut rng = Rng::new(3);
        for (rows, dim) in [(7, 33), (4, 1), (3000, 9), (1, 260)] {
            let (x, w, dy) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
            let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
            rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
            let (want_dx, want_dw) = reference_backward(&x, &w, &dy, dim, 1e-6);

            let (mut dx, mut dw) = (vec![f32::NAN; rows * dim], vec![f32::NAN; dim]);
            rmsnorm_backward(&x, &w, &rstd, &dy, dim, Some(&mut dx), Some(&mut dw));
            assert_close(&dx, &want_dx, 1e-5, "dx");
            assert_close(&dw, &want_dw, 1e-5, "dweight");

            let mut dx_only = vec![f32::NAN; rows * dim];
            rmsnorm_backward(&x, &w, &rstd, &dy, dim, Some(&mut dx_only), None);
            assert_eq!(dx_only, dx, "dx-only call differs from the fused call");
            let mut dw_only = vec![f32::NAN; dim];
            rmsnorm_backward(&x, &w, &rstd, &dy, dim, None, Some(&mut dw_only));
            assert_eq!(dw_only, dw, "dweight-only call differs from the fused call");
        }
    }

    #[test]
    fn empty_input_is_a_no_op() {
        let (mut y, mut rstd) = (vec![], vec![]);
        rmsnorm_forward(&[], &[1.0; 4], 4, 1e-6, &mut y, &mut rstd);
        let mut dw = vec![f32::NAN; 4];
        rmsnorm_backward(&[], &[1.0; 4], &[], &[], 4, Some(&mut []), Some(&mut dw));
        assert_eq!(dw, [0.0; 4]);
    }

    #[test]
    fn independent_of_the_thread_count() {
        let (rows, dim) = (5000, 24);
        let mut rng = Rng::new(6);
        let (x, w, dy) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut dw = vec![0.0; dim];
            pool.install(|| rmsnorm_backward(&x, &w, &rstd, &dy, dim, None, Some(&mut dw)));
            bits(&dw)
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn deterministic() {
        let (rows, dim) = (5000, 24);
        let mut rng = Rng::new(5);
        let (x, w, dy) = (rng.vec(rows * dim, 1.0), rng.vec(dim, 1.0), rng.vec(rows * dim, 1.0));
        let run = || {
            let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
            rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
            let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
            rmsnorm_backward(&x, &w, &rstd, &dy, dim, Some(&mut dx), Some(&mut dw));
            (y, rstd, dx, dw)
        };
        let (a, b) = (run(), run());
        assert_eq!(bits(&a.0), bits(&b.0));
        assert_eq!(bits(&a.1), bits(&b.1));
        assert_eq!(bits(&a.2), bits(&b.2));
        assert_eq!(bits(&a.3), bits(&b.3));
    }
}
