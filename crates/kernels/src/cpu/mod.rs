//! CPU kernels. One file per op, forward and backward side by side.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dispatch;
pub mod embedding;
pub mod fp8;
pub mod fp8_gemm;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod router;
pub mod softmax;
pub mod swiglu;

pub(crate) mod reduce;
#[cfg(test)]
pub(crate) mod test_util;

/// Rows per rayon task for row-wise kernels: big enough to amortise scheduling, small enough to
/// balance over a few cores. Depends only on the row length, so partitions are reproducible.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(1, 1024)
}
