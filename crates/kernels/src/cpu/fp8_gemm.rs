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
//! product runs in the limited accumulator over the scaled products.

use super::fp8::Fp8Format;

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

/// The shapes of one GEMM: `A` `[m, k]`, `B` `[n, k]`, output `[m, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// The block-scaled FP8 GEMM `y = (A * a_s) (B * b_s)^T` with `acc`'s accumulation.
/// `a`, `b`: FP8 codes; `a_scales`: `[m, ceil(k/128)]`; `b_scales`: `[ceil(n/128), ceil(k/128)]`.
pub fn fp8_gemm(
    a: &[u8],
    a_scales: &[f32],
    a_fmt: Fp8Format,
    b: &[u8],
    b_scales: &[f32],
    b_fmt: Fp8Format,
    shape: Fp8GemmShape,
    acc: Accumulation,
) -> Vec<f32> {
    let Fp8GemmShape { m, n, k } = shape;
    let kb = k.div_ceil(BLOCK);
    assert_eq!(a.len(), m * k, "fp8_gemm: A does not match [{m}, {k}]");
    assert_eq!(b.len(), n * k, "fp8_gemm: B does not match [{n}, {k}]");
    assert_eq!(a_scales.len(), m * kb, "fp8_gemm: A's scales must be [{m}, {kb}]");
    assert_eq!(b_scales.len(), n.div_ceil(BLOCK) * kb, "fp8_gemm: B's scales must be [{}, {kb}]", n.div_ceil(BLOCK));
    let (ta, tb) = (decode_table(a_fmt), decode_table(b_fmt));
    let mut y = vec![0.0f32; m * n];
    let bits = acc.mantissa_bits;
    for i in 0..m {
        let ar = &a[i * k..(i + 1) * k];
        for j in 0..n {
            let br = &b[j * k..(j + 1) * k];
            let mut out = 0.0f32;
            let mut limited = 0.0f32;
            for blk in 0..kb {
                let scale = a_scales[i * kb + blk] * b_scales[(j / BLOCK) * kb + blk];
                let (k0, k1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(k));
                if acc.promote {
                    // The tensor core's partial sum over one block, then promotion in f32.
                    let mut partial = 0.0f32;
                    for t in k0..k1 {
                        partial = round_mantissa(partial + ta[ar[t] as usize] * tb[br[t] as usize], bits);
                    }
                    out += partial * scale;
                } else {
                    for t in k0..k1 {
                        limited = round_mantissa(limited + ta[ar[t] as usize] * tb[br[t] as usize] * scale, bits);
                    }
                }
            }
            y[i * n + j] = if acc.promote { out } else { limited };
        }
    }
    y
}

fn decode_table(fmt: Fp8Format) -> [f32; 256] {
    let mut t = [0.0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        *v = fmt.decode(c as u8);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::fp8::{dequantize_blocks, quantize_blocks, ScaleFormat};
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

    /// Quantised operands (codes, scales) and the f64 product of their dequantised values.
    type Operands = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>, Vec<f64>);

    /// Quantised operands and the f64 product of their dequantised values (so only the
    /// accumulation differs).
    fn operands(m: usize, n: usize, k: usize, seed: u64) -> Operands {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..m * k).map(|_| rng.next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.next() * 0.05).collect();
        let (a, sa) = quantize_blocks(&x, m, k, (1, BLOCK), Fp8Format::E4M3, ScaleFormat::F32);
        let (b, sb) = quantize_blocks(&w, n, k, (BLOCK, BLOCK), Fp8Format::E4M3, ScaleFormat::F32);
        let xa = dequantize_blocks(&a, &sa, m, k, (1, BLOCK), Fp8Format::E4M3);
        let wb = dequantize_blocks(&b, &sb, n, k, (BLOCK, BLOCK), Fp8Format::E4M3);
        let reference = (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                (0..k).map(|t| xa[i * k + t] as f64 * wb[j * k + t] as f64).sum()
            })
            .collect();
        (a, sa, b, sb, reference)
    }

    fn max_relative_error(y: &[f32], reference: &[f64]) -> f64 {
        let scale = reference.iter().map(|r| r.abs()).fold(0.0, f64::max);
        y.iter().zip(reference).map(|(&v, &r)| (v as f64 - r).abs()).fold(0.0, f64::max) / scale
    }

    #[test]
    fn promotion_keeps_the_error_small_where_the_limited_accumulator_drifts() {
        let (m, n, k) = (4, 130, 4096); // n spans two weight blocks, one partial
        let (a, sa, b, sb, reference) = operands(m, n, k, 11);
        let run = |acc| fp8_gemm(&a, &sa, Fp8Format::E4M3, &b, &sb, Fp8Format::E4M3, Fp8GemmShape { m, n, k }, acc);
        let exact = max_relative_error(&run(Accumulation { mantissa_bits: 23, promote: true }), &reference);
        let promoted = max_relative_error(&run(Accumulation::DEEPSEEK_V3), &reference);
        let unpromoted = max_relative_error(&run(Accumulation::UNPROMOTED), &reference);
        assert!(exact < 1e-5, "f32 accumulation: {exact}");
        assert!(promoted < 2e-3, "promoted every 128: {promoted}");
        assert!(unpromoted > 5.0 * promoted, "without promotion {unpromoted} vs with {promoted}");
    }

    #[test]
    fn ragged_k_and_per_block_scales_are_applied() {
        let (m, n, k) = (3, 5, 200); // K = 128 + 72
        let (a, sa, b, sb, reference) = operands(m, n, k, 2);
        let y = fp8_gemm(
            &a,
            &sa,
            Fp8Format::E4M3,
            &b,
            &sb,
            Fp8Format::E4M3,
            Fp8GemmShape { m, n, k },
            Accumulation { mantissa_bits: 23, promote: true },
        );
        assert!(max_relative_error(&y, &reference) < 1e-6);
    }
}
