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

/// `c[m, n] = a[m, k] @ b[k, n]` (or `c += a @ b` when `accumulate`), `c` row-major contiguous.
///
/// `threads` is the rayon parallelism handed to `gemm` (1 = sequential). With the same thread count
/// the summation order is fixed, so results are reproducible bit for bit.
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
    // SAFETY: `check_extent` proved every (i, j) index of both operands lies inside its slice, and
    // `c` is exactly m*n long and exclusively borrowed; gemm reads/writes only those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.col_stride,
            a.row_stride,
            b.data.as_ptr().add(b.offset),
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

    #[test]
    fn zero_inner_dimension_gives_zeros() {
        let mut c = vec![3.0; 6];
        matmul(2, 3, 0, row_major(&[], 0), row_major(&[], 3), &mut c, false, 1);
        assert!(c.iter().all(|&x| x == 0.0));
    }
}
