//! FP8 formats (spec/deepseek-v3.md section 4.1): E4M3 in its `fn` variant (bias 7, max 448, no
//! infinities, NaN = 0x7F/0xFF) and E5M2 (IEEE-like: bias 15, max 57344, infinities), with
//! round-to-nearest-even conversion from f32 (bf16 widens to f32 exactly first, so there is one
//! rounding), subnormals, and a choice of overflow behaviour:
//!
//! - [`Overflow::Saturate`] clamps to the largest finite value. The quantizers use it: a scaled
//!   tile never exceeds the max by more than rounding, and a clamp is the recipe's behaviour.
//! - [`Overflow::Ieee`] is the plain cast: E5M2 overflows to infinity, E4M3 (which has none) to NaN,
//!   as `torch.float8_e4m3fn` casts do.
//!
//! NaN is preserved in both modes (sign kept).

use rayon::prelude::*;

use super::wide_fn;

/// An 8-bit float format: exponent and mantissa widths and what the top exponent means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    E4M3,
    E5M2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Saturate,
    Ieee,
}

impl Fp8Format {
    const fn mantissa_bits(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 3,
            Fp8Format::E5M2 => 2,
        }
    }

    const fn bias(self) -> i32 {
        match self {
            Fp8Format::E4M3 => 7,
            Fp8Format::E5M2 => 15,
        }
    }

    /// The largest finite value: 448 (E4M3) or 57344 (E5M2).
    pub const fn max(self) -> f32 {
        match self {
            Fp8Format::E4M3 => 448.0,
            Fp8Format::E5M2 => 57344.0,
        }
    }

    /// Code of the largest finite positive value.
    const fn max_code(self) -> u8 {
        match self {
            Fp8Format::E4M3 => 0x7E,
            Fp8Format::E5M2 => 0x7B,
        }
    }

    /// The canonical (positive) NaN code.
    const fn nan_code(self) -> u8 {
        0x7F
    }

    /// Smallest normal exponent (unbiased).
    const fn min_exp(self) -> i32 {
        1 - self.bias()
    }

    /// Decodes one code.
    pub fn decode(self, code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let m_bits = self.mantissa_bits();
        let e_bits = 7 - m_bits;
        let e = ((code >> m_bits) & ((1 << e_bits) - 1)) as i32;
        let m = (code & ((1 << m_bits) - 1)) as i32;
        let e_max = (1 << e_bits) - 1;
        match self {
            // NaN keeps its sign bit, as torch's decoders do.
            Fp8Format::E4M3 if e == e_max && m == (1 << m_bits) - 1 => return f32::NAN.copysign(sign),
            Fp8Format::E5M2 if e == e_max => {
                return if m == 0 { sign * f32::INFINITY } else { f32::NAN.copysign(sign) };
            }
            _ => {}
        }
        let frac = m as f32 / (1 << m_bits) as f32;
        if e == 0 {
            sign * frac * 2f32.powi(self.min_exp())
        } else {
            sign * (1.0 + frac) * 2f32.powi(e - self.bias())
        }
    }

    /// The value of every code, indexed by code.
    pub fn decode_table(self) -> [f32; 256] {
        let mut t = [0.0f32; 256];
        for (c, v) in t.iter_mut().enumerate() {
            *v = self.decode(c as u8);
        }
        t
    }

    /// Encodes `x` with round-to-nearest-even.
    pub fn encode(self, x: f32, overflow: Overflow) -> u8 {
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return sign | self.nan_code();
        }
        let a = x.abs();
        let overflow_code = || match (overflow, self) {
            (Overflow::Saturate, _) => sign | self.max_code(),
            (Overflow::Ieee, Fp8Format::E5M2) => sign | 0x7C,
            (Overflow::Ieee, Fp8Format::E4M3) => sign | self.nan_code(),
        };
        if a.is_infinite() {
            return overflow_code();
        }
        if a == 0.0 {
            return sign;
        }
        let m_bits = self.mantissa_bits();
        let bits = a.to_bits();
        if ((bits >> 23) as i32) - 127 < self.min_exp() {
            // Subnormal range (and everything that rounds into it or to zero): count quanta of
            // the smallest subnormal. Dividing by a power of two is exact; a count of 2^m_bits is
            // the smallest normal, whose code is that same integer.
            let quantum = f32::from_bits(((self.min_exp() - m_bits + 127) as u32) << 23);
            return sign | (a / quantum).round_ties_even() as u8;
        }
        // Normal: round the f32 mantissa to m_bits, to nearest, ties to even (a carry moves into
        // the exponent, which is right), then re-bias the exponent.
        let drop = 23 - m_bits as u32;
        let r = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & !((1u32 << drop) - 1);
        if f32::from_bits(r) > self.max() {
            return overflow_code();
        }
        let e = ((r >> 23) as i32) - 127;
        let m = ((r >> drop) & ((1 << m_bits) - 1)) as u8;
        sign | (((e + self.bias()) as u8) << m_bits) | m
    }

    /// [`Fp8Format::encode`] with [`Overflow::Saturate`], the same code for every f32, computed
    /// without branches (both roundings, then a select) so that the quantizers' loop over a tile
    /// becomes SIMD code.
    #[inline(always)]
    pub fn encode_saturating(self, x: f32) -> u8 {
        let m_bits = self.mantissa_bits() as u32;
        let bits = x.to_bits();
        let sign = (bits >> 24) as u8 & 0x80;
        let abs = bits & 0x7FFF_FFFF;
        // Non-negative floats order as their bits: past the max (infinity included) encodes as
        // the max. NaN, above infinity, is set apart at the end.
        let a = abs.min(self.max().to_bits());
        // Below the smallest normal, count quanta of the smallest subnormal: adding 2^23 quanta
        // leaves one quantum per unit in the last place, so the f32 addition rounds to whole
        // quanta, ties to even, and the count is what the sum's bits gain.
        let magic = f32::from_bits(((self.min_exp() - m_bits as i32 + 23 + 127) as u32) << 23);
        let subnormal = (f32::from_bits(a) + magic).to_bits().wrapping_sub(magic.to_bits());
        // A normal: round the mantissa to m_bits, ties to even (a carry moves into the exponent),
        // and re-bias the exponent from f32's 127 to the format's.
        let drop = 23 - m_bits;
        let rounded = a.wrapping_add((1 << (drop - 1)) - 1 + ((a >> drop) & 1)) >> drop;
        let normal = rounded.wrapping_sub(((127 - self.bias()) as u32) << m_bits);
        let smallest_normal = ((self.min_exp() + 127) as u32) << 23;
        let code = if a < smallest_normal { subnormal } else { normal };
        let code = if abs > f32::INFINITY.to_bits() { self.nan_code() as u32 } else { code };
        sign | code as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formats written out from their definitions, code by code, independently of `decode`:
    /// every finite value as sign * significand * 2^exponent with integer significands.
    fn reference(fmt: Fp8Format, code: u8) -> Option<f64> {
        let (m_bits, bias) = match fmt {
            Fp8Format::E4M3 => (3u32, 7i32),
            Fp8Format::E5M2 => (2, 15),
        };
        let s = if code >> 7 == 1 { -1.0 } else { 1.0 };
        let e = ((code & 0x7F) >> m_bits) as i32;
        let m = (code & ((1 << m_bits) - 1)) as i32;
        let special = match fmt {
            Fp8Format::E4M3 => code & 0x7F == 0x7F,
            Fp8Format::E5M2 => e == 31,
        };
        if special {
            return None;
        }
        let (significand, exp) = if e == 0 { (m, 1 - bias) } else { ((1 << m_bits) + m, e - bias) };
        Some(s * significand as f64 * 2f64.powi(exp - m_bits as i32))
    }

    #[test]
    fn every_code_decodes_to_its_definition_and_encodes_back() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            for code in 0..=255u8 {
                let v = fmt.decode(code);
                match reference(fmt, code) {
                    Some(want) => {
                        assert_eq!(v as f64, want, "{fmt:?} code {code:#04x}");
                        for mode in [Overflow::Saturate, Overflow::Ieee] {
                            assert_eq!(fmt.encode(v, mode), code, "{fmt:?} {v} back to {code:#04x}");
                        }
                    }
                    None => assert!(v.is_nan() || v.is_infinite(), "{fmt:?} code {code:#04x} is special"),
                }
            }
        }
        assert_eq!(Fp8Format::E4M3.decode(0x7E), 448.0);
        assert_eq!(Fp8Format::E5M2.decode(0x7B), 57344.0);
        assert_eq!(Fp8Format::E5M2.decode(0x7C), f32::INFINITY);
        assert_eq!(Fp8Format::E5M2.decode(0xFC), f32::NEG_INFINITY);
        assert!(Fp8Format::E4M3.decode(0x7F).is_nan() && Fp8Format::E4M3.decode(0xFF).is_nan());
        assert_eq!(Fp8Format::E4M3.decode(0x01), 2f32.powi(-9), "smallest subnormal");
        assert_eq!(Fp8Format::E5M2.decode(0x01), 2f32.powi(-16));
    }

    #[test]
    fn midpoints_round_to_even_including_subnormals_and_the_binade_carry() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            // Every pair of consecutive positive finite codes: the midpoint goes to the even code,
            // a hair above goes up, a hair below goes down.
            let finite: Vec<u8> = (0..0x80u8).filter(|&c| reference(fmt, c).is_some()).collect();
            for w in finite.windows(2) {
                let (lo, hi) = (reference(fmt, w[0]).unwrap(), reference(fmt, w[1]).unwrap());
                let mid = (lo + hi) / 2.0;
                let even = if w[0] % 2 == 0 { w[0] } else { w[1] };
                assert_eq!(fmt.encode(mid as f32, Overflow::Saturate), even, "{fmt:?} tie {lo}..{hi}");
                let nudge = (hi - lo) / 64.0;
                assert_eq!(fmt.encode((mid + nudge) as f32, Overflow::Saturate), w[1]);
                assert_eq!(fmt.encode((mid - nudge) as f32, Overflow::Saturate), w[0]);
                // Negative values mirror.
                assert_eq!(fmt.encode(-(mid as f32), Overflow::Saturate), even | 0x80);
            }
        }
        // Below half the smallest subnormal: signed zero.
        assert_eq!(Fp8Format::E4M3.encode(2f32.powi(-11), Overflow::Saturate), 0x00);
        assert_eq!(Fp8Format::E4M3.encode(-2f32.powi(-11), Overflow::Saturate), 0x80);
    }

    #[test]
    fn overflow_saturates_or_follows_the_cast_rules_and_nan_survives() {
        let (e4, e5) = (Fp8Format::E4M3, Fp8Format::E5M2);
        // 464 is the midpoint between 448 and the (absent) 480: ties to even keeps 448.
        assert_eq!(e4.encode(464.0, Overflow::Ieee), 0x7E);
        assert_eq!(e4.encode(465.0, Overflow::Ieee), 0x7F, "E4M3 has no infinity: NaN");
        assert_eq!(e4.encode(1e9, Overflow::Saturate), 0x7E);
        assert_eq!(e4.encode(-1e9, Overflow::Saturate), 0xFE);
        assert_eq!(e4.encode(f32::INFINITY, Overflow::Saturate), 0x7E);
        // 57344 has an odd mantissa (0x7B): the tie at 61440 rounds to the even neighbour 2^16,
        // which is past the max, so it overflows (to infinity as a cast, to the max saturated).
        assert_eq!(e5.encode(61440.0, Overflow::Ieee), 0x7C);
        assert_eq!(e5.encode(61440.0, Overflow::Saturate), 0x7B);
        assert_eq!(e5.encode(61439.0, Overflow::Ieee), 0x7B);
        assert_eq!(e5.encode(-1e9, Overflow::Ieee), 0xFC);
        assert_eq!(e5.encode(1e9, Overflow::Saturate), 0x7B);
        for fmt in [e4, e5] {
            for mode in [Overflow::Saturate, Overflow::Ieee] {
                assert!(fmt.decode(fmt.encode(f32::NAN, mode)).is_nan());
                assert!(fmt.decode(fmt.encode(-f32::NAN, mode)).is_nan());
            }
        }
    }

    #[test]
    fn the_branch_free_encoder_gives_encodes_saturated_codes() {
        for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
            let check = |bits: u32| {
                let x = f32::from_bits(bits);
                assert_eq!(fmt.encode_saturating(x), fmt.encode(x, Overflow::Saturate), "{fmt:?} {x:e} ({bits:#010x})");
            };
            // A sweep of every 509th f32 bit pattern (both signs, NaNs, infinities, f32
            // subnormals), and every pattern within 2^12 of each code's value and of each
            // midpoint between neighbours, where the roundings decide.
            (0..=u32::MAX).step_by(509).for_each(check);
            let finite: Vec<f64> = (0..0x80u8).filter_map(|c| reference(fmt, c)).collect();
            let midpoints = finite.windows(2).map(|w| (w[0] + w[1]) / 2.0);
            for v in finite.iter().copied().chain(midpoints).chain([fmt.max() as f64 * 1.0625, 1e30]) {
                let b = (v as f32).to_bits();
                for bits in b.saturating_sub(1 << 12)..=b.saturating_add(1 << 12) {
                    check(bits);
                    check(bits | 0x8000_0000);
                }
            }
            for x in [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MIN_POSITIVE] {
                check(x.to_bits());
            }
        }
    }
}

/// A row-major `[rows, cols]` matrix as `[cols, rows]`.
pub fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    assert_eq!(v.len(), rows * cols, "transpose: buffer does not match [{rows}, {cols}]");
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// How block scales are stored: plain f32, or UE8M0 (a power of two, DeepSeek-V3.1 checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleFormat {
    F32,
    Ue8m0,
}

/// Smallest amax a block of activations or weights is scaled for: an all-zero block would
/// otherwise get scale 0 and divide 0 by 0 (the reference's `act_quant` clamps at 1e-4 too; spec
/// section 9, item 11).
pub const MIN_AMAX: f32 = 1e-4;

/// Smallest amax a tile of output gradients is scaled for: the lowest that keeps an E4M3 scale
/// (amax / 448) a normal f32, so only the all-zero tile is guarded. Gradients are routinely far
/// below 1e-4 (a per-token mean loss, divided again by the accumulation): with `MIN_AMAX` their
/// tiles would use a fraction of E4M3's range, and values under ~3.5e-9 would lose bits or
/// flush to zero, where scale = amax / 448 (the paper's online scaling) keeps them.
pub const GRADIENT_MIN_AMAX: f32 = f32::MIN_POSITIVE * 448.0;

/// Values per parallel task of [`Fp8Blocks::quantize`]: a fixed size, so the partition depends
/// only on the shape (each block's codes depend only on its own values anyway).
const QUANTIZE_TASK: usize = 1 << 15;

/// How [`Fp8Blocks::quantize`] tiles and encodes a matrix: its width, the width of a block, the
/// codes' format and the scales'.
#[derive(Clone, Copy)]
struct Tiling {
    cols: usize,
    bc: usize,
    format: Fp8Format,
    scale_format: ScaleFormat,
    min_amax: f32,
}

wide_fn! {
    /// One row of blocks: `x` (rows of `t.cols` values, at most a block high) into `codes`, and
    /// a scale per block into `scales`.
    fn quantize_block_row => quantize_block_row_with(x: &[f32], codes: &mut [u8], scales: &mut [f32], t: Tiling)
}

#[inline(always)]
fn quantize_block_row_with(x: &[f32], codes: &mut [u8], scales: &mut [f32], t: Tiling) {
    let Tiling { cols, bc, format, scale_format, min_amax } = t;
    for (bj, scale_slot) in scales.iter_mut().enumerate() {
        let (c0, c1) = (bj * bc, ((bj + 1) * bc).min(cols));
        let mut amax = 0;
        for row in x.chunks(cols) {
            amax = amax.max(amax_bits(&row[c0..c1]));
        }
        let mut scale = f32::from_bits(amax).max(min_amax) / format.max();
        if scale_format == ScaleFormat::Ue8m0 {
            scale = pow2_ceil(scale);
        }
        *scale_slot = scale;
        for (row, out) in x.chunks(cols).zip(codes.chunks_mut(cols)) {
            encode_scaled(&row[c0..c1], scale, &mut out[c0..c1], format);
        }
    }
}

/// The least power of two at or above `s` (positive), its exponent read from the bits as the
/// reference's `fast_log2_ceil` reads it (an f32 `log2` rounds a value just above a power of two
/// down onto it, and the tile's largest value would then saturate).
fn pow2_ceil(s: f32) -> f32 {
    let bits = s.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32 - 127 + i32::from(bits & 0x7F_FFFF != 0);
    2f32.powi(exponent)
}

/// The bits of the largest |v|: non-negative floats order as their bits do. A NaN (above
/// infinity) is left out, as `f32::max` would leave it.
#[inline(always)]
fn amax_bits(v: &[f32]) -> u32 {
    let mut m = [0u32; 8];
    for chunk in v.chunks(8) {
        for (m, x) in m.iter_mut().zip(chunk) {
            let b = x.to_bits() & 0x7FFF_FFFF;
            *m = (*m).max(b & ((b <= f32::INFINITY.to_bits()) as u32).wrapping_neg());
        }
    }
    m.into_iter().fold(0, u32::max)
}

/// `out = encode_saturating(x / scale)`, value by value.
#[inline(always)]
fn encode_scaled(x: &[f32], scale: f32, out: &mut [u8], format: Fp8Format) {
    for (c, &v) in out.iter_mut().zip(x) {
        *c = format.encode_saturating(v / scale);
    }
}

/// A row-major `[rows, cols]` matrix quantized in blocks of `block = (block_rows, block_cols)`:
/// 1x128 activation tiles, 128x1 tiles of an activation reused along the other axis, 128x128
/// weight blocks. Blocks at the right and bottom edges may be partial: their scale covers only
/// the elements that exist, which equals the checkpoints' rule of zero-padding to 128 first (zeros
/// do not change an amax). The scale grid is `[ceil(rows / block_rows), ceil(cols / block_cols)]`,
/// as in the released checkpoints' `weight_scale_inv`, and a value is `decode(code) * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Blocks {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub block: (usize, usize),
    pub format: Fp8Format,
}

impl Fp8Blocks {
    /// Online fine-grained quantization: each block gets `scale = max(amax, MIN_AMAX) /
    /// fmt.max()` (UE8M0: rounded up to a power of two, so no element exceeds the max) and its
    /// elements are encoded as `x / scale`, saturating.
    pub fn quantize(
        x: &[f32],
        rows: usize,
        cols: usize,
        block: (usize, usize),
        format: Fp8Format,
        scale_format: ScaleFormat,
    ) -> Fp8Blocks {
        Self::quantize_with_min_amax(x, (rows, cols), block, (format, scale_format), MIN_AMAX)
    }

    /// [`Fp8Blocks::quantize`] with another floor under each block's amax:
    /// [`GRADIENT_MIN_AMAX`] for output gradients.
    pub fn quantize_with_min_amax(
        x: &[f32],
        (rows, cols): (usize, usize),
        block: (usize, usize),
        (format, scale_format): (Fp8Format, ScaleFormat),
        min_amax: f32,
    ) -> Fp8Blocks {
        assert_eq!(x.len(), rows * cols, "Fp8Blocks::quantize: buffer does not match [{rows}, {cols}]");
        assert!(block.0 > 0 && block.1 > 0, "Fp8Blocks::quantize: block {block:?} has a zero edge");
        let (br, bc) = block;
        let (gr, gc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut scales = vec![0.0f32; gr * gc];
        let mut codes = vec![0u8; rows * cols];
        // Bands of whole block rows, about QUANTIZE_TASK values each, quantized in parallel.
        let band = br * QUANTIZE_TASK.div_ceil(br * cols.max(1)).max(1);
        let tiling = Tiling { cols, bc, format, scale_format, min_amax };
        if cols > 0 {
            codes
                .par_chunks_mut(band * cols)
                .zip(scales.par_chunks_mut(band / br * gc))
                .zip(x.par_chunks(band * cols))
                .for_each(|((codes, scales), x)| {
                    for ((x, codes), scales) in
                        x.chunks(br * cols).zip(codes.chunks_mut(br * cols)).zip(scales.chunks_mut(gc))
                    {
                        quantize_block_row(x, codes, scales, tiling);
                    }
                });
        }
        Fp8Blocks { codes, scales, rows, cols, block, format }
    }

    /// Codes and scales read from elsewhere (a checkpoint); an error says what does not fit.
    pub fn from_parts(
        codes: Vec<u8>,
        scales: Vec<f32>,
        (rows, cols): (usize, usize),
        block: (usize, usize),
        format: Fp8Format,
    ) -> Result<Fp8Blocks, String> {
        if block.0 == 0 || block.1 == 0 {
            return Err(format!("block {block:?} has a zero edge"));
        }
        if codes.len() != rows * cols {
            return Err(format!("{} codes do not fill [{rows}, {cols}]", codes.len()));
        }
        let grid = (rows.div_ceil(block.0), cols.div_ceil(block.1));
        if scales.len() != grid.0 * grid.1 {
            return Err(format!(
                "{} scales do not match the grid [{}, {}] of [{rows}, {cols}] in {}x{} blocks",
                scales.len(),
                grid.0,
                grid.1,
                block.0,
                block.1
            ));
        }
        Ok(Fp8Blocks { codes, scales, rows, cols, block, format })
    }

    /// Scale grid columns.
    pub fn grid_cols(&self) -> usize {
        self.cols.div_ceil(self.block.1)
    }

    /// The scale of element `(r, c)`.
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        self.scales[(r / self.block.0) * self.grid_cols() + c / self.block.1]
    }

    /// The values `decode(code) * scale`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let table = self.format.decode_table();
        let gc = self.grid_cols();
        let (br, bc) = self.block;
        let mut out = Vec::with_capacity(self.codes.len());
        for r in 0..self.rows {
            let srow = &self.scales[(r / br) * gc..(r / br + 1) * gc];
            let crow = &self.codes[r * self.cols..(r + 1) * self.cols];
            out.extend(crow.iter().enumerate().map(|(c, &q)| table[q as usize] * srow[c / bc]));
        }
        out
    }

    /// The transpose `[cols, rows]` with the scale grid transposed, so a 128x128-block weight
    /// quantized once for Fprop serves Dgrad too (no second rounding).
    pub fn transpose(&self) -> Fp8Blocks {
        let (rows, cols) = (self.rows, self.cols);
        let codes = transpose(&self.codes, rows, cols);
        let scales = transpose(&self.scales, rows.div_ceil(self.block.0), self.grid_cols());
        Fp8Blocks { codes, scales, rows: cols, cols: rows, block: (self.block.1, self.block.0), format: self.format }
    }
}

#[cfg(test)]
mod quant_tests {
    use super::*;
    use crate::cpu::test_util::Rng;

    #[test]
    fn block_quantization_bounds_the_error_per_block_for_ragged_shapes() {
        let mut rng = Rng::new(3);
        for (rows, cols, block) in [(3, 300, (1, 128)), (130, 200, (128, 128)), (5, 128, (1, 128))] {
            // Blocks of very different magnitudes, so a shared scale would fail the bound.
            let x: Vec<f32> = (0..rows * cols).map(|i| rng.next() * 10f32.powi((i / 97 % 5) as i32 - 2)).collect();
            for fmt in [Fp8Format::E4M3, Fp8Format::E5M2] {
                for sf in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
                    let q = Fp8Blocks::quantize(&x, rows, cols, block, fmt, sf);
                    assert_eq!(q.scales.len(), rows.div_ceil(block.0) * cols.div_ceil(block.1));
                    let back = q.dequantize();
                    let scales = &q.scales;
                    // Half a spacing at the top binade of the format, in units of the block scale:
                    // 16 for E4M3 (spacing 32 below 448), 4096 for E5M2 (8192 below 57344).
                    let half_ulp = match fmt {
                        Fp8Format::E4M3 => 16.0,
                        Fp8Format::E5M2 => 4096.0,
                    };
                    let gc = cols.div_ceil(block.1);
                    for (i, (&a, &b)) in x.iter().zip(&back).enumerate() {
                        let s = scales[(i / cols / block.0) * gc + (i % cols) / block.1];
                        assert!((a - b).abs() <= half_ulp * s * (1.0 + 1e-6), "{fmt:?} {sf:?} element {i}: {a} -> {b}");
                    }
                    // Each block's own scale: its amax over the format's max (at least 1e-4 over
                    // it), rounded up to a power of two for UE8M0.
                    for (b, &got) in scales.iter().enumerate() {
                        let (br, bc) = (b / gc, b % gc);
                        let amax = (br * block.0..((br + 1) * block.0).min(rows))
                            .flat_map(|r| (bc * block.1..((bc + 1) * block.1).min(cols)).map(move |c| r * cols + c))
                            .fold(0.0f32, |m, i| m.max(x[i].abs()));
                        let want = amax.max(MIN_AMAX) / fmt.max();
                        let want = if sf == ScaleFormat::Ue8m0 {
                            // The least power of two at or above it, found by doubling.
                            let mut p = 2f32.powi(-126);
                            while p < want {
                                p *= 2.0;
                            }
                            p
                        } else {
                            want
                        };
                        assert_eq!(got, want, "{fmt:?} {sf:?} block {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn ue8m0_scales_round_up_even_just_above_a_power_of_two() {
        // amax / 448 one ulp above 2^-20, where an f32 log2 gives exactly -20.
        let above = f32::from_bits(2f32.powi(-20).to_bits() + 1);
        assert_eq!(above.log2().ceil(), -20.0, "the case a log2 gets wrong");
        for (amax, want) in [(above * 448.0, 2f32.powi(-19)), (2f32.powi(-20) * 448.0, 2f32.powi(-20))] {
            let x: Vec<f32> = (0..128).map(|i| if i == 5 { -amax } else { amax / 3.0 }).collect();
            let q = Fp8Blocks::quantize(&x, 1, 128, (1, 128), Fp8Format::E4M3, ScaleFormat::Ue8m0);
            assert_eq!(q.scales, [want], "amax {amax:e}");
            // No value saturates: the largest comes back within E4M3's rounding.
            let back = q.dequantize()[5];
            assert!((back + amax).abs() <= amax / 16.0, "{back} for {}", -amax);
        }
    }

    #[test]
    fn a_zero_block_gets_a_finite_scale_and_zero_codes() {
        let x = vec![0.0f32; 256];
        let q = Fp8Blocks::quantize(&x, 1, 256, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
        assert!(q.scales.iter().all(|s| s.is_finite() && *s > 0.0));
        assert!(q.codes.iter().all(|&c| c == 0));
        // The largest element of a block maps to the format's max exactly (f32 scales).
        let y: Vec<f32> = (0..128).map(|i| i as f32 - 60.0).collect();
        let q = Fp8Blocks::quantize(&y, 1, 128, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
        assert_eq!(Fp8Format::E4M3.decode(q.codes[127]), 448.0);
    }

    #[test]
    fn transpose_moves_codes_and_scales_together_and_parts_are_checked() {
        let mut rng = Rng::new(5);
        let (rows, cols) = (130, 260);
        let x: Vec<f32> = (0..rows * cols).map(|i| rng.next() * (1 + i % 7) as f32).collect();
        let q = Fp8Blocks::quantize(&x, rows, cols, (128, 128), Fp8Format::E4M3, ScaleFormat::F32);
        let t = q.transpose();
        assert_eq!((t.rows, t.cols, t.block), (cols, rows, (128, 128)));
        let (a, b) = (q.dequantize(), t.dequantize());
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(a[r * cols + c], b[c * rows + r]);
            }
        }
        assert_eq!(t.transpose(), q);
        let err = Fp8Blocks::from_parts(q.codes.clone(), vec![1.0; 5], (rows, cols), (128, 128), Fp8Format::E4M3);
        assert!(err.unwrap_err().contains("grid [2, 3]"));
    }
}
