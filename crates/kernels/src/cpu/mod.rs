//! CPU kernels. One file per op, forward and backward side by side.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dispatch;
pub mod embedding;
pub mod expf;
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

/// Elements per rayon task of the elementwise kernels: a fixed size, so the partition depends only
/// on the length.
pub(crate) const ELEMENTWISE_CHUNK: usize = 1 << 14;

/// `chunk(x_part, out_part)` over matching parts of `x` and `out`, [`ELEMENTWISE_CHUNK`] elements
/// each, in parallel: an elementwise map whose chunks run a [`wide_fn!`] build.
pub(crate) fn map_chunks(what: &str, x: &[f32], out: &mut [f32], chunk: impl Fn(&[f32], &mut [f32]) + Sync) {
    use rayon::prelude::*;
    assert_eq!(x.len(), out.len(), "{what}: x and out differ in length");
    out.par_chunks_mut(ELEMENTWISE_CHUNK).zip(x.par_chunks(ELEMENTWISE_CHUNK)).for_each(|(out, x)| chunk(x, out));
}

/// Rows per rayon task for row-wise kernels: big enough to amortise scheduling, small enough to
/// balance over a few cores. Depends only on the row length, so partitions are reproducible.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(1, 1024)
}

/// Whether this CPU runs the AVX2 + FMA builds of [`wide_fn!`].
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `fn $name(args)` calling `$inner(args)` (an `#[inline(always)]` function) from a copy compiled
/// for AVX2 and FMA where the CPU has them: what `$inner` inlines gets 256-bit lanes and a fused
/// instruction for each explicit `mul_add` (the portable build calls libm's `fmaf` or `fma`).
/// Rust never fuses or reorders float operations on its own, so both builds give the same bits.
macro_rules! wide_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $inner:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn built_wide($($arg: $ty),*) {
                $inner($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::cpu::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { built_wide($($arg),*) };
            }
            $inner($($arg),*)
        }
    };
}
pub(crate) use wide_fn;
