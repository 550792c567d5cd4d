//! Rotary position embedding, in both channel conventions.
//!
//! Interleaved (DeepSeek-V3 reference, GPT-J): pairs `(x[2i], x[2i+1])` are rotated by `pos * theta_i`.
//! Half-rotated (NeoX, HF Llama/Qwen2): pairs `(x[i], x[i + d/2])` are rotated by `pos * theta_i`.

use rayon::prelude::*;

use super::rows_per_task;

/// `x`, `y`: [outer, seq, heads, d] contiguous; `cos`, `sin`: [seq, d/2], the tables already gathered
/// for the position of each sequence index. `inverse` rotates by the negative angle (the backward).
pub fn rope_interleaved(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    outer: usize,
    seq: usize,
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [f32],
) {
    rotate(x, cos, sin, outer, seq, heads, d, inverse, y, |x, y, c, s, sign| {
        for (i, (&c, &s)) in c.iter().zip(s).enumerate() {
            let (x0, x1, s) = (x[2 * i], x[2 * i + 1], sign * s);
            y[2 * i] = x0 * c - x1 * s;
            y[2 * i + 1] = x0 * s + x1 * c;
        }
    });
}

/// Same as [`rope_interleaved`] with the half-rotated (NeoX) pairing.
pub fn rope_half(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    outer: usize,
    seq: usize,
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [f32],
) {
    rotate(x, cos, sin, outer, seq, heads, d, inverse, y, |x, y, c, s, sign| {
        let (x_lo, x_hi) = x.split_at(d / 2);
        let (y_lo, y_hi) = y.split_at_mut(d / 2);
        for i in 0..d / 2 {
            let (x0, x1, c, s) = (x_lo[i], x_hi[i], c[i], sign * s[i]);
            y_lo[i] = x0 * c - x1 * s;
            y_hi[i] = x0 * s + x1 * c;
        }
    });
}

/// Shared driver: checks shapes, then calls `pair(x_head, y_head, cos_row, sin_row, sign)` for every
/// head vector, in parallel over [outer, seq] rows. `sign` is -1 for the inverse rotation (exact).
fn rotate(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    outer: usize,
    seq: usize,
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [f32],
    pair: impl Fn(&[f32], &mut [f32], &[f32], &[f32], f32) + Sync,
) {
    assert!(d % 2 == 0, "rope: head dim {d} is odd");
    let half = d / 2;
    assert_eq!(x.len(), outer * seq * heads * d, "rope: x is not [outer, seq, heads, d]");
    assert_eq!(y.len(), x.len(), "rope: y is not [outer, seq, heads, d]");
    assert_eq!(cos.len(), seq * half, "rope: cos is not [seq, d/2]");
    assert_eq!(sin.len(), seq * half, "rope: sin is not [seq, d/2]");
    let row = heads * d;
    if row == 0 {
        return;
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    let chunk = rows_per_task(row);
    y.par_chunks_mut(chunk * row).zip(x.par_chunks(chunk * row)).enumerate().for_each(|(task, (y, x))| {
        for (r, (y, x)) in y.chunks_exact_mut(row).zip(x.chunks_exact(row)).enumerate() {
            let pos = (task * chunk + r) % seq;
            let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
            for (y, x) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                pair(x, y, c, s, sign);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{bits, Rng};

    /// Tables for positions `offset + s` with the usual `theta_i = base^(-2i/d)`.
    fn tables(seq: usize, d: usize, offset: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut c, mut s) = (vec![], vec![]);
        for p in 0..seq {
            for i in 0..d / 2 {
                let angle = (offset + p) as f64 * 10000f64.powf(-2.0 * i as f64 / d as f64);
                c.push(angle.cos() as f32);
                s.push(angle.sin() as f32);
            }
        }
        (c, s)
    }

    /// f64 reference rotating pair `(lo(i), hi(i))` of each head vector.
    fn reference(
        x: &[f32],
        c: &[f32],
        s: &[f32],
        (outer, seq, heads, d): (usize, usize, usize, usize),
        inverse: bool,
        pair_of: impl Fn(usize) -> (usize, usize),
    ) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        let sign = if inverse { -1.0 } else { 1.0 };
        for o in 0..outer {
            for p in 0..seq {
                for h in 0..heads {
                    let base = ((o * seq + p) * heads + h) * d;
                    for i in 0..d / 2 {
                        let (lo, hi) = pair_of(i);
                        let (x0, x1) = (x[base + lo] as f64, x[base + hi] as f64);
                        let (c, s) = (c[p * d / 2 + i] as f64, sign * s[p * d / 2 + i] as f64);
                        y[base + lo] = x0 * c - x1 * s;
                        y[base + hi] = x0 * s + x1 * c;
                    }
                }
            }
        }
        y
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn both_conventions_match_reference_forward_and_inverse() {
        let mut rng = Rng::new(4);
        for dims @ (outer, seq, heads, d) in [(2, 5, 3, 8), (1, 7, 1, 2), (3, 300, 2, 6), (1, 1, 4, 64)] {
            let x = rng.vec(outer * seq * heads * d, 1.0);
            let (c, s) = tables(seq, d, 11);
            for inverse in [false, true] {
                let mut y = vec![f32::NAN; x.len()];
                rope_interleaved(&x, &c, &s, outer, seq, heads, d, inverse, &mut y);
                assert_close(&y, &reference(&x, &c, &s, dims, inverse, |i| (2 * i, 2 * i + 1)));
                rope_half(&x, &c, &s, outer, seq, heads, d, inverse, &mut y);
                assert_close(&y, &reference(&x, &c, &s, dims, inverse, |i| (i, i + d / 2)));
            }
        }
    }

    #[test]
    fn inverse_undoes_forward() {
        let (outer, seq, heads, d) = (2, 9, 3, 16);
        let x = Rng::new(6).vec(outer * seq * heads * d, 1.0);
        let (c, s) = tables(seq, d, 0);
        for rope in [rope_interleaved, rope_half] {
            let (mut y, mut back) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            rope(&x, &c, &s, outer, seq, heads, d, false, &mut y);
            rope(&y, &c, &s, outer, seq, heads, d, true, &mut back);
            for (&b, &x) in back.iter().zip(&x) {
                assert!((b - x).abs() <= 1e-6, "{b} vs {x}");
            }
        }
    }

    #[test]
    fn position_zero_is_identity_and_empty_is_a_no_op() {
        let x = Rng::new(1).vec(3 * 4, 1.0);
        let (c, s) = tables(1, 4, 0);
        let mut y = vec![0.0; x.len()];
        rope_interleaved(&x, &c, &s, 1, 1, 3, 4, false, &mut y);
        assert_eq!(y, x);
        rope_half(&[], &c, &s, 0, 1, 3, 4, false, &mut []);
        rope_half(&[], &[], &[], 2, 0, 3, 4, true, &mut []);
    }

    #[test]
    fn deterministic() {
        let (outer, seq, heads, d) = (4, 257, 3, 10);
        let x = Rng::new(2).vec(outer * seq * heads * d, 1.0);
        let (c, s) = tables(seq, d, 5);
        let run = || {
            let mut y = vec![0.0; x.len()];
            rope_interleaved(&x, &c, &s, outer, seq, heads, d, true, &mut y);
            bits(&y)
        };
        assert_eq!(run(), run());
    }
}
