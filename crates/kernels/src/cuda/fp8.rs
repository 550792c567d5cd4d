//! FP8 quantisation launchers (kernels/fp8.cu).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{cuda, grid_for, Gpu, GpuError, Result};
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

    /// E4M3 quantisation of `x` (`[rows, cols]`) in 128x128 blocks with f32 scales, the weights'
    /// tiling (twin: `Fp8Blocks::quantize` with block (128, 128), E4M3, f32 scales). Ragged edges
    /// give partial blocks, scaled by the elements they hold.
    pub fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        if x.len() != rows * cols {
            return Err(GpuError::Shape(format!("fp8 quantize: {} values for [{rows}, {cols}]", x.len())));
        }
        let blocks = rows.div_ceil(128) * cols.div_ceil(128);
        let dx = self.upload(if x.is_empty() { &[0.0][..] } else { x })?;
        let (mut codes, mut scales) = (self.zeros::<u8>(x.len())?, self.zeros::<f32>(blocks)?);
        let (r32, c32) = (rows as u32, cols as u32);
        if blocks > 0 {
            let mut l = self.stream.launch_builder(self.function("fp8_quantize_128x128"));
            l.arg(&dx).arg(&mut codes).arg(&mut scales).arg(&r32).arg(&c32);
            let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: one block of 256 threads per 128x128 block; each thread reads and writes only
            // in-bounds elements of its block's columns and thread 0 its block's scale.
            unsafe { l.launch(cfg) }.map_err(cuda("fp8_quantize_128x128"))?;
        }
        let (codes, scales) = (self.download(&codes, x.len())?, self.download(&scales, blocks)?);
        Fp8Blocks::from_parts(codes, scales, (rows, cols), (128, 128), Fp8Format::E4M3).map_err(GpuError::Shape)
    }

    /// The values `decode(code) * scale` of any tiling and format, row-major (twin:
    /// `Fp8Blocks::dequantize`).
    pub fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        // `Fp8Blocks`' fields are public: check what `from_parts` would have.
        let grid = q.rows.div_ceil(q.block.0.max(1)) * q.cols.div_ceil(q.block.1.max(1));
        if q.block.0 == 0 || q.block.1 == 0 || q.codes.len() != q.rows * q.cols || q.scales.len() != grid {
            return Err(GpuError::Shape(format!(
                "fp8 dequantize: {} codes and {} scales for [{}, {}] in {:?} blocks",
                q.codes.len(),
                q.scales.len(),
                q.rows,
                q.cols,
                q.block
            )));
        }
        let n = q.codes.len();
        if n == 0 {
            return Ok(vec![]);
        }
        let (dc, ds, mut out) = (self.upload(&q.codes)?, self.upload(&q.scales)?, self.zeros::<f32>(n)?);
        let dims = [q.rows, q.cols, q.block.0, q.block.1].map(|x| x as u32);
        let e5m2 = i32::from(q.format == Fp8Format::E5M2);
        let mut l = self.stream.launch_builder(self.function("fp8_dequantize"));
        l.arg(&dc).arg(&ds).arg(&mut out);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&e5m2);
        // SAFETY: a grid-stride loop over the `n` codes and outputs; each reads the scale of its
        // block, inside the grid checked above.
        unsafe { l.launch(grid_for(n)) }.map_err(cuda("fp8_dequantize"))?;
        self.download(&out, n)
    }
}
