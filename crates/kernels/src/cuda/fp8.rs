//! FP8 quantisation launchers (kernels/fp8.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{cuda, Gpu, GpuError, Result};
use crate::cpu::fp8::{Fp8Blocks, Fp8Format};

impl Gpu {
    /// E4M3 quantisation of `x` (`[rows, cols]`) in 1x128 tiles with f32 scales (twin:
    /// `Fp8Blocks::quantize` with block (1, 128), E4M3, f32 scales).
    pub fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        if x.len() != rows * cols {
            return Err(GpuError::Shape(format!("fp8 quantize: {} values for [{rows}, {cols}]", x.len())));
        }
        let tiles = cols.div_ceil(128);
        let (dx, mut codes, mut scales) =
            (self.upload(x)?, self.zeros::<u8>(x.len())?, self.zeros::<f32>(rows * tiles)?);
        let (r32, c32) = (rows as u32, cols as u32);
        let mut l = self.stream.launch_builder(self.function("fp8_quantize_1x128"));
        l.arg(&dx).arg(&mut codes).arg(&mut scales).arg(&r32).arg(&c32);
        let cfg = LaunchConfig {
            grid_dim: ((rows * tiles).max(1) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block of 128 threads per tile; each thread reads and writes at most one
        // in-bounds element and thread 0 one scale.
        unsafe { l.launch(cfg) }.map_err(cuda("fp8_quantize_1x128"))?;
        let (codes, scales) = (self.download(&codes, x.len())?, self.download(&scales, rows * tiles)?);
        Fp8Blocks::from_parts(codes, scales, (rows, cols), (1, 128), Fp8Format::E4M3).map_err(GpuError::Shape)
    }
}
