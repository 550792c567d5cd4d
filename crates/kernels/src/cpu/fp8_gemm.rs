//! A block-scaled FP8 GEMM with DeepSeek-V3's increased-precision accumulation (spec
//! deepseek-v3.md section 4.2 and DeepGEMM's interface, section 8.1), emulated exactly on the CPU.
//!
//! `y[i, j] = sum_kb a_s[i, kb] * b_s[j / 128, kb] * sum_{k in kb} a[i, k] * b[j, k]` with `A` in
//! 1x128 tiles (scales `[m, ceil(k / 128)]`) and `B` (`[n, k]`, the weight) in 128x128 blocks
//! (scales `[ceil(n / 128), ceil(k / 128)]`).
//!
//! Hopper's tensor cores accumulate FP8 products in a register that keeps only about 14 mantissa
//! bits. DeepSeek-V3 therefore *promotes*: after every `N_C = 128` elements of K the partial sum
//! is multiplied by the two scales and added to an f32 accumulator on the CUDA cores. The
//! emulation rounds the running sum to `mantissa_bits` after every addition (round to nearest
//! even), so a test can show the error with and without promotion; without it the whole dot
//! product runs in the limited accumulator over the scaled products. (A simpler rule than the
//! hardware's as DeepSeek-V3's report describes it, which the emulated GPU driver's wgmma
//! follows: kernels/emulate/sm90_host.h, `hopper_fp8_step`.)

use rayon::prelude::*;

use super::fp8::Fp8Blocks;
use super::matmul::{matmul, MatRef};

/// The tile and block edge.
pub const BLOCK: usize = 128;

/// How the emulated tensor core accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accumulation {
    /// Mantissa bits the in-register accumulator keeps (23 = plain f32; Hopper: ~14).
    pub mantissa_bits: u32,
    /// Promote to the f32 accumulator every `BLOCK` elements of K (DeepSeek-V3's fix).
    pub promote: bool,
}

impl Accumulation {
    /// DeepSeek-V3's recipe on Hopper: a ~14-bit accumulator promoted every 128 elements.
    pub const DEEPSEEK_V3: Accumulation = Accumulation { mantissa_bits: 14, promote: true };
    /// The same accumulator without promotion.
    pub const UNPROMOTED: Accumulation = Accumulation { mantissa_bits: 14, promote: false };
    /// Promotion with an exact f32 partial sum: the fast path, and what the reference's Triton
    /// `fp8_gemm_kernel` computes (FP8 inputs, f32 accumulation per 128-K block).
    pub const F32: Accumulation = Accumulation { mantissa_bits: 23, promote: true };
}

/// `x` rounded to `bits` mantissa bits, to nearest, ties to even (NaN and infinities kept).
pub fn round_mantissa(x: f32, bits: u32) -> f32 {
    if bits >= 23 || !x.is_finite() {
        return x;
    }
    let drop = 23 - bits;
    let b = x.to_bits();
    let half = 1u32 << (drop - 1);
    let lsb = (b >> drop) & 1;
    let rounded = b.wrapping_add(half - 1 + lsb) & !((1u32 << drop) - 1);
    f32::from_bits(rounded)
}

/// The block-scaled FP8 GEMM `y = A B^T` (DeepGEMM's NT layout): `a` is `[m, k]`, `b` is
/// `[n, k]`, both tiled 128 along K; their row blocks are free (1 for activation tiles, 128 for
/// weight blocks), so the one routine serves Fprop, Dgrad and Wgrad. Returns `y` `[m, n]` in f32.
///
/// With a full f32 accumulator (`mantissa_bits >= 23`) and promotion, each K-block's partial
/// product is an f32 GEMM of the decoded codes (exact FP8 values), so this runs at f32 GEMM speed;
/// otherwise every addition is rounded to the accumulator's precision, one element at a time.
pub fn fp8_gemm(a: &Fp8Blocks, b: &Fp8Blocks, acc: Accumulation) -> Vec<f32> {
    assert_eq!(
        a.cols, b.cols,
        "fp8_gemm: A is [{}, {}] but B is [{}, {}] (both [.., k])",
        a.rows, a.cols, b.rows, b.cols
    );
    assert!(a.block.1 == BLOCK && b.block.1 == BLOCK, "fp8_gemm: operands must be tiled {BLOCK} along K");
    if acc.promote && acc.mantissa_bits >= 23 {
        promoted_f32(a, b)
    } else {
        limited(a, b, acc)
    }
}

/// The product of one K-block scaled by its two scales (`partial * (a_s * b_s)`) is added to
/// the f32 accumulator: the promotion step.
fn promoted_f32(a: &Fp8Blocks, b: &Fp8Blocks) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let kb = k.div_ceil(BLOCK);
    let decode = |q: &Fp8Blocks| -> Vec<f32> {
        let t = q.format.decode_table();
        q.codes.iter().map(|&c| t[c as usize]).collect()
    };
    let (av, bv) = (decode(a), decode(b));
    let threads = if m * n * k >= 1 << 20 { rayon::current_num_threads() } else { 1 };
    let mut y = vec![0.0f32; m * n];
    let mut partial = vec![0.0f32; m * n];
    for blk in 0..kb {
        let (k0, k1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(k));
        let lhs = MatRef { data: &av, offset: k0, row_stride: k as isize, col_stride: 1 };
        // B^T: element (t, j) is b[j, t].
        let rhs = MatRef { data: &bv, offset: k0, row_stride: 1, col_stride: k as isize };
        matmul(m, n, k1 - k0, lhs, rhs, &mut partial, false, threads);
        y.par_chunks_mut(n.max(1)).zip(partial.par_chunks(n.max(1))).enumerate().for_each(|(i, (yr, pr))| {
            let sa = a.scales[(i / a.block.0) * kb + blk];
            for (j, (yv, &p)) in yr.iter_mut().zip(pr).enumerate() {
                *yv += p * (sa * b.scales[(j / b.block.0) * kb + blk]);
            }
        });
    }
    y
}

/// The tensor core's limited accumulator, rounded after every addition; promoted every block or
/// (without promotion) running over the whole of K on the scaled products.
fn limited(a: &Fp8Blocks, b: &Fp8Blocks, acc: Accumulation) -> Vec<f32> {
    let (m, n, k) = (a.rows, b.rows, a.cols);
    let kb = k.div_ceil(BLOCK);
    let (ta, tb) = (a.format.decode_table(), b.format.decode_table());
    let bits = acc.mantissa_bits;
    let mut y = vec![0.0f32; m * n];
    y.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, yr)| {
        let ar = &a.codes[i * k..(i + 1) * k];
        for (j, out) in yr.iter_mut().enumerate() {
            let br = &b.codes[j * k..(j + 1) * k];
            let mut promoted = 0.0f32;
            let mut running = 0.0f32;
            for blk in 0..kb {
                let scale = a.scales[(i / a.block.0) * kb + blk] * b.scales[(j / b.block.0) * kb + blk];
                let (k0, k1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(k));
                if acc.promote {
                    let mut partial = 0.0f32;
                    for t in k0..k1 {
                        partial = round_mantissa(partial + ta[ar[t] as usize] * tb[br[t] as usize], bits);
                    }
                    promoted += partial * scale;
                } else {
                    for t in k0..k1 {
                        running = round_mantissa(running + ta[ar[t] as usize] * tb[br[t] as usize] * scale, bits);
                    }
                }
            }
            *out = if acc.promote { promoted } else { running };
        }
    });
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fp8::{Fp8Format, ScaleFormat};
    use crate::cpu::test_util::Rng;

    #[test]
    fn mantissa_rounding_is_to_nearest_even() {
        assert_eq!(round_mantissa(1.0 + 2f32.powi(-10), 10), 1.0 + 2f32.powi(-10));
        // Halfway between 1 and 1 + 2^-10 at 10 bits: ties to the even (1.0).
        assert_eq!(round_mantissa(1.0 + 2f32.powi(-11), 10), 1.0);
        assert_eq!(round_mantissa(1.0 + 3.0 * 2f32.powi(-11), 10), 1.0 + 2.0 * 2f32.powi(-10));
        assert_eq!(round_mantissa(-1.0 - 3.0 * 2f32.powi(-11), 10), -1.0 - 2.0 * 2f32.powi(-10));
        assert_eq!(round_mantissa(0.1, 23), 0.1);
        assert!(round_mantissa(f32::NAN, 4).is_nan());
    }

    /// Quantised operands (activation tiles `a_block x 128`, weight blocks 128x128) and the f64
    /// product of their dequantised values, so only the accumulation differs.
    fn operands(m: usize, n: usize, k: usize, a_block: usize, seed: u64) -> (Fp8Blocks, Fp8Blocks, Vec<f64>) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next() * 0.05).collect();
        let a = Fp8Blocks::quantize(&x, m, k, (a_block, BLOCK), Fp8Format::E4M3, ScaleFormat::F32);
        let b = Fp8Blocks::quantize(&w, n, k, (BLOCK, BLOCK), Fp8Format::E4M3, ScaleFormat::F32);
        let (xa, wb) = (a.dequantize(), b.dequantize());
        let reference = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k).map(|t| xa[i * k + t] as f64 * wb[j * k + t] as f64).sum()
            })
            .collect();
        (a, b, reference)
    }

    fn max_relative_error(y: &[f32], reference: &[f64]) -> f64 {
        let scale = reference.iter().map(|r| r.abs()).fold(0.0, f64::max);
        y.iter().zip(reference).map(|(&v, &r)| (v as f64 - r).abs()).fold(0.0, f64::max) / scale
    }

    #[test]
    fn promotion_keeps_the_error_small_where_the_limited_accumulator_drifts() {
        let (m, n, k) = (4, 130, 4096); // n spans two weight blocks, one partial
        let (a, b, reference) = operands(m, n, k, 1, 11);
        let exact = max_relative_error(&fp8_gemm(&a, &b, Accumulation::F32), &reference);
        let promoted = max_relative_error(&fp8_gemm(&a, &b, Accumulation::DEEPSEEK_V3), &reference);
        let unpromoted = max_relative_error(&fp8_gemm(&a, &b, Accumulation::UNPROMOTED), &reference);
        assert!(exact < 1e-5, "f32 accumulation: {exact}");
        assert!(promoted < 2e-3, "promoted every 128: {promoted}");
        assert!(unpromoted > 5.0 * promoted, "without promotion {unpromoted} vs with {promoted}");
    }

    #[test]
    fn the_fast_path_equals_the_element_by_element_f32_emulation() {
        // Ragged K (128 + 72), row blocks of 1 and of 128 on the left, partial blocks on the right.
        for (m, n, k, a_block) in [(3, 5, 200, 1), (130, 140, 300, 128)] {
            let (a, b, reference) = operands(m, n, k, a_block, 2);
            let fast = fp8_gemm(&a, &b, Accumulation::F32);
            let slow = limited(&a, &b, Accumulation::F32);
            assert!(max_relative_error(&fast, &reference) < 1e-6);
            let worst = fast.iter().zip(&slow).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            let scale = slow.iter().map(|v| v.abs()).fold(0.0, f32::max);
            assert!(worst <= 1e-6 * scale, "fast vs element-wise: {worst} (scale {scale})");
        }
    }
}
