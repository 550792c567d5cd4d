//! Element types. Floats are storage formats: every op computes in f32 and writes its result back
//! in the dtype of its (float) inputs. Integer dtypes hold indices.
//!
//! The FP8 formats (spec deepseek-v3.md 4.1) are E4M3 in its `fn` variant (max 448, no
//! infinities) and E5M2. A plain cast to them rounds to nearest even and follows torch's casts on
//! overflow: E5M2 gives infinity and E4M3 NaN. Saturation belongs to the scaled quantizers
//! ([`crate::fp8`]), which never overflow by more than rounding.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use whale_kernels::cpu::fp8::{Fp8Format, Overflow};

/// f32 to bf16, rounding to nearest even with NaNs kept quiet: `half`'s `bf16::from_f32`, bit for
/// bit, without its branches, so that a loop over a slice runs in SIMD lanes (the branchy form
/// had been a tenth of FP8 training's time on the CPU).
#[inline]
pub fn to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    // Adding 0x7fff plus the kept part's lowest bit carries into it exactly when the dropped half
    // is above one half, or one half with an odd kept part.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    bf16::from_bits((if b & 0x7fff_ffff > 0x7f80_0000 { quiet_nan } else { rounded }) as u16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    F8E4M3,
    F8E5M2,
    U32,
    I64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I64 => 8,
            DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16 | DType::F8E4M3 | DType::F8E5M2)
    }

    /// The FP8 format of an FP8 dtype.
    pub fn fp8_format(self) -> Option<Fp8Format> {
        match self {
            DType::F8E4M3 => Some(Fp8Format::E4M3),
            DType::F8E5M2 => Some(Fp8Format::E5M2),
            _ => None,
        }
    }

    /// The dtype that stores codes of `format`.
    pub fn of_fp8(format: Fp8Format) -> DType {
        match format {
            Fp8Format::E4M3 => DType::F8E4M3,
            Fp8Format::E5M2 => DType::F8E5M2,
        }
    }

    /// Rounds an f32 to this float dtype and back: what storing it would keep.
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            DType::BF16 => to_bf16(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::F8E4M3 | DType::F8E5M2 => {
                let fmt = self.fp8_format().expect("an FP8 dtype");
                fmt.decode(fmt.encode(x, Overflow::Ieee))
            }
            _ => x,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `to_bf16` is `half`'s conversion bit for bit: every sign, exponent and the mantissas around
    /// each rounding boundary (ties, either side, the carry into the exponent), infinities, NaNs,
    /// subnormals, and a sweep through every 2^32 / 65521st bit pattern.
    #[test]
    fn to_bf16_is_halfs_conversion_bit_for_bit() {
        let mut patterns: Vec<u32> = (0..=u32::MAX / 65_521).map(|i| i * 65_521).collect();
        for sign_exp in 0..512u32 {
            for low in
                [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1_7fff, 0x1_8000, 0x1_8001, 0x7f_ffff, 0x7f_8000, 0x40_0000]
            {
                patterns.push(sign_exp << 23 | low);
            }
        }
        for bits in patterns {
            let x = f32::from_bits(bits);
            assert_eq!(to_bf16(x).to_bits(), bf16::from_f32(x).to_bits(), "{bits:#010x}");
        }
    }
}
