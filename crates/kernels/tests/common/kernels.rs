//! The kernels a test body calls, on a GPU ([`Gpu`]'s host-slice launchers) or in host
//! emulation ([`Emulator`], launching the same kernels with the launch shapes of those
//! launchers): one body checks both against the CPU twins.

use half::bf16;

use whale_kernels::cpu::dispatch::DispatchPlan;
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format};
use whale_kernels::cuda::Gpu;

use super::emulator::{Arg, Emulator, Launch};

pub type Result<T> = std::result::Result<T, String>;

/// Each method is the [`Gpu`] launcher of the same name.
pub trait Kernels {
    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>>;
    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>>;
    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>>;
    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)>;
    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>>;
    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks>;
}

fn text<T>(r: std::result::Result<T, whale_kernels::cuda::GpuError>) -> Result<T> {
    r.map_err(|e| e.to_string())
}

impl Kernels for Gpu {
    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>> {
        text(Gpu::moe_permute(self, x, dim, plan, scale))
    }
    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>> {
        text(Gpu::moe_unpermute(self, y, dim, plan, weight))
    }
    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>> {
        text(Gpu::moe_unpermute_weight_grad(self, dout, y, dim, plan))
    }
    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)> {
        text(Gpu::round_trip_bf16(self, x))
    }
    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_1x128(self, x, rows, cols))
    }
    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_128x128(self, x, rows, cols))
    }
    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_transposed(self, x, rows, cols))
    }
    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        text(Gpu::fp8_dequantize(self, q))
    }
    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks> {
        text(Gpu::fp8_transpose(self, w))
    }
}

/// The launchers' `THREADS` and `grid_for` (crates/kernels/src/cuda/mod.rs): grid-stride loops
/// over `n` elements.
const THREADS: u32 = 256;

fn grid_for(n: usize) -> Launch {
    Launch::new(((n as u32).div_ceil(THREADS).clamp(1, 65_535), 1, 1), (THREADS, 1, 1), 0)
}

fn u32_of(n: usize) -> Arg<'static> {
    Arg::value(u32::try_from(n).expect("a size that fits the kernels' u32"))
}

/// The kernels in emulation, launched as the launchers of crates/kernels/src/cuda launch them
/// (dispatch.rs, tensor_ops.rs, fp8.rs); the launchers' argument checks are theirs, not
/// repeated here.
impl Kernels for Emulator {
    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; plan.len() * dim];
        let has_scale = i32::from(scale.is_some());
        let args = &mut [
            Arg::input(x),
            Arg::input(&plan.rows),
            Arg::input(scale.unwrap_or(x)),
            Arg::value(has_scale),
            Arg::output(&mut out),
            u32_of(plan.len()),
            u32_of(dim),
        ];
        self.launch("moe_permute_f32", grid_for(plan.len() * dim), args)?;
        Ok(out)
    }

    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; plan.n_tokens() * dim];
        let has_weight = i32::from(weight.is_some());
        let threads = (dim as u32).next_power_of_two().clamp(32, THREADS);
        let cfg = Launch::new((plan.n_tokens() as u32, 1, 1), (threads, 1, 1), 0);
        let args = &mut [
            Arg::input(y),
            Arg::input(weight.unwrap_or(y)),
            Arg::value(has_weight),
            Arg::input(&plan.token_offsets),
            Arg::input(&plan.token_rows),
            Arg::output(&mut out),
            u32_of(dim),
        ];
        self.launch("moe_unpermute_f32", cfg, args)?;
        Ok(out)
    }

    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>> {
        let mut dweight = vec![0.0f32; plan.len()];
        let cfg = Launch::new((plan.len() as u32, 1, 1), (THREADS, 1, 1), 8 * THREADS);
        let args =
            &mut [Arg::input(dout), Arg::input(y), Arg::input(&plan.rows), Arg::output(&mut dweight), u32_of(dim)];
        self.launch("moe_unpermute_weight_grad_f32", cfg, args)?;
        Ok(dweight)
    }

    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)> {
        let n = x.len();
        let (mut bits, mut back) = (vec![0u16; n], vec![0.0f32; n]);
        self.launch("f32_to_bf16", grid_for(n), &mut [Arg::input(x), Arg::output(&mut bits), u32_of(n)])?;
        self.launch("bf16_to_f32", grid_for(n), &mut [Arg::input(&bits), Arg::output(&mut back), u32_of(n)])?;
        Ok((bits.into_iter().map(bf16::from_bits).collect(), back))
    }

    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let blocks = rows * cols.div_ceil(128);
        quantize(self, "fp8_quantize_1x128", x, (rows, cols), Launch::new((blocks as u32, 1, 1), (128, 1, 1), 0), 1)
    }

    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let blocks = rows.div_ceil(128) * cols.div_ceil(128);
        quantize(self, "fp8_quantize_128x128", x, (rows, cols), Launch::new((blocks as u32, 1, 1), (256, 1, 1), 0), 128)
    }

    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let tiles = rows.div_ceil(128);
        let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0.0f32; cols * tiles]);
        let cfg = Launch::new((tiles as u32, cols.div_ceil(32) as u32, 1), (256, 1, 1), 0);
        let args = &mut [Arg::input(x), Arg::output(&mut codes), Arg::output(&mut scales), u32_of(rows), u32_of(cols)];
        self.launch("fp8_quantize_1x128_transposed", cfg, args)?;
        Fp8Blocks::from_parts(codes, scales, (cols, rows), (1, 128), Fp8Format::E4M3)
    }

    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        let n = q.rows * q.cols;
        let mut out = vec![0.0f32; n];
        let args = &mut [
            Arg::input(&q.codes),
            Arg::input(&q.scales),
            Arg::output(&mut out),
            u32_of(q.rows),
            u32_of(q.cols),
            u32_of(q.block.0),
            u32_of(q.block.1),
            Arg::value(i32::from(q.format == Fp8Format::E5M2)),
        ];
        self.launch("fp8_dequantize", grid_for(n), args)?;
        Ok(out)
    }

    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks> {
        let (rows, cols) = (w.rows, w.cols);
        let grid = (rows.div_ceil(128), cols.div_ceil(128));
        let (codes, scales) = (
            transpose(self, "fp8_transpose_codes", &w.codes, (rows, cols))?,
            transpose(self, "fp8_transpose_scales", &w.scales, grid)?,
        );
        Fp8Blocks::from_parts(codes, scales, (cols, rows), (128, 128), w.format)
    }
}

/// fp8_quantize_1x128 or fp8_quantize_128x128 (`block_rows` 1 or 128) of `x` `[rows, cols]`.
fn quantize(
    e: &Emulator,
    kernel: &str,
    x: &[f32],
    (rows, cols): (usize, usize),
    cfg: Launch,
    block_rows: usize,
) -> Result<Fp8Blocks> {
    let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0.0f32; cfg.grid.0 as usize]);
    let args = &mut [Arg::input(x), Arg::output(&mut codes), Arg::output(&mut scales), u32_of(rows), u32_of(cols)];
    e.launch(kernel, cfg, args)?;
    Fp8Blocks::from_parts(codes, scales, (rows, cols), (block_rows, 128), Fp8Format::E4M3)
}

/// `x` `[rows, cols]` transposed by `kernel` (32 x 32 tiles, 32 x 8 threads).
fn transpose<T: Copy + Default>(e: &Emulator, kernel: &str, x: &[T], (rows, cols): (usize, usize)) -> Result<Vec<T>> {
    let mut y = vec![T::default(); rows * cols];
    let cfg = Launch::new((cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1), (32, 8, 1), 0);
    e.launch(kernel, cfg, &mut [Arg::input(x), Arg::output(&mut y), u32_of(rows), u32_of(cols)])?;
    Ok(y)
}
