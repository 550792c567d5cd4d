//! Launchers of kernels/tensor.cu, the generic kernels behind whale-tensor's CUDA backend. They
//! take device buffers (views for inputs, so a tensor's offset into shared storage costs nothing)
//! and never copy to the host.

use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{cuda, grid_for, need, Gpu, GpuError, Result, MAX_BLOCKS, THREADS};

/// The most dimensions a strided operand of these kernels has.
pub const MAX_RANK: usize = 6;

/// Up to two strided operands (`a`, `b`, in elements) over one row-major index space `shape`:
/// the C struct `Strided` of kernels/tensor.cu, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Strided {
    rank: u32,
    shape: [u32; MAX_RANK],
    a: [u64; MAX_RANK],
    b: [u64; MAX_RANK],
    a_off: u64,
    b_off: u64,
}

// SAFETY: a plain `repr(C)` struct of integers, laid out as the kernels' `Strided`.
unsafe impl DeviceRepr for Strided {}

/// A storage element the strided write moves unchanged, with its kernel.
pub trait StridedElement: DeviceRepr {
    const WRITE_KERNEL: &'static str;
}

impl StridedElement for f32 {
    const WRITE_KERNEL: &'static str = "strided_write_f32";
}

impl StridedElement for bf16 {
    const WRITE_KERNEL: &'static str = "strided_write_bf16";
}

impl Strided {
    /// `shape` read through `a` (strides and offset) and, for binary ops, `b` (a broadcast
    /// operand has stride 0 along its broadcast dimensions).
    pub fn new(shape: &[usize], a: (&[usize], usize), b: (&[usize], usize)) -> Result<Strided> {
        if shape.len() > MAX_RANK || a.0.len() != shape.len() || b.0.len() != shape.len() {
            return Err(GpuError::Shape(format!(
                "strided kernels take at most {MAX_RANK} dims with one stride each: shape {shape:?}, strides {:?} and {:?}",
                a.0, b.0
            )));
        }
        if shape.iter().any(|&d| d > u32::MAX as usize) {
            return Err(GpuError::Shape(format!("strided kernels: a dimension of {shape:?} exceeds 2^32")));
        }
        let mut s = Strided { rank: shape.len() as u32, a_off: a.1 as u64, b_off: b.1 as u64, ..Default::default() };
        for d in 0..shape.len() {
            s.shape[d] = shape[d] as u32;
            s.a[d] = a.0[d] as u64;
            s.b[d] = b.0[d] as u64;
        }
        Ok(s)
    }
}

/// Elementwise maps: the op codes of kernels/tensor.cu's `unary`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Sqr,
    Powf(f32),
    Sigmoid,
    Tanh,
    Relu,
    Silu,
    Gelu,
    Clamp(f32, f32),
    /// `x * mul + add`.
    Affine(f32, f32),
}

impl UnaryOp {
    /// (op code, first and second parameter).
    fn code(self) -> (i32, f32, f32) {
        use UnaryOp::*;
        match self {
            Neg => (0, 0.0, 0.0),
            Exp => (1, 0.0, 0.0),
            Log => (2, 0.0, 0.0),
            Sqrt => (3, 0.0, 0.0),
            Rsqrt => (4, 0.0, 0.0),
            Sqr => (5, 0.0, 0.0),
            Powf(e) => (6, e, 0.0),
            Sigmoid => (7, 0.0, 0.0),
            Tanh => (8, 0.0, 0.0),
            Relu => (9, 0.0, 0.0),
            Silu => (10, 0.0, 0.0),
            Gelu => (11, 0.0, 0.0),
            Clamp(lo, hi) => (12, lo, hi),
            Affine(mul, add) => (13, mul, add),
        }
    }
}

/// Binary ops over broadcast operands: the op codes of kernels/tensor.cu's `binary_f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Maximum = 4,
    /// 1.0 where `a >= b`, else 0.0.
    Ge = 5,
    /// `b` where the mask `a` is non-zero, else 0 (`where(a, b, 0)`).
    Keep = 6,
    /// 0 where the mask `a` is non-zero, else `b` (`where(a, 0, b)`).
    Drop = 7,
}

impl Gpu {
    /// `y[..n] = op(x[..n])`.
    pub fn unary_dev(&self, op: UnaryOp, x: &CudaView<'_, f32>, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        need("unary", x.len(), n)?;
        need("unary", y.len(), n)?;
        let ((code, p0, p1), n32) = (op.code(), n as u32);
        let mut l = self.stream.launch_builder(self.function("unary_f32"));
        l.arg(x).arg(y).arg(&n32).arg(&code).arg(&p0).arg(&p1);
        // SAFETY: a grid-stride loop over n elements of two buffers that hold at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("unary_f32"))?;
        Ok(())
    }

    /// `dx[..n] = g * op'(x)`, the derivative taken from the input `x` and the output `y`.
    pub fn unary_backward_dev(
        &self,
        op: UnaryOp,
        (x, y, g): (&CudaView<'_, f32>, &CudaView<'_, f32>, &CudaView<'_, f32>),
        dx: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        for len in [x.len(), y.len(), g.len(), dx.len()] {
            need("unary backward", len, n)?;
        }
        let ((code, p0, p1), n32) = (op.code(), n as u32);
        let mut l = self.stream.launch_builder(self.function("unary_backward_f32"));
        l.arg(x).arg(y).arg(g).arg(dx).arg(&n32).arg(&code).arg(&p0).arg(&p1);
        // SAFETY: a grid-stride loop over n elements of four buffers that hold at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("unary_backward_f32"))?;
        Ok(())
    }

    /// `out[i] = a op b` over `s`'s index space (`out` contiguous, `n` = its element count). The
    /// caller guarantees that `s` addresses only elements inside `a` and `b`.
    pub fn binary_dev(
        &self,
        op: BinaryOp,
        (a, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        s: &Strided,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        need("binary", out.len(), n)?;
        let (code, n32) = (op as i32, n as u32);
        let mut l = self.stream.launch_builder(self.function("binary_f32"));
        l.arg(a).arg(b).arg(out).arg(&n32).arg(&code).arg(s);
        // SAFETY: every offset `s` produces lies inside a and b (the caller's layouts), and out
        // holds n values.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("binary_f32"))?;
        Ok(())
    }

    /// `y` = the view `s.a` of `x`, contiguous (`n` elements).
    pub fn strided_copy_dev(&self, x: &CudaSlice<f32>, s: &Strided, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        need("strided copy", y.len(), n)?;
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("strided_copy_f32"));
        l.arg(x).arg(y).arg(&n32).arg(s);
        // SAFETY: as for binary_dev, with one operand.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("strided_copy_f32"))?;
        Ok(())
    }

    /// The view `s.b` of `y` = `x` (contiguous, `n` elements); `y`'s other elements keep their
    /// values. The view must not overlap itself (no stride-0 dimensions). f32 or bf16 (as bits).
    pub fn strided_write_dev<T: StridedElement>(
        &self,
        x: &CudaView<'_, T>,
        s: &Strided,
        y: &mut CudaSlice<T>,
        n: usize,
    ) -> Result<()> {
        need("strided write", x.len(), n)?;
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function(T::WRITE_KERNEL));
        l.arg(x).arg(y).arg(&n32).arg(s);
        // SAFETY: every offset `s.b` produces lies inside y (the caller's layout), and x holds n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda(T::WRITE_KERNEL))?;
        Ok(())
    }

    /// `y[..n] = value`.
    pub fn fill_dev(&self, y: &mut CudaSlice<f32>, n: usize, value: f32) -> Result<()> {
        need("fill", y.len(), n)?;
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("fill_f32"));
        l.arg(y).arg(&n32).arg(&value);
        // SAFETY: writes n values of a buffer that holds at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("fill_f32"))?;
        Ok(())
    }

    /// `y[..n]` = `x[..n]` rounded to bf16 (to nearest even), as raw bits: the narrowing of bf16
    /// storage (twin: `half::bf16::from_f32`).
    pub fn f32_to_bf16_dev(&self, x: &CudaView<'_, f32>, y: &mut CudaSlice<bf16>, n: usize) -> Result<()> {
        need("f32_to_bf16", x.len(), n)?;
        need("f32_to_bf16", y.len(), n)?;
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("f32_to_bf16"));
        l.arg(x).arg(y).arg(&n32);
        // SAFETY: a grid-stride loop over n values of two buffers holding at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("f32_to_bf16"))?;
        Ok(())
    }

    /// `y[..n]` = the bf16 bits `x[..n]` as f32 (exact): the widening of bf16 storage.
    pub fn bf16_to_f32_dev(&self, x: &CudaView<'_, bf16>, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        need("bf16_to_f32", x.len(), n)?;
        need("bf16_to_f32", y.len(), n)?;
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("bf16_to_f32"));
        l.arg(x).arg(y).arg(&n32);
        // SAFETY: a grid-stride loop over n values of two buffers holding at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("bf16_to_f32"))?;
        Ok(())
    }

    /// `x` rounded to bf16 on the GPU and back, from the host: the bits (for the GPU test).
    pub fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)> {
        let n = x.len();
        let (dx, mut bits, mut back) = (self.upload_nonempty(x)?, self.zeros::<bf16>(n)?, self.zeros::<f32>(n)?);
        self.f32_to_bf16_dev(&dx.slice(..), &mut bits, n)?;
        self.bf16_to_f32_dev(&bits.slice(..), &mut back, n)?;
        Ok((self.download(&bits, n)?, self.download(&back, n)?))
    }

    /// `y[o, i] = Σ_j x[o, j, i]` for contiguous `x` `[outer, n, inner]`, in f64 like the CPU: one
    /// thread per output, or, for a long axis of few outputs or of contiguous values, one block per
    /// output whose threads split the axis, or, for a very long axis of fewer than 128 outputs (a
    /// whole tensor's sum), several blocks per output and a second pass over their f64 partial
    /// sums ([`split_sum`]). The wide and split sums add in f64 in another order:
    /// the CPU's f32 result, or one ulp off it when the exact sum lies within f64 rounding of a
    /// boundary.
    pub fn sum_mid_dev(
        &self,
        x: &CudaView<'_, f32>,
        y: &mut CudaSlice<f32>,
        (outer, n, inner): (usize, usize, usize),
    ) -> Result<()> {
        need("sum", x.len(), outer * n * inner)?;
        need("sum", y.len(), outer * inner)?;
        let dims = mid_dims("sum", (outer, n, inner))?;
        if let Some(chunks) = split_sum(outer * inner, n) {
            return self.sum_mid_split(x, y, dims, chunks);
        }
        let wide = reduces_wide(outer, n, inner);
        let kernel = if wide { "sum_mid_wide_f32" } else { "sum_mid_f32" };
        let mut l = self.stream.launch_builder(self.function(kernel));
        l.arg(x).arg(y).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
        // SAFETY: each output (a thread's, or a block's in grid-stride) reads its n inputs, all
        // inside x; the wide kernel's shared memory holds a double per thread.
        unsafe { l.launch(mid_config(wide, outer * inner)?) }.map_err(cuda(kernel))?;
        Ok(())
    }

    /// [`Gpu::sum_mid_dev`] in two passes: `chunks` blocks per output sum equal runs of its axis
    /// into f64 partials, then a block per output adds its partials in order.
    fn sum_mid_split(
        &self,
        x: &CudaView<'_, f32>,
        y: &mut CudaSlice<f32>,
        [outer, n, inner]: [u32; 3],
        chunks: u32,
    ) -> Result<()> {
        let outputs = outer * inner;
        // SAFETY: every partial is written by the first pass before the second reads it.
        let mut partial = unsafe { self.stream.alloc::<f64>(outputs as usize * chunks as usize) }
            .map_err(cuda("allocating the partial sums"))?;
        let mut l = self.stream.launch_builder(self.function("sum_mid_split_f32"));
        l.arg(x).arg(&mut partial).arg(&n).arg(&inner).arg(&chunks);
        let cfg = LaunchConfig { grid_dim: (outputs * chunks, 1, 1), ..mid_config(true, 1)? };
        // SAFETY: block b reads run b % chunks of output b / chunks (inside x: need() above) and
        // writes partial[b], one of outputs * chunks; shared memory holds a double per thread.
        unsafe { l.launch(cfg) }.map_err(cuda("sum_mid_split_f32"))?;
        let mut l = self.stream.launch_builder(self.function("sum_partials_f32"));
        l.arg(&partial).arg(y).arg(&outputs).arg(&chunks);
        // SAFETY: a block per output (grid-stride) reads its chunks partials and writes y[t].
        unsafe { l.launch(mid_config(true, outputs as usize)?) }.map_err(cuda("sum_partials_f32"))?;
        Ok(())
    }
}

/// How many blocks share each output of a sum over `n` values when `outputs` are too few to fill
/// the GPU a block each (`None`: one block or thread per output). Each block takes at least
/// `SPLIT_RUN` values, and all of them about `SPLIT_BLOCKS`, several per multiprocessor of any
/// current GPU; the count depends on the shape alone, so a sum gives the same bits on every GPU.
fn split_sum(outputs: usize, n: usize) -> Option<u32> {
    const SPLIT_RUN: usize = 16_384;
    const SPLIT_BLOCKS: usize = 1024;
    if outputs == 0 || outputs >= 128 || n < 2 * SPLIT_RUN {
        return None;
    }
    Some((n / SPLIT_RUN).min(SPLIT_BLOCKS / outputs).max(1) as u32)
}

#[cfg(test)]
mod tests {
    use super::split_sum;

    #[test]
    fn a_sum_splits_into_runs_of_at_least_16384_and_about_1024_blocks() {
        // (outputs, n) -> chunks per output
        let cases = [
            ((1, 1_200_000), Some(73)),     // a whole tensor: n / 16384 runs
            ((1, 1 << 30), Some(1024)),     // capped at 1024 blocks
            ((100, 20 * 16_384), Some(10)), // 1024 / 100 blocks per output
            ((127, 1 << 20), Some(8)),
            ((128, 1 << 20), None),      // enough outputs for a block each
            ((1, 2 * 16_384 - 1), None), // too short to split
            ((0, 1 << 20), None),
        ];
        for ((outputs, n), want) in cases {
            assert_eq!(split_sum(outputs, n), want, "{outputs} outputs of {n}");
        }
    }
}

/// The launch of a middle-axis reduction with `outputs` outputs: a thread each, or for the wide
/// kernels a block each (grid-stride) with 8 bytes of shared memory per thread.
fn mid_config(wide: bool, outputs: usize) -> Result<LaunchConfig> {
    if !wide {
        return grid_for(outputs);
    }
    let blocks = outputs.clamp(1, MAX_BLOCKS as usize) as u32;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 8 * THREADS })
}

/// `[outer, n, inner]` as the kernels' 32-bit sizes (their offsets are 64-bit). The reduced axis
/// stays [`MAX_MID_AXIS`] short of 32 bits: the kernels step their 32-bit index along it by up to
/// four blocks' width, and the split sum rounds it up to whole runs.
fn mid_dims(kernel: &str, (outer, n, inner): (usize, usize, usize)) -> Result<[u32; 3]> {
    let fit = |d: usize, most: usize| {
        u32::try_from(d).ok().filter(|&d| d as usize <= most).ok_or_else(|| {
            GpuError::Shape(format!("{kernel}: an axis of {d} values exceeds 32-bit sizes (at most {most})"))
        })
    };
    Ok([fit(outer, u32::MAX as usize)?, fit(n, MAX_MID_AXIS)?, fit(inner, u32::MAX as usize)?])
}

/// The longest axis a middle-axis reduction takes (see [`mid_dims`]).
const MAX_MID_AXIS: usize = u32::MAX as usize - 8 * THREADS as usize;

/// Whether a middle-axis reduction ([`Gpu::sum_mid_dev`], [`Gpu::reduce_mid_dev`]) gives each
/// output a block: the axis is long (`WIDE_SUM_MIN` values), and its values are contiguous
/// (`inner == 1`, so a block's threads read them coalesced) or the outputs too few to fill the
/// GPU one thread each.
fn reduces_wide(outer: usize, n: usize, inner: usize) -> bool {
    const WIDE_SUM_MIN: usize = 4096;
    n >= WIDE_SUM_MIN && (inner == 1 || outer * inner <= 1024)
}

/// The reductions over the middle axis of `[outer, n, inner]` besides the sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidReduction {
    /// The index of the first maximum (NaN counts as the maximum), as a float.
    Argmax,
    /// `log Σ exp`, stable (max subtracted), summed in f64.
    LogSumExp,
}

impl Gpu {
    /// `out = c != 0 ? t : f` over `n` contiguous values.
    pub fn select_dev(
        &self,
        (c, t, f): (&CudaView<'_, f32>, &CudaView<'_, f32>, &CudaView<'_, f32>),
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        for len in [c.len(), t.len(), f.len(), out.len()] {
            need("select", len, n)?;
        }
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("select_f32"));
        l.arg(c).arg(t).arg(f).arg(out).arg(&n32);
        // SAFETY: a grid-stride loop over n elements of four buffers holding at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("select_f32"))?;
        Ok(())
    }

    /// `y[o, i]` = `reduction` of `x[o, :, i]` for contiguous `x`.
    pub fn reduce_mid_dev(
        &self,
        reduction: MidReduction,
        x: &CudaView<'_, f32>,
        y: &mut CudaSlice<f32>,
        (outer, n, inner): (usize, usize, usize),
    ) -> Result<()> {
        need("reduction", x.len(), outer * n * inner)?;
        need("reduction", y.len(), outer * inner)?;
        // A long axis of few outputs (a vocabulary's logits) gets a block per output, as the sum.
        let wide = reduces_wide(outer, n, inner);
        let kernel = match (reduction, wide) {
            (MidReduction::Argmax, false) => "argmax_mid_f32",
            (MidReduction::Argmax, true) => "argmax_mid_wide_f32",
            (MidReduction::LogSumExp, false) => "logsumexp_mid_f32",
            (MidReduction::LogSumExp, true) => "logsumexp_mid_wide_f32",
        };
        let dims = mid_dims(kernel, (outer, n, inner))?;
        let mut l = self.stream.launch_builder(self.function(kernel));
        l.arg(x).arg(y).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
        // SAFETY: each output (a thread's, or a block's in grid-stride) reads its n inputs, all
        // inside x; the wide kernels' shared memory holds 8 bytes per thread (a double, or a
        // float and an index).
        unsafe { l.launch(mid_config(wide, outer * inner)?) }.map_err(cuda(kernel))?;
        Ok(())
    }
}
