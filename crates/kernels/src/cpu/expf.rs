//! `exp` for f32, written out so that it inlines into the kernels' loops and vectorises there, and
//! gives the same bits on every platform (Rust's `f64::mul_add` rounds once wherever it runs).
//!
//! The method is the one of glibc's `expf` (since 2.27) and musl's, from Arm's optimized-routines
//! (Szabolcs Nagy, 2017): in double precision, `x = (k + r) ln2 / 32` with an integer `k` and
//! `|r| <= 1/2`, so `exp(x) = 2^(k/32) 2^(r/32)`; `2^(k/32)` is a table entry for `k mod 32` with
//! `k div 32` added to its exponent, and `2^(r/32)` a cubic. Every product-and-sum is one fused
//! multiply-add, as glibc's x86-64 build for CPUs with AVX2 and FMA (`__expf_fma`) computes them,
//! so the result equals that `expf` bit for bit for every f32 input (all 2^32 of them:
//! `cargo run --release -p whale-kernels --example expf_exhaustive`; a test checks a sample). The
//! CPU kernels called that `expf` before they had this one, so on such machines (this project's,
//! where the README's tables come from) their bits did not change; elsewhere (glibc without FMA,
//! musl, macOS) libm's `expf` can differ in the last bit from this one. Its error is at most
//! 0.502 ulp: only a value within 0.002 ulp of a rounding boundary can round the wrong way.
//!
//! Where the caller is built without FMA (`wide_fn!` builds the kernels with it where the
//! CPU has it), each `f64::mul_add` is a call to libm's `fma`: the same bits, several times slower.

use super::{map_chunks, wide_fn};

/// `TAB[i]` holds the bits of the double nearest `2^(i/32)`, less `i << 47`: adding `k << 47` for
/// `k = 32 e + i` then gives the bits of `2^(k/32)`, `e` landing in the exponent field.
const TAB: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// `32 / ln 2`.
const INV_LN2_32: f64 = f64::from_bits(0x40471547652b82fe);
/// `1.5 * 2^52`: adding it rounds a double of magnitude below `2^51` to an integer, which then
/// sits, in two's complement, in the low bits of the sum's mantissa.
const ROUND: f64 = f64::from_bits(0x4338000000000000);
/// The cubic `2^(r/32) ~ 1 + C2 r + C1 r^2 + C0 r^3` on `|r| <= 1/2`: optimized-routines' minimax
/// coefficients of `2^x`, scaled by `1/32`, `1/32^2`, `1/32^3`.
const C0: f64 = f64::from_bits(0x3ebc6af84b912394);
const C1: f64 = f64::from_bits(0x3f2ebfce50fac4f3);
const C2: f64 = f64::from_bits(0x3f962e42ff0c52d6);
/// Inputs are clamped to `[LOWEST, HIGHEST]`: `exp(-104)` rounds to 0 and `exp(89)` overflows to
/// infinity in f32, as everything beyond them does, and the arithmetic stays in range. NaN passes.
const LOWEST: f32 = -104.0;
const HIGHEST: f32 = 89.0;

/// `out[i] = e^x[i]`, in parallel chunks.
pub fn exp_forward(x: &[f32], out: &mut [f32]) {
    map_chunks("exp_forward", x, out, exp_slice);
}

wide_fn! {
    /// `out[i] = e^x[i]` on the calling thread, vectorised.
    pub fn exp_slice => exp_slice_with(x: &[f32], out: &mut [f32])
}

#[inline(always)]
fn exp_slice_with(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "exp_slice: x and out differ in length");
    out.iter_mut().zip(x).for_each(|(y, &x)| *y = expf(x));
}

/// `e^x`, correctly rounded but for values within 0.002 ulp of a rounding boundary; glibc's
/// `expf` bit for bit. Branch-free, so a loop over it vectorises.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    // `clamp` keeps NaN (where `max` and `min` would drop it).
    let x = x.clamp(LOWEST, HIGHEST);
    let x = x as f64;
    let shifted = INV_LN2_32.mul_add(x, ROUND);
    let k_bits = shifted.to_bits();
    let k = shifted - ROUND;
    let r = INV_LN2_32.mul_add(x, -k);
    let scale = f64::from_bits(TAB[(k_bits % 32) as usize].wrapping_add(k_bits << 47));
    let y = C2.mul_add(r, 1.0);
    let y = C0.mul_add(r, C1).mul_add(r * r, y);
    (y * scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `stride`-th f32 bit pattern from `start`: all signs and exponents, and mantissas
    /// spread over their range.
    fn sample(start: u32, stride: u32) -> impl Iterator<Item = f32> {
        (start..=u32::MAX).step_by(stride as usize).map(f32::from_bits)
    }

    /// `a * b` of little-endian base-2^64 naturals.
    fn big_mul(a: &[u64], b: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; a.len() + b.len()];
        for (i, &x) in a.iter().enumerate() {
            let mut carry = 0u128;
            for (j, &y) in b.iter().enumerate() {
                let t = out[i + j] as u128 + x as u128 * y as u128 + carry;
                (out[i + j], carry) = (t as u64, t >> 64);
            }
            out[i + b.len()] = carry as u64;
        }
        out
    }

    /// `a` against `2^e`, both naturals.
    fn big_cmp_pow2(a: &[u64], e: usize) -> std::cmp::Ordering {
        let mut p = vec![0u64; a.len().max(e / 64 + 1)];
        p[e / 64] = 1 << (e % 64);
        let a: Vec<u64> = a.iter().copied().chain(std::iter::repeat(0)).take(p.len()).collect();
        a.iter().rev().cmp(p.iter().rev())
    }

    #[test]
    fn the_table_holds_the_nearest_doubles_to_the_powers_of_two() {
        // With the entry `M 2^-52` (M an integer of 53 bits), it is the nearest double to
        // `t = 2^(i/32)` exactly when `(M - 1/2) 2^-52 < t < (M + 1/2) 2^-52`; to the 32nd power,
        // in integers: `(2M - 1)^32 < 2^(i + 53 * 32) < (2M + 1)^32`.
        for (i, &bits) in TAB.iter().enumerate() {
            let entry = f64::from_bits(bits + ((i as u64) << 47));
            assert!((1.0..2.0).contains(&entry), "entry {i}: {entry}");
            let m = (entry * (1u64 << 52) as f64) as u64;
            let pow32 = |x: u64| (0..5).fold(vec![x], |p, _| big_mul(&p, &p));
            let power = i + 53 * 32;
            assert_eq!(big_cmp_pow2(&pow32(2 * m - 1), power), std::cmp::Ordering::Less, "entry {i} is too big");
            assert_eq!(big_cmp_pow2(&pow32(2 * m + 1), power), std::cmp::Ordering::Greater, "entry {i} is too small");
        }
    }

    #[test]
    fn correctly_rounded_but_near_a_boundary() {
        // Against f64's exp (within an ulp of f64, 2^-29 ulp of f32): the f32 rounding of the true
        // value, unless that value lies within 0.002 ulp of the midpoint between two floats.
        let mut checked = 0;
        for x in sample(7, 1021).filter(|x| x.is_finite() && (-110.0..=95.0).contains(x)) {
            let want = (x as f64).exp();
            let got = expf(x);
            let rounded = want as f32;
            if got.to_bits() == rounded.to_bits() {
                checked += 1;
                continue;
            }
            // The neighbour on the far side of `want`, and the midpoint between them.
            let other = if (rounded as f64) < want { rounded.next_up() } else { rounded.next_down() };
            let mid = (rounded as f64 + other as f64) / 2.0;
            let ulp = (other as f64 - rounded as f64).abs();
            assert!(
                got == other && (want - mid).abs() < 0.002 * ulp,
                "exp({x:e} = {:#x}) = {got:e}, correctly rounded {rounded:e}",
                x.to_bits()
            );
        }
        assert!(checked > 1_000_000, "only {checked} inputs were in range");
    }

    #[test]
    fn the_slice_forms_are_the_scalar_one() {
        let x: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 0.0061).collect();
        let mut out = vec![0.0; x.len()];
        exp_forward(&x, &mut out);
        assert!(out.iter().zip(&x).all(|(y, &x)| y.to_bits() == expf(x).to_bits()));
    }

    #[test]
    fn special_values() {
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(-0.0), 1.0);
        assert_eq!(expf(1.0), std::f32::consts::E);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(f32::INFINITY), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
        // ln(f32::MAX) lies between these two floats: the last finite result, then infinity.
        let last_finite = f32::from_bits(0x42b1_7217);
        assert!(expf(last_finite).is_finite() && expf(last_finite.next_up()) == f32::INFINITY);
        // Subnormal results down to the smallest, then zero.
        assert_eq!(expf(-103.0), (-103.0f64).exp() as f32);
        assert!(expf(-103.0).is_subnormal());
        let last_nonzero = -f32::from_bits(0x42cf_f1b4);
        assert_eq!(expf(last_nonzero), f32::from_bits(1));
        assert_eq!(expf(last_nonzero.next_down()), 0.0);
        assert_eq!(expf(-200.0), 0.0);
    }

    #[test]
    fn the_reduction_rounds_once() {
        // The only two f32 inputs (of all 2^32) where a reduction `x 32/ln2 - k` rounded after the
        // product, rather than fused with it, changes the result: both lie within 0.002 ulp of a
        // rounding boundary, and glibc's `expf` gives these floats (the first is not the correctly
        // rounded one, which is its lower neighbour).
        for (x, want) in [(0x4202_422f, 0x56fc_9f1c), (0xc27c_65d9, 0x11fa_2993)] {
            assert_eq!(expf(f32::from_bits(x)).to_bits(), want, "exp of {x:#x}");
        }
    }

    /// glibc's own `expf`, which is what `f32::exp` calls on Linux: its AVX2 + FMA build, the one
    /// glibc picks on a CPU with both, is the computation `expf` mirrors.
    #[test]
    fn equals_glibc_expf() {
        if !(cfg!(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64")) && crate::cpu::has_avx2_fma()) {
            eprintln!("skipped: glibc's expf on x86-64 with AVX2 and FMA is the reference, and this is not that");
            return;
        }
        let mut differ = Vec::new();
        let mut n = 0usize;
        for x in sample(3, 97) {
            let (got, want) = (expf(x), x.exp());
            n += 1;
            if got.to_bits() != want.to_bits() && !(got.is_nan() && want.is_nan()) {
                differ.push((x, got, want));
            }
        }
        assert!(
            differ.is_empty(),
            "{} of {n} inputs differ from glibc, e.g. {:?}",
            differ.len(),
            &differ[..differ.len().min(5)]
        );
    }
}
