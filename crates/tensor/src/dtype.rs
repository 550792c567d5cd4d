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
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::F8E4M3 | DType::F8E5M2 => {
                let fmt = self.fp8_format().expect("an FP8 dtype");
                fmt.decode(fmt.encode(x, Overflow::Ieee))
            }
            _ => x,
        }
    }
}
