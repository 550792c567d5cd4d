//! The block-scaled FP8 GEMM launchers (kernels/fp8_gemm.cu): DeepGEMM's interface (spec 8.1),
//! `y[m, n] = a[m, k] · b[n, k]ᵀ` on E4M3 operands with per-block f32 scales, the partial sums
//! of every 128 of K promoted to f32 with the two scales.

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};

use super::{cuda, Gpu, GpuError, Result};
use crate::cpu::fp8::{Fp8Blocks, Fp8Format};

/// An [`Fp8Blocks`] operand on the GPU: `codes` `[rows, cols]` E4M3 and `scales`
/// `[ceil(rows / block_rows), ceil(cols / 128)]`.
#[derive(Debug)]
pub struct Fp8Operand {
    pub codes: CudaSlice<u8>,
    pub scales: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
    pub block_rows: usize,
}

impl Fp8Operand {
    pub fn view(&self) -> Fp8View<'_> {
        Fp8View {
            codes: self.codes.slice(..),
            scales: self.scales.slice(..),
            rows: self.rows,
            cols: self.cols,
            block_rows: self.block_rows,
        }
    }
}

/// An operand's codes and scales borrowed from device memory (an [`Fp8Operand`], or an FP8
/// tensor's storage): the same layout.
#[derive(Debug)]
pub struct Fp8View<'a> {
    pub codes: CudaView<'a, u8>,
    pub scales: CudaView<'a, f32>,
    pub rows: usize,
    pub cols: usize,
    pub block_rows: usize,
}

/// Which kernel multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8GemmKernel {
    /// Hopper's warpgroup MMA (`wgmma` on E4M3, sm_90 only; kernels/fp8_gemm_wgmma.cu): 128 x 128
    /// tiles fed by a 4-stage cp.async ring; needs `k % 16 == 0`. On an H200 it ran 1.8 to 2.2
    /// times the tensor-core kernel's rate at DeepSeek-V3's shapes and 1.24 to 1.47 times at the
    /// `small` preset's (scripts/reports/gpu-check-h200-2026-12-04*.md), but Hopper's FP8 MMA
    /// adds its products in limited precision inside each 128 of K (DeepSeek-V3's report, 3.5.2;
    /// errors up to 2.3e-4 of the largest output there, where the tensor-core kernel passes its
    /// test's 1e-5), so it is opt-in ([`Gpu::set_fp8_gemm_kernel`]): the default matches the f32
    /// CPU twin.
    Wgmma = 0,
    /// Tensor cores (`mma.sync` on E4M3, sm_89+, f32 accumulation), 128 x 128 tiles; needs
    /// `k % 16 == 0`. The default.
    TensorCore = 1,
    /// One thread per output on the CUDA cores: the simple reference version.
    Simple = 2,
}

impl Fp8GemmKernel {
    /// From the fastest kernel to the simplest.
    const ALL: [Fp8GemmKernel; 3] = [Fp8GemmKernel::Wgmma, Fp8GemmKernel::TensorCore, Fp8GemmKernel::Simple];

    /// The kernel's entry point in kernels/fp8_gemm*.cu.
    pub fn entry(self) -> &'static str {
        match self {
            Fp8GemmKernel::Wgmma => "fp8_gemm_wgmma",
            Fp8GemmKernel::TensorCore => "fp8_gemm_mma",
            Fp8GemmKernel::Simple => "fp8_gemm_promoted",
        }
    }

    /// Whether a GPU of compute capability `arch` runs this kernel for a product over `k`.
    pub fn runs_on(self, arch: (u32, u32), k: usize) -> bool {
        match self {
            Fp8GemmKernel::Wgmma => arch == (9, 0) && k % 16 == 0,
            // Ada (8.9) loads its module's sm_89 PTX (`// uses: sm_89`); in the sm_80 PTX the
            // kernel's body is a trap.
            Fp8GemmKernel::TensorCore => arch >= (8, 9) && k % 16 == 0,
            Fp8GemmKernel::Simple => true,
        }
    }

    /// `preferred` where it `runs`, else the next simpler kernel that does.
    pub fn choose(preferred: Fp8GemmKernel, runs: impl Fn(Fp8GemmKernel) -> bool) -> Fp8GemmKernel {
        Self::ALL[preferred as usize..].iter().copied().find(|&x| runs(x)).unwrap_or(Fp8GemmKernel::Simple)
    }
}

/// The most blocks a launch's grid has along y (CUDA's limit).
const MAX_GRID_Y: usize = 65_535;

/// kernels/fp8_gemm_wgmma.cu's WG_SMEM_BYTES: 4 stages of two 16 KB E4M3 tiles and their 1 KB
/// of scales, and 1 KB of slack to align the first stage to 1024 bytes.
pub const WGMMA_SHARED_BYTES: usize = 1024 + 4 * (2 * 128 * 128 + 2 * 128 * 4);

impl Gpu {
    /// Copies an E4M3 operand tiled 128 along K to the GPU.
    pub fn upload_fp8(&self, x: &Fp8Blocks) -> Result<Fp8Operand> {
        if x.block.1 != 128 || x.format != Fp8Format::E4M3 {
            return Err(GpuError::Shape(format!(
                "fp8 gemm: an E4M3 operand tiled 128 along K is required, got {:?} tiles of {:?}",
                x.block, x.format
            )));
        }
        Ok(Fp8Operand {
            codes: self.upload(&x.codes)?,
            scales: self.upload(&x.scales)?,
            rows: x.rows,
            cols: x.cols,
            block_rows: x.block.0,
        })
    }

    /// Prefers `kernel` for FP8 GEMMs from now on (where it cannot run, the next simpler one
    /// that can). The default is [`Fp8GemmKernel::TensorCore`].
    pub fn set_fp8_gemm_kernel(&self, kernel: Fp8GemmKernel) {
        self.fp8_gemm.store(kernel as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this GPU runs `kernel` for a product over `k` (its architecture, and its driver
    /// having loaded the kernel).
    pub fn runs_fp8_gemm(&self, kernel: Fp8GemmKernel, k: usize) -> bool {
        kernel.runs_on(self.arch, k) && self.has_kernel(kernel.entry())
    }

    /// The kernel preferred for FP8 GEMMs (see [`Gpu::set_fp8_gemm_kernel`]).
    pub fn preferred_fp8_gemm_kernel(&self) -> Fp8GemmKernel {
        match self.fp8_gemm.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Fp8GemmKernel::Wgmma,
            1 => Fp8GemmKernel::TensorCore,
            _ => Fp8GemmKernel::Simple,
        }
    }

    /// The kernel a product over `k` runs on: the preferred one, or the next simpler one this
    /// GPU runs.
    pub fn fp8_gemm_kernel(&self, k: usize) -> Fp8GemmKernel {
        Fp8GemmKernel::choose(self.preferred_fp8_gemm_kernel(), |x| self.runs_fp8_gemm(x, k))
    }

    /// `y = a · bᵀ` on device operands into `y` (`[a.rows, b.rows]`).
    pub fn fp8_gemm_dev(
        &self,
        a: &Fp8View<'_>,
        b: &Fp8View<'_>,
        y: &mut CudaSlice<f32>,
        kernel: Fp8GemmKernel,
    ) -> Result<()> {
        let (m, n, k) = (a.rows, b.rows, a.cols);
        // Views may come from tensors: every buffer must hold what the kernels read.
        let holds = |o: &Fp8View<'_>| {
            o.block_rows > 0
                && o.codes.len() >= o.rows * o.cols
                && o.scales.len() >= o.rows.div_ceil(o.block_rows) * o.cols.div_ceil(128)
        };
        if b.cols != k || y.len() < m * n || !holds(a) || !holds(b) {
            return Err(GpuError::Shape(format!(
                "fp8 gemm: [{m}, {k}] x [{n}, {}]ᵀ into {} values (or buffers short of their shapes)",
                b.cols,
                y.len()
            )));
        }
        if !self.runs_fp8_gemm(kernel, k) {
            let why = if kernel.runs_on(self.arch, k) {
                format!("did not load: {}", self.unloaded_modules().join("; "))
            } else {
                let arch = if kernel == Fp8GemmKernel::Wgmma { "sm_90" } else { "sm_89+" };
                format!("needs {arch} and k % 16 == 0 (sm_{}{}, k = {k})", self.arch.0, self.arch.1)
            };
            return Err(GpuError::Shape(format!("fp8 gemm: the {kernel:?} kernel {why}")));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            // An empty sum (a Wgrad over no tokens: an expert that got none).
            return self.stream.memset_zeros(y).map_err(cuda("fp8 gemm with k = 0"));
        }
        if 128 % a.block_rows != 0 {
            return Err(GpuError::Shape(format!("fp8 gemm: row blocks of {} do not divide 128", a.block_rows)));
        }
        // The tensor-core kernels copy 16 bytes at a time: a view starting elsewhere in its
        // buffer is the caller's to copy (whale-tensor does), never a misaligned load.
        let aligned = |o: &Fp8View<'_>| o.codes.device_ptr(&self.stream).0 % 16 == 0;
        if kernel != Fp8GemmKernel::Simple && !(aligned(a) && aligned(b)) {
            return Err(GpuError::Shape(format!(
                "fp8 gemm: the {kernel:?} kernel loads 16 bytes at a time, so both operands' codes must start \
                 16-byte aligned (copy a view that starts inside its buffer)"
            )));
        }
        let name = kernel.entry();
        let (row_tile, block_dim, shared) = match kernel {
            Fp8GemmKernel::Wgmma => (128, (256, 1, 1), WGMMA_SHARED_BYTES as u32),
            Fp8GemmKernel::TensorCore => (128, (256, 1, 1), 0),
            Fp8GemmKernel::Simple => (16, (16, 16, 1), 0),
        };
        // A grid's y (the row tiles) stops at 65535: taller products run in chunks of rows,
        // a launch each over their slice of `a`, its scales and `y` (whole scale blocks).
        let chunk = MAX_GRID_Y * row_tile / 128 * 128;
        let scale_cols = k.div_ceil(128);
        let (ar, br, n32, k32) = (a.block_rows as u32, b.block_rows as u32, n as u32, k as u32);
        for r0 in (0..m).step_by(chunk) {
            let rows = chunk.min(m - r0);
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(row_tile) as u32, rows.div_ceil(row_tile) as u32, 1),
                block_dim,
                shared_mem_bytes: shared,
            };
            let (codes, scales) =
                (a.codes.slice(r0 * k..(r0 + rows) * k), a.scales.slice(r0 / a.block_rows * scale_cols..));
            let mut out = y.slice_mut(r0 * n..(r0 + rows) * n);
            let m32 = rows as u32;
            let mut l = self.stream.launch_builder(self.function(name));
            l.arg(&codes).arg(&scales).arg(&ar).arg(&b.codes).arg(&b.scales).arg(&br);
            l.arg(&mut out).arg(&m32).arg(&n32).arg(&k32);
            // SAFETY: every kernel reads only rows < m (n) and columns < k of the operands, whose
            // scale grids `Fp8Blocks` guarantees, and writes y inside [m, n] (here: this chunk's
            // rows of each); the tensor-core kernels' 16-byte loads need k % 16 == 0, checked
            // above (runs_fp8_gemm), and chunks start at multiples of 128 rows, so at multiples
            // of 16 bytes; the wgmma kernel needs its shared memory, allowed by Gpu::new.
            unsafe { l.launch(cfg) }.map_err(cuda(name))?;
        }
        Ok(())
    }

    /// The block-scaled FP8 GEMM `a bᵀ` with f32 promotion every 128 of K from host operands
    /// (twin: `fp8_gemm` with `Accumulation::F32`), on the fastest kernel this GPU runs.
    pub fn fp8_gemm(&self, a: &Fp8Blocks, b: &Fp8Blocks) -> Result<Vec<f32>> {
        self.fp8_gemm_with(a, b, self.fp8_gemm_kernel(a.cols))
    }

    /// [`Gpu::fp8_gemm`] on a chosen kernel.
    pub fn fp8_gemm_with(&self, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel) -> Result<Vec<f32>> {
        let (da, db) = (self.upload_fp8(a)?, self.upload_fp8(b)?);
        let mut y = self.zeros::<f32>(a.rows * b.rows)?;
        self.fp8_gemm_dev(&da.view(), &db.view(), &mut y, kernel)?;
        self.download(&y, a.rows * b.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::Fp8GemmKernel::{self, Simple, TensorCore, Wgmma};

    #[test]
    fn a_kernel_falls_back_to_the_next_simpler_one_the_gpu_runs() {
        let choose = |preferred, arch, k| Fp8GemmKernel::choose(preferred, |x: Fp8GemmKernel| x.runs_on(arch, k));
        // (preferred, compute capability, k) -> chosen
        let cases = [
            (Wgmma, (9, 0), 128, Wgmma),
            (Wgmma, (9, 0), 100, Simple),     // 16-byte copies need k % 16 == 0
            (Wgmma, (8, 9), 128, TensorCore), // Ada: FP8 mma.sync (its module's sm_89 PTX)
            (Wgmma, (8, 9), 100, Simple),
            (Wgmma, (10, 0), 128, TensorCore), // compute_90a PTX loads on sm_90 only
            (Wgmma, (8, 0), 128, Simple),      // no FP8 tensor cores
            (TensorCore, (9, 0), 128, TensorCore),
            (TensorCore, (8, 0), 128, Simple),
            (TensorCore, (8, 6), 128, Simple), // Ampere's consumer GPUs: no FP8 either
            (Simple, (9, 0), 128, Simple),
        ];
        for (preferred, arch, k, want) in cases {
            assert_eq!(choose(preferred, arch, k), want, "{preferred:?} on sm_{}{} over k = {k}", arch.0, arch.1);
            assert!(want.runs_on(arch, k));
        }
    }
}
