//! SwiGLU: `out = silu(gate) * up`, elementwise.

use rayon::prelude::*;

use super::expf::expf;
use super::wide_fn;

use super::{map_chunks, ELEMENTWISE_CHUNK as CHUNK};

pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(gate.len(), out.len(), "swiglu_forward: gate and out differ in length");
    assert_eq!(up.len(), out.len(), "swiglu_forward: up and out differ in length");
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((out, gate), up)| forward_chunk_wide(gate, up, out));
}

wide_fn!(fn forward_chunk_wide => forward_chunk(gate: &[f32], up: &[f32], out: &mut [f32]));

#[inline(always)]
fn forward_chunk(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

/// Each of `dgate` and `dup` is optional (only the requested gradients are computed); overwritten.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: Option<&mut [f32]>, dup: Option<&mut [f32]>) {
    assert_eq!(up.len(), gate.len(), "swiglu_backward: gate and up differ in length");
    assert_eq!(dout.len(), gate.len(), "swiglu_backward: gate and dout differ in length");
    for grad in [&dgate, &dup].into_iter().flatten() {
        assert_eq!(grad.len(), gate.len(), "swiglu_backward: a gradient has the wrong length");
    }
    let inputs = gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK));
    match (dgate, dup) {
        (Some(dgate), Some(dup)) => dgate
            .par_chunks_mut(CHUNK)
            .zip(dup.par_chunks_mut(CHUNK))
            .zip(inputs)
            .for_each(|((dg, du), ((g, u), d))| backward_chunk_wide(g, u, d, Some(dg), Some(du))),
        (Some(dgate), None) => dgate
            .par_chunks_mut(CHUNK)
            .zip(inputs)
            .for_each(|(dg, ((g, u), d))| backward_chunk_wide(g, u, d, Some(dg), None)),
        (None, Some(dup)) => dup
            .par_chunks_mut(CHUNK)
            .zip(inputs)
            .for_each(|(du, ((g, u), d))| backward_chunk_wide(g, u, d, None, Some(du))),
        (None, None) => {}
    }
}

wide_fn!(fn backward_chunk_wide => backward_chunk(
    gate: &[f32], up: &[f32], dout: &[f32], dgate: Option<&mut [f32]>, dup: Option<&mut [f32]>,
));

#[inline(always)]
fn backward_chunk(gate: &[f32], up: &[f32], dout: &[f32], dgate: Option<&mut [f32]>, dup: Option<&mut [f32]>) {
    // d silu(g) / dg = sig(g) (1 + g (1 - sig(g))), multiplied in from the left.
    let dgate_of = |g: f32, u: f32, d: f32| {
        let s = sigmoid(g);
        d * u * s * (1.0 + g * (1.0 - s))
    };
    let dup_of = |g: f32, d: f32| d * (g * sigmoid(g));
    // Zipped rather than indexed: no bounds checks in the way of vectorisation.
    let inputs = || gate.iter().zip(up).zip(dout).map(|((&g, &u), &d)| (g, u, d));
    match (dgate, dup) {
        (Some(dg), Some(du)) => {
            for ((dg, du), (g, u, d)) in dg.iter_mut().zip(du.iter_mut()).zip(inputs()) {
                (*dg, *du) = (dgate_of(g, u, d), dup_of(g, d));
            }
        }
        (Some(dg), None) => dg.iter_mut().zip(inputs()).for_each(|(dg, (g, u, d))| *dg = dgate_of(g, u, d)),
        (None, Some(du)) => du.iter_mut().zip(inputs()).for_each(|(du, (g, _, d))| *du = dup_of(g, d)),
        (None, None) => {}
    }
}

/// `d silu(x) / dx = sig(x) (1 + x (1 - sig(x)))`.
#[inline(always)]
pub fn silu_derivative(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// `out[i] = silu(x[i]) = x[i] sigmoid(x[i])`, in parallel chunks (the bf16 path's unfused
/// SwiGLU activation).
pub fn silu_forward(x: &[f32], out: &mut [f32]) {
    map_chunks("silu_forward", x, out, silu_chunk_wide);
}

wide_fn!(fn silu_chunk_wide => silu_chunk(x: &[f32], out: &mut [f32]));

#[inline(always)]
fn silu_chunk(x: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(y, &x)| *y = x * sigmoid(x));
}

/// `dx[i] = dy[i] silu'(x[i])`, in parallel chunks.
pub fn silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(x.len(), dx.len(), "silu_backward: x and dx differ in length");
    assert_eq!(dy.len(), dx.len(), "silu_backward: dy and dx differ in length");
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((dx, x), dy)| silu_backward_chunk_wide(x, dy, dx));
}

wide_fn!(fn silu_backward_chunk_wide => silu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]));

#[inline(always)]
fn silu_backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.iter_mut().zip(x.iter().zip(dy)).for_each(|(dx, (&x, &dy))| *dx = dy * silu_derivative(x));
}

/// `out[i] = sigmoid(x[i])`, in parallel chunks.
pub fn sigmoid_forward(x: &[f32], out: &mut [f32]) {
    map_chunks("sigmoid_forward", x, out, sigmoid_chunk_wide);
}

wide_fn!(fn sigmoid_chunk_wide => sigmoid_chunk(x: &[f32], out: &mut [f32]));

#[inline(always)]
fn sigmoid_chunk(x: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(x).for_each(|(y, &x)| *y = sigmoid(x));
}

/// Logistic function that never overflows: `exp` only ever sees a non-positive argument, which also
/// keeps full relative precision for large negative `x`. Branch-free (both sides share
/// `e = exp(-|x|)`), so loops over it vectorise.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = expf(-x.abs());
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::expf::expf;
    use crate::cpu::test_util::Rng;

    fn sigmoid64(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Relative error against `magnitude`, the size of the terms that make up `want`.
    fn close(got: f32, want: f64, magnitude: f64, what: &str) {
        assert!((got as f64 - want).abs() <= 1e-5 * magnitude + 1e-30, "{what}: {got} vs {want}");
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let n = 3 * CHUNK + 17;
        let mut rng = Rng::new(12);
        let (mut gate, up, dout) = (rng.vec(n, 12.0), rng.vec(n, 2.0), rng.vec(n, 1.0));
        gate[..6].copy_from_slice(&[0.0, 80.0, -80.0, 1e-3, -100.0, 200.0]);
        let mut out = vec![0.0; n];
        swiglu_forward(&gate, &up, &mut out);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&gate, &up, &dout, Some(&mut dg), Some(&mut du));
        for i in 0..n {
            let (g, u, d) = (gate[i] as f64, up[i] as f64, dout[i] as f64);
            let s = sigmoid64(g);
            close(out[i], g * s * u, (g * s * u).abs(), "out");
            close(du[i], d * g * s, (d * g * s).abs(), "dup");
            // Product rule on g * sigmoid(g), written differently from the kernel on purpose. Its two
            // terms cancel near g = -1.28, so the error is measured against their size.
            let dsilu = s + g * s * (1.0 - s);
            let terms = (d * u).abs() * (s + (g * s * (1.0 - s)).abs());
            close(dg[i], d * u * dsilu, terms, "dgate");
            assert!(out[i].is_finite() && dg[i].is_finite() && du[i].is_finite());
        }
    }

    #[test]
    fn reference_derivative_matches_finite_differences() {
        let silu = |g: f64| g * sigmoid64(g);
        for g in [-7.0, -1.3, 0.0, 0.4, 3.0] {
            let s = sigmoid64(g);
            let h = 1e-6;
            let fd = (silu(g + h) - silu(g - h)) / (2.0 * h);
            assert!((fd - (s + g * s * (1.0 - s))).abs() < 1e-8);
        }
    }

    #[test]
    fn single_gradients_match_the_fused_call() {
        let n = CHUNK + 5;
        let mut rng = Rng::new(3);
        let (gate, up, dout) = (rng.vec(n, 6.0), rng.vec(n, 1.0), rng.vec(n, 1.0));
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&gate, &up, &dout, Some(&mut dg), Some(&mut du));
        let (mut dg_only, mut du_only) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        swiglu_backward(&gate, &up, &dout, Some(&mut dg_only), None);
        swiglu_backward(&gate, &up, &dout, None, Some(&mut du_only));
        assert_eq!(dg_only, dg);
        assert_eq!(du_only, du);
        swiglu_backward(&gate, &up, &dout, None, None);
    }

    /// The logistic function as it was written before [`sigmoid`] went branch-free: `exp` of
    /// `-x` or of `x`, whichever is not positive.
    fn two_branch_sigmoid(x: f32) -> f32 {
        if x >= 0.0 {
            1.0 / (1.0 + expf(-x))
        } else {
            let e = expf(x);
            e / (1.0 + e)
        }
    }

    #[test]
    fn the_branch_free_sigmoid_is_the_two_branch_one() {
        let mut x = Rng::new(5).vec(10_000, 40.0);
        x.extend([0.0, -0.0, 1.0, -1.0, 88.0, -88.0, 104.0, -104.0, 200.0, -200.0, f32::INFINITY, f32::NEG_INFINITY]);
        let mut forward = vec![0.0; x.len()];
        sigmoid_forward(&x, &mut forward);
        for (&x, &y) in x.iter().zip(&forward) {
            assert_eq!(sigmoid(x).to_bits(), two_branch_sigmoid(x).to_bits(), "sigmoid({x})");
            assert_eq!(y.to_bits(), sigmoid(x).to_bits(), "sigmoid_forward at {x}");
        }
        assert!(sigmoid(f32::NAN).is_nan());
        assert_eq!((sigmoid(f32::INFINITY), sigmoid(f32::NEG_INFINITY), sigmoid(-0.0)), (1.0, 0.0, 0.5));
    }

    #[test]
    fn silu_kernels_are_their_scalar_formulas() {
        let n = 2 * CHUNK + 3;
        let mut rng = Rng::new(8);
        let (x, dy) = (rng.vec(n, 10.0), rng.vec(n, 1.0));
        let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
        silu_forward(&x, &mut y);
        silu_backward(&x, &dy, &mut dx);
        for i in 0..n {
            assert_eq!(y[i].to_bits(), (x[i] * sigmoid(x[i])).to_bits());
            assert_eq!(dx[i].to_bits(), (dy[i] * silu_derivative(x[i])).to_bits());
            let s = sigmoid64(x[i] as f64);
            close(dx[i], dy[i] as f64 * (s + x[i] as f64 * s * (1.0 - s)), (dy[i] as f64).abs() * 1.2, "silu'");
        }
    }

    #[test]
    fn empty_input_is_a_no_op() {
        swiglu_forward(&[], &[], &mut []);
        swiglu_backward(&[], &[], &[], Some(&mut []), Some(&mut []));
    }
}
