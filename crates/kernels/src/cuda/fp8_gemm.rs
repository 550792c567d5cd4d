//! The block-scaled FP8 GEMM launchers (kernels/fp8_gemm.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{cuda, Gpu, GpuError, Result};
use crate::cpu::fp8::{Fp8Blocks, Fp8Format};

impl Gpu {
    /// The block-scaled FP8 GEMM `a b^T` with f32 promotion every 128 of K (twin: `fp8_gemm` with
    /// `Accumulation::F32`). Both operands E4M3, tiled 128 along K.
    pub fn fp8_gemm(&self, a: &Fp8Blocks, b: &Fp8Blocks) -> Result<Vec<f32>> {
        if a.cols != b.cols
            || a.block.1 != 128
            || b.block.1 != 128
            || a.format != Fp8Format::E4M3
            || b.format != Fp8Format::E4M3
        {
            return Err(GpuError::Shape("fp8 gemm: E4M3 operands tiled 128 along the same K".into()));
        }
        let (m, n, k) = (a.rows, b.rows, a.cols);
        let (da, dsa, db, dsb) =
            (self.upload(&a.codes)?, self.upload(&a.scales)?, self.upload(&b.codes)?, self.upload(&b.scales)?);
        let mut y = self.zeros::<f32>(m * n)?;
        let (ar, br, m32, n32, k32) = (a.block.0 as u32, b.block.0 as u32, m as u32, n as u32, k as u32);
        let mut l = self.stream.launch_builder(self.function("fp8_gemm_promoted"));
        l.arg(&da).arg(&dsa).arg(&ar).arg(&db).arg(&dsb).arg(&br).arg(&mut y).arg(&m32).arg(&n32).arg(&k32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(16).max(1), (m as u32).div_ceil(16).max(1), 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one thread per output inside [m, n]; each reads its rows of `a` and `b` (k
        // codes) and their scales, whose grids `Fp8Blocks` guarantees.
        unsafe { l.launch(cfg) }.map_err(cuda("fp8_gemm_promoted"))?;
        self.download(&y, m * n)
    }
}
