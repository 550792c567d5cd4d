//! FP8 quantisation launchers (kernels/fp8.cu): on device buffers (what the tensor backend
//! calls) and on host slices (what the tests call).

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{count32, cuda, grid_for, need, Fp8Operand, Fp8View, Gpu, GpuError, Result};
use crate::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat, MIN_AMAX};

impl Gpu {
    /// E4M3 quantisation of `x` (`[rows, cols]`, a device view) in tiles of `block_rows` x 128:
    /// 1 (activation or gradient tiles) or 128 (weight blocks; ragged edges give partial blocks,
    /// scaled by the elements they hold), each scaled for at least `min_amax` (`MIN_AMAX`, or
    /// `GRADIENT_MIN_AMAX` for output gradients), its scale an f32 or a power of two (`scales`).
    /// Twin: `Fp8Blocks::quantize_with_min_amax` with that block, E4M3 and `scales`.
    pub fn fp8_quantize_dev(
        &self,
        x: &CudaView<'_, f32>,
        (rows, cols): (usize, usize),
        block_rows: usize,
        (min_amax, scales): (f32, ScaleFormat),
    ) -> Result<Fp8Operand> {
        need("fp8 quantize", x.len(), rows * cols)?;
        let (grid_rows, grid_cols) = (rows.div_ceil(block_rows.max(1)), cols.div_ceil(128));
        let blocks = grid_rows * grid_cols;
        let (name, threads) = match block_rows {
            1 => ("fp8_quantize_1x128", 128),
            128 => ("fp8_quantize_128x128", 256),
            _ => {
                return Err(GpuError::Shape(format!(
                    "fp8 quantize: blocks of {block_rows}x128 (1x128 or 128x128 here)"
                )))
            }
        };
        let pow2 = pow2_flag(scales);
        let (mut codes, mut scales) = (self.zeros::<u8>(rows * cols)?, self.zeros::<f32>(blocks)?);
        if blocks > 0 {
            let (r32, c32) = (count32("rows", rows)?, count32("columns", cols)?);
            let mut l = self.stream.launch_builder(self.function(name));
            l.arg(x).arg(&mut codes).arg(&mut scales).arg(&r32).arg(&c32).arg(&min_amax).arg(&pow2);
            let grid = (count32("blocks", blocks)?, 1, 1);
            let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: one block per tile (1x128: 128 threads, one element each; 128x128: 256
            // threads over its columns); each reads and writes only in-bounds elements of its
            // tile and thread 0 its scale, in buffers sized above.
            unsafe { l.launch(cfg) }.map_err(cuda(name))?;
        }
        Ok(Fp8Operand { codes, scales, rows, cols, block_rows })
    }

    /// The 1x128 E4M3 quantisation of `xᵀ` for `x` `[rows, cols]` (a device view), without
    /// forming the transpose: an operand `[cols, rows]` tiled along `rows`, each tile scaled for
    /// at least `min_amax` with `scales` (twin: `Fp8Blocks::quantize_with_min_amax` of
    /// `cpu::fp8::transpose(x)` in (1, 128) blocks). The Wgrad GEMM's operands, both tiled along
    /// the tokens. Each row of the operand is zero-padded to a multiple of `pad` (1: none): a
    /// token count the tensor-core GEMMs cannot take (they need K % 16 == 0) becomes one they
    /// can, the zero codes adding nothing to the sums (the tile scales are the same: 16 divides
    /// 128).
    pub fn fp8_quantize_transposed_dev(
        &self,
        x: &CudaView<'_, f32>,
        (rows, cols): (usize, usize),
        (min_amax, scales): (f32, ScaleFormat),
        pad: usize,
    ) -> Result<Fp8Operand> {
        need("fp8 quantize (transposed)", x.len(), rows * cols)?;
        if pad == 0 || 128 % pad != 0 {
            return Err(GpuError::Shape(format!("fp8 quantize (transposed): padding to {pad} (it must divide 128)")));
        }
        let ld = rows.next_multiple_of(pad);
        let (tiles, col_blocks) = (rows.div_ceil(128), cols.div_ceil(32));
        if col_blocks > 65_535 || rows > i32::MAX as usize || ld > i32::MAX as usize {
            return Err(GpuError::Shape(format!(
                "fp8 quantize (transposed): [{rows}, {cols}] exceeds the kernel's grid"
            )));
        }
        let pow2 = pow2_flag(scales);
        let (mut codes, mut scales) = (self.zeros::<u8>(ld * cols)?, self.zeros::<f32>(cols * tiles)?);
        if rows * cols > 0 {
            let (r32, c32, ld32) = (rows as u32, cols as u32, ld as u32);
            let name = "fp8_quantize_1x128_transposed";
            let mut l = self.stream.launch_builder(self.function(name));
            l.arg(x).arg(&mut codes).arg(&mut scales).arg(&r32).arg(&c32).arg(&ld32).arg(&min_amax).arg(&pow2);
            let cfg = LaunchConfig {
                grid_dim: (tiles as u32, col_blocks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: each block reads its 128 x 32 tile of x (bounded by [rows, cols]) into
            // static shared memory and writes the transposed codes and one scale per column of
            // the tile, inside [cols, ld] (ld >= rows) and [cols, ceil(rows / 128)].
            unsafe { l.launch(cfg) }.map_err(cuda(name))?;
        }
        Ok(Fp8Operand { codes, scales, rows: cols, cols: ld, block_rows: 1 })
    }

    /// [`Gpu::fp8_quantize_transposed_dev`] from the host, for the tests.
    pub fn fp8_quantize_transposed(
        &self,
        x: &[f32],
        (rows, cols): (usize, usize),
        floor: (f32, ScaleFormat),
        pad: usize,
    ) -> Result<Fp8Blocks> {
        self.fp8_quantize_host(x, (rows, cols), |dx| self.fp8_quantize_transposed_dev(dx, (rows, cols), floor, pad))
    }

    /// `out = decode(code) * scale` for codes `[rows, cols]` in `block`s of either format, with
    /// scales `[ceil(rows / block.0), ceil(cols / block.1)]`.
    pub fn fp8_dequantize_dev(
        &self,
        (codes, scales): (&CudaView<'_, u8>, &CudaView<'_, f32>),
        out: &mut CudaSlice<f32>,
        (rows, cols): (usize, usize),
        (block, format): ((usize, usize), Fp8Format),
    ) -> Result<()> {
        let n = rows * cols;
        let grid = rows.div_ceil(block.0.max(1)) * cols.div_ceil(block.1.max(1));
        if block.0 == 0 || block.1 == 0 || codes.len() < n || scales.len() < grid || out.len() < n {
            return Err(GpuError::Shape(format!(
                "fp8 dequantize: {} codes, {} scales and {} outputs for [{rows}, {cols}] in {block:?} blocks",
                codes.len(),
                scales.len(),
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let dims = [rows, cols, block.0, block.1].map(|x| x as u32);
        let e5m2 = i32::from(format == Fp8Format::E5M2);
        let mut l = self.stream.launch_builder(self.function("fp8_dequantize"));
        l.arg(codes).arg(scales).arg(out);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&e5m2);
        // SAFETY: a grid-stride loop over the `n` codes and outputs; each reads the scale of its
        // block, inside the grid checked above.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("fp8_dequantize"))?;
        Ok(())
    }

    /// `x` (`[rows, cols]`) transposed into `y` (`[cols, rows]`) by `kernel`
    /// (`fp8_transpose_codes` or `fp8_transpose_scales`).
    fn transpose_dev<T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &'static str,
        x: &CudaView<'_, T>,
        y: &mut CudaSlice<T>,
        (rows, cols): (usize, usize),
    ) -> Result<()> {
        need(kernel, x.len(), rows * cols)?;
        need(kernel, y.len(), rows * cols)?;
        if rows * cols == 0 {
            return Ok(());
        }
        if rows.div_ceil(32) > 65_535 {
            return Err(GpuError::Shape(format!("{kernel}: {rows} rows exceed the grid's 65535 x 32")));
        }
        let (r32, c32) = (count32("rows", rows)?, count32("columns", cols)?);
        let mut l = self.stream.launch_builder(self.function(kernel));
        l.arg(x).arg(y).arg(&r32).arg(&c32);
        let cfg = LaunchConfig {
            grid_dim: (c32.div_ceil(32), r32.div_ceil(32), 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each block moves one 32 x 32 tile through static shared memory; reads and writes
        // are bounded by [rows, cols] (checked against both buffers above).
        unsafe { l.launch(cfg) }.map_err(cuda(kernel))?;
        Ok(())
    }

    /// The transpose of an operand in 128x128 blocks (a weight): codes `[cols, rows]` and the
    /// transposed scale grid, what the Dgrad GEMM multiplies by (twin: `Fp8Blocks::transpose`).
    pub fn fp8_transpose_dev(&self, w: &Fp8View<'_>) -> Result<Fp8Operand> {
        if w.block_rows != 128 {
            return Err(GpuError::Shape(format!(
                "fp8 transpose: blocks of {}x128 are not square (128x128 weights transpose)",
                w.block_rows
            )));
        }
        let (rows, cols) = (w.rows, w.cols);
        let grid = (rows.div_ceil(128), cols.div_ceil(128));
        let (mut codes, mut scales) = (self.zeros::<u8>(rows * cols)?, self.zeros::<f32>(grid.0 * grid.1)?);
        self.transpose_dev("fp8_transpose_codes", &w.codes, &mut codes, (rows, cols))?;
        self.transpose_dev("fp8_transpose_scales", &w.scales, &mut scales, grid)?;
        Ok(Fp8Operand { codes, scales, rows: cols, cols: rows, block_rows: 128 })
    }

    /// E4M3 quantisation of `x` (`[rows, cols]`) in 1x128 tiles, each scaled for at least
    /// `min_amax` with `scales` (twin: `Fp8Blocks::quantize_with_min_amax` with block (1, 128)
    /// and E4M3).
    pub fn fp8_quantize_1x128(
        &self,
        x: &[f32],
        (rows, cols): (usize, usize),
        floor: (f32, ScaleFormat),
    ) -> Result<Fp8Blocks> {
        self.fp8_quantize_host(x, (rows, cols), |dx| self.fp8_quantize_dev(dx, (rows, cols), 1, floor))
    }

    /// E4M3 quantisation of `x` (`[rows, cols]`) in 128x128 blocks with `scales`, the weights'
    /// tiling (twin: `Fp8Blocks::quantize` with block (128, 128) and E4M3).
    pub fn fp8_quantize_128x128(
        &self,
        x: &[f32],
        (rows, cols): (usize, usize),
        scales: ScaleFormat,
    ) -> Result<Fp8Blocks> {
        self.fp8_quantize_host(x, (rows, cols), |dx| self.fp8_quantize_dev(dx, (rows, cols), 128, (MIN_AMAX, scales)))
    }

    /// `x` (`[rows, cols]`) copied in, quantized on the GPU by `quantize`, copied back.
    fn fp8_quantize_host(
        &self,
        x: &[f32],
        (rows, cols): (usize, usize),
        quantize: impl FnOnce(&CudaView<'_, f32>) -> Result<Fp8Operand>,
    ) -> Result<Fp8Blocks> {
        if x.len() != rows * cols {
            return Err(GpuError::Shape(format!("fp8 quantize: {} values for [{rows}, {cols}]", x.len())));
        }
        let dx = self.upload_nonempty(x)?;
        let q = quantize(&dx.slice(..))?;
        self.download_fp8(&q, Fp8Format::E4M3)
    }

    /// A device operand's codes and scales, back on the host.
    pub fn download_fp8(&self, q: &Fp8Operand, format: Fp8Format) -> Result<Fp8Blocks> {
        let grid = q.rows.div_ceil(q.block_rows.max(1)) * q.cols.div_ceil(128);
        let (codes, scales) = (self.download(&q.codes, q.rows * q.cols)?, self.download(&q.scales, grid)?);
        Fp8Blocks::from_parts(codes, scales, (q.rows, q.cols), (q.block_rows, 128), format).map_err(GpuError::Shape)
    }

    /// The values `decode(code) * scale` of any tiling and format, row-major (twin:
    /// `Fp8Blocks::dequantize`).
    pub fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        // `Fp8Blocks`' fields are public: check what `from_parts` would have.
        let grid = q.rows.div_ceil(q.block.0.max(1)) * q.cols.div_ceil(q.block.1.max(1));
        if q.codes.len() != q.rows * q.cols || q.scales.len() != grid {
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
        let (dc, ds, mut out) =
            (self.upload_nonempty(&q.codes)?, self.upload_nonempty(&q.scales)?, self.zeros::<f32>(n)?);
        self.fp8_dequantize_dev((&dc.slice(..), &ds.slice(..)), &mut out, (q.rows, q.cols), (q.block, q.format))?;
        self.download(&out, n)
    }

    /// The transpose of a weight in 128x128 blocks from the host (twin: `Fp8Blocks::transpose`).
    pub fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks> {
        let op = self.upload_fp8(w)?;
        let t = self.fp8_transpose_dev(&op.view())?;
        self.download_fp8(&t, w.format)
    }
}

/// The kernels' `pow2` argument: whether a tile's scale is rounded up to a power of two.
fn pow2_flag(scales: ScaleFormat) -> i32 {
    i32::from(scales == ScaleFormat::Ue8m0)
}
