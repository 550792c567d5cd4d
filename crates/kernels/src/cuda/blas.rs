//! Matrix products through cuBLAS (loaded at run time like the driver): row-major, optionally
//! batched `C = A · B` or `A · Bᵀ` in f32 or bf16 (f32 accumulation), and the MoE grouped expert
//! GEMM. The device-level calls take and fill buffers already on the GPU (what benchmarks and a
//! device tensor use); the host-slice calls copy in and out for tests.
//!
//! cuBLAS is column-major. A row-major `C[m, n]` is the column-major `Cᵀ[n, m] = op(B)ᵀ · Aᵀ`, so
//! every call swaps the operands and never copies a transpose.

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::{cuda, Gpu, GpuError, Result};

/// The element types cuBLAS multiplies here (f32 accumulation for both).
pub trait BlasFloat: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
where
    CudaBlas: Gemm<Self>,
{
    const ONE: Self;
    const ZERO: Self;
}

impl BlasFloat for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl BlasFloat for bf16 {
    const ONE: Self = bf16::ONE;
    const ZERO: Self = bf16::ZERO;
}

/// `C[batch, m, n] = A[batch, m, k] · B`, with `B` stored `[batch, k, n]`, or `[batch, n, k]`
/// (`b_transposed`, the `nn.Linear` weight layout: `y = x Wᵀ`). All row-major and contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub b_transposed: bool,
}

impl GemmShape {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmShape { batch: 1, m, n, k, b_transposed: false }
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ`.
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        GemmShape { batch: 1, m, n, k, b_transposed: true }
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }

    fn check(&self, a: usize, b: usize, c: usize) -> Result<()> {
        let (bt, m, n, k) = (self.batch, self.m, self.n, self.k);
        if a != bt * m * k || b != bt * k * n || c != bt * m * n {
            return Err(GpuError::Shape(format!(
                "gemm {self:?}: buffers of {a}, {b} and {c} elements, expected {}, {} and {}",
                bt * m * k,
                bt * k * n,
                bt * m * n
            )));
        }
        if [m, n, k, bt].iter().any(|&d| d > i32::MAX as usize) {
            return Err(GpuError::Shape(format!("gemm {self:?}: dimensions exceed cuBLAS's 32-bit sizes")));
        }
        Ok(())
    }

    /// The column-major call computing this row-major product (operands swapped: B first).
    fn config<T: BlasFloat>(&self) -> StridedBatchedConfig<T>
    where
        CudaBlas: Gemm<T>,
    {
        let (m, n, k) = (self.m as i32, self.n as i32, self.k as i32);
        let gemm = GemmConfig {
            // Row-major B[k, n] read column-major is Bᵀ (ld n); row-major B[n, k] is B (ld k).
            transa: if self.b_transposed { CUBLAS_OP_T } else { CUBLAS_OP_N },
            transb: CUBLAS_OP_N,
            m: n,
            n: m,
            k,
            alpha: T::ONE,
            lda: if self.b_transposed { k } else { n },
            ldb: k,
            beta: T::ZERO,
            ldc: n,
        };
        StridedBatchedConfig {
            gemm,
            batch_size: self.batch as i32,
            stride_a: (self.k * self.n) as i64,
            stride_b: (self.m * self.k) as i64,
            stride_c: (self.m * self.n) as i64,
        }
    }
}

impl Gpu {
    /// The cuBLAS handle on this GPU's stream, created at first use.
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only probes whether the library can be loaded (cudarc panics on a missing one).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::Cuda { what: "loading cuBLAS".into(), msg: "libcublas was not found".into() });
        }
        let blas = CudaBlas::new(self.stream.clone())
            .map_err(|e| GpuError::Cuda { what: "creating a cuBLAS handle".into(), msg: format!("{e:?}") })?;
        // A bf16 product is summed in f32 and rounded once, as on the CPU: no split-K partial
        // sums reduced in bf16 (which cuBLAS's default math mode allows for bf16 outputs).
        let mode = cudarc::cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
        // SAFETY: the handle was just created and is not yet shared.
        let status = unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(GpuError::Cuda { what: "setting cuBLAS's math mode".into(), msg: format!("{status:?}") });
        }
        Ok(self.blas.get_or_init(|| blas))
    }

    /// `c = a · b` on device buffers (see [`GemmShape`]).
    pub fn gemm_dev<T, A, B, C>(&self, shape: &GemmShape, a: &A, b: &B, c: &mut C) -> Result<()>
    where
        T: BlasFloat,
        CudaBlas: Gemm<T>,
        A: DevicePtr<T>,
        B: DevicePtr<T>,
        C: DevicePtrMut<T>,
    {
        shape.check(a.len(), b.len(), c.len())?;
        if shape.m == 0 || shape.n == 0 || shape.batch == 0 {
            return Ok(());
        }
        if shape.k == 0 {
            // An empty sum (an expert's weight gradient in a step that gave it no tokens): zeros,
            // written here rather than left to cuBLAS's handling of k = 0.
            return self.stream.memset_zeros(c).map_err(cuda("cuBLAS gemm with k = 0"));
        }
        let blas = self.blas()?;
        let cfg = shape.config::<T>();
        // SAFETY: the buffers hold exactly the elements the shape addresses (checked above), and
        // the config's leading dimensions and strides describe those row-major layouts.
        let r = unsafe {
            if shape.batch == 1 {
                blas.gemm(cfg.gemm, b, a, c)
            } else {
                blas.gemm_strided_batched(cfg, b, a, c)
            }
        };
        r.map_err(|e| GpuError::Cuda { what: "cuBLAS gemm".into(), msg: format!("{e:?}") })
    }

    /// `a · b` from host slices (twin: `cpu::matmul::matmul`).
    pub fn matmul<T: BlasFloat>(&self, shape: &GemmShape, a: &[T], b: &[T]) -> Result<Vec<T>>
    where
        CudaBlas: Gemm<T>,
    {
        let c_len = shape.batch * shape.m * shape.n;
        shape.check(a.len(), b.len(), c_len)?;
        let (da, db, mut dc) = (self.upload(a)?, self.upload(b)?, self.zeros::<T>(c_len)?);
        let mut view = dc.slice_mut(..c_len);
        self.gemm_dev(shape, &da.slice(..a.len()), &db.slice(..b.len()), &mut view)?;
        self.download(&dc, c_len)
    }

    /// The MoE expert GEMM on device buffers: rows of `x` (`[rows, k]`) come in consecutive groups
    /// of `group_sizes[e]` rows, and group `e` is multiplied by `weights[e]ᵀ` (`weights`:
    /// `[experts, n, k]`) into `y` (`[rows, n]`). One cuBLAS call per non-empty group.
    pub fn grouped_gemm_dev<T: BlasFloat>(
        &self,
        x: &CudaSlice<T>,
        group_sizes: &[usize],
        weights: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        (n, k): (usize, usize),
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        let rows: usize = group_sizes.iter().sum();
        if x.len() < rows * k || weights.len() < group_sizes.len() * n * k || y.len() < rows * n {
            return Err(GpuError::Shape(format!(
                "grouped gemm: {} groups of {rows} rows, [{n}, {k}] weights: buffers too small",
                group_sizes.len()
            )));
        }
        let mut start = 0;
        for (e, &g) in group_sizes.iter().enumerate() {
            if g > 0 {
                let shape = GemmShape::linear(g, n, k);
                let xs = x.slice(start * k..(start + g) * k);
                let ws = weights.slice(e * n * k..(e + 1) * n * k);
                let mut ys = y.slice_mut(start * n..(start + g) * n);
                self.gemm_dev(&shape, &xs, &ws, &mut ys)?;
            }
            start += g;
        }
        Ok(())
    }

    /// [`Gpu::grouped_gemm_dev`] from host slices (twin: `Tensor::grouped_matmul`'s forward, one
    /// `cpu::matmul::matmul` per group).
    pub fn grouped_matmul<T: BlasFloat>(
        &self,
        x: &[T],
        group_sizes: &[usize],
        weights: &[T],
        (n, k): (usize, usize),
    ) -> Result<Vec<T>>
    where
        CudaBlas: Gemm<T>,
    {
        let rows: usize = group_sizes.iter().sum();
        if x.len() != rows * k || weights.len() != group_sizes.len() * n * k {
            return Err(GpuError::Shape(format!(
                "grouped matmul: {} values of x and {} of weights for {rows} rows, {} groups of [{n}, {k}]",
                x.len(),
                weights.len(),
                group_sizes.len()
            )));
        }
        let (dx, dw, mut dy) = (self.upload(x)?, self.upload(weights)?, self.zeros::<T>(rows * n)?);
        self.grouped_gemm_dev(&dx, group_sizes, &dw, &mut dy, (n, k))?;
        self.download(&dy, rows * n)
    }
}
