//! Matrix multiplication through the `gemm` crate (BLIS-style packing, runtime SIMD dispatch).
//!
//! Operands are described by strides, so a transposed view multiplies without a copy.

/// A strided 2-D operand: element `(i, j)` lives at `data[offset + i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// The longest stretch of K that one `gemm` call sums.
///
/// `gemm` sizes its K block from the L1 data cache (1024 on a 48 KiB 12-way L1, 512 on a 32 KiB
/// 8-way one), so left to itself the same product rounds differently on different CPUs. It never
/// splits a K of 512 or less, so [`matmul`] hands it K in balanced blocks of at most this many and
/// adds their products to `c` in order.
pub const K_BLOCK: usize = 512;
const _: () = assert!(K_BLOCK <= 512, "gemm splits a K block longer than 512 by cache size");

/// `c[m, n] = a[m, k] @ b[k, n]` (or `c += a @ b` when `accumulate`), `c` row-major contiguous.
///
/// `threads` is the rayon parallelism handed to `gemm` (1 = sequential); `gemm` splits rows and
/// columns over threads, never K, and K comes in the fixed blocks of [`K_BLOCK`]. So the result
/// is the same bits for any thread count and any cache sizes; only the SIMD instruction set
/// (FMA or not) can change it.
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    assert_eq!(c.len(), m * n, "matmul: output buffer has the wrong length");
    check_extent(&a, m, k, "lhs");
    check_extent(&b, k, n, "rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let block = k.div_ceil(k.div_ceil(K_BLOCK));
    for k0 in (0..k).step_by(block) {
        let kb = block.min(k - k0);
        // SAFETY: `check_extent` proved every (i, j) index of both operands lies inside its slice,
        // so the K block [k0, k0 + kb) of each does too; `c` is exactly m*n long and exclusively
        // borrowed; gemm reads/writes only those elements.
        unsafe {
            gemm::gemm(
                m,
                n,
                kb,
                c.as_mut_ptr(),
                1,
                n as isize,
                accumulate || k0 > 0,
                a.data.as_ptr().offset(a.offset as isize + k0 as isize * a.col_stride),
                a.col_stride,
                a.row_stride,
                b.data.as_ptr().offset(b.offset as isize + k0 as isize * b.row_stride),
                b.col_stride,
                b.row_stride,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
}

/// Panics unless every element of a `rows x cols` strided view lies inside `data`.
fn check_extent(x: &MatRef<'_>, rows: usize, cols: usize, what: &str) {
    if rows == 0 || cols == 0 {
        return;
    }
    let mut lo = x.offset as isize;
    let mut hi = x.offset as isize;
    for (len, stride) in [(rows, x.row_stride), (cols, x.col_stride)] {
        let span = (len as isize - 1) * stride;
        if span < 0 {
            lo += span;
        } else {
            hi += span;
        }
    }
    assert!(
        lo >= 0 && (hi as usize) < x.data.len(),
        "matmul: {what} view [{rows}x{cols}] with strides ({}, {}) at offset {} exceeds its buffer of {}",
        x.row_stride,
        x.col_stride,
        x.offset,
        x.data.len()
    );
}

/// Plain triple loop in f64, the oracle the tests compare `matmul` against.
pub fn matmul_reference(m: usize, n: usize, k: usize, a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
    let at = |x: &MatRef<'_>, i: usize, j: usize| {
        x.data[(x.offset as isize + i as isize * x.row_stride + j as isize * x.col_stride) as usize]
    };
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                s += at(&a, i, p) as f64 * at(&b, p, j) as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect()
    }

    fn row_major(data: &[f32], cols: usize) -> MatRef<'_> {
        MatRef { data, offset: 0, row_stride: cols as isize, col_stride: 1 }
    }

    #[test]
    fn matches_reference_including_transposed_views() {
        let (m, n, k) = (37, 29, 53);
        let a = seq(m * k);
        let bt = seq(n * k); // b stored as [n, k]; view it as [k, n] through strides
        let b = MatRef { data: &bt, offset: 0, row_stride: 1, col_stride: k as isize };
        let want = matmul_reference(m, n, k, row_major(&a, k), b);
        for threads in [1, 2] {
            let mut c = vec![0.0; m * n];
            matmul(m, n, k, row_major(&a, k), b, &mut c, false, threads);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn accumulate_adds_to_output() {
        let (m, n, k) = (4, 5, 6);
        let a = seq(m * k);
        let b = seq(k * n);
        let mut c = vec![1.5; m * n];
        matmul(m, n, k, row_major(&a, k), row_major(&b, n), &mut c, true, 1);
        let want = matmul_reference(m, n, k, row_major(&a, k), row_major(&b, n));
        for (x, y) in c.iter().zip(&want) {
            assert!((x - (y + 1.5)).abs() <= 1e-4 * (1.0 + y.abs()));
        }
    }

    /// What the product is on gemm's microkernel path (m * n > 256, neither a vector): each
    /// balanced K block of at most [`K_BLOCK`] summed by fused multiply-adds in order from zero,
    /// the blocks' sums added to `c` in order.
    fn blocked_fma(m: usize, n: usize, k: usize, a: MatRef<'_>, b: MatRef<'_>, c: &mut [f32], accumulate: bool) {
        let at = |x: &MatRef<'_>, i: usize, j: usize| {
            x.data[(x.offset as isize + i as isize * x.row_stride + j as isize * x.col_stride) as usize]
        };
        let blocks = k.div_ceil(K_BLOCK);
        let block = k.div_ceil(blocks);
        for i in 0..m {
            for j in 0..n {
                let mut out = accumulate.then_some(c[i * n + j]);
                for k0 in (0..k).step_by(block) {
                    let sum = (k0..k.min(k0 + block)).fold(0.0f32, |s, p| at(&a, i, p).mul_add(at(&b, p, j), s));
                    out = Some(out.map_or(sum, |o| o + sum));
                }
                c[i * n + j] = out.unwrap();
            }
        }
    }

    /// gemm picks its own K block from the L1 cache's size, which made the same product round
    /// differently on CPUs with different L1s; `matmul` must sum K in the same fixed blocks on
    /// every machine, whatever the thread count. Without the fixed blocks the first shape fails
    /// on every CPU (gemm's small-matrix path cuts 1300 into 512 + 512 + 276) and the larger
    /// ones where the L1 lets gemm take longer blocks (a 48 KiB 12-way L1: 2 x 528 for 1056).
    #[test]
    fn sums_k_in_the_same_blocks_on_every_cpu() {
        if !cfg!(target_arch = "x86_64") || !std::arch::is_x86_feature_detected!("fma") {
            eprintln!("skipped: the bitwise model is gemm's FMA kernel, and this CPU has no x86 FMA");
            return;
        }
        // (m, n, k, b transposed): gemm's small-matrix path (m, n <= 64), its cache-sized path,
        // K at and just over one block, and an uneven split (1300 = 3 x 434 - 2).
        for (m, n, k, bt) in [
            (24, 40, 1300, false),
            (70, 9, 1056, true),
            (33, 65, 512, false),
            (17, 80, 513, true),
            (130, 66, 2048, false),
        ] {
            let a = seq(m * k);
            let bd = seq(k * n);
            let b = if bt {
                MatRef { data: &bd, offset: 0, row_stride: 1, col_stride: k as isize }
            } else {
                row_major(&bd, n)
            };
            for accumulate in [false, true] {
                let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.375 - 1.0).collect();
                let mut want = start.clone();
                blocked_fma(m, n, k, row_major(&a, k), b, &mut want, accumulate);
                for threads in [1, 2] {
                    let mut c = start.clone();
                    matmul(m, n, k, row_major(&a, k), b, &mut c, accumulate, threads);
                    let diff = c.iter().zip(&want).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                    assert_eq!(diff, 0, "{m}x{n}x{k} (b transposed: {bt}, accumulate: {accumulate}, {threads} threads): {diff} elements differ from the fixed K blocks");
                }
            }
        }
    }

    #[test]
    fn zero_inner_dimension_gives_zeros() {
        let mut c = vec![3.0; 6];
        matmul(2, 3, 0, row_major(&[], 0), row_major(&[], 3), &mut c, false, 1);
        assert!(c.iter().all(|&x| x == 0.0));
    }
}
