//! FP8 (spec deepseek-v3.md section 4): the block-scaled FP8 GEMM emulation (whale) against an f32
//! GEMM of the same shape (baseline; the emulation is expected to be slower on a CPU: it exists for
//! its numerics), FP8 1x128 quantisation throughput, and, printed before the timings, the GEMM's
//! relative error against an f64 GEMM of the dequantised operands for K = 512..8192 with and
//! without promotion to f32 every 128 elements (DeepSeek-V3 reports ~2% at K = 4096 without).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use whale_benches::randn;

fn vec(n: usize, seed: u64) -> Vec<f32> {
    randn(&[n], seed).to_vec_f32().expect("f32")
}
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat};
use whale_kernels::cpu::fp8_gemm::{fp8_gemm, Accumulation, BLOCK};
use whale_kernels::cpu::matmul::{matmul, MatRef};

fn quantised(x: &[f32], rows: usize, cols: usize, block: (usize, usize)) -> Fp8Blocks {
    Fp8Blocks::quantize(x, rows, cols, block, Fp8Format::E4M3, ScaleFormat::F32)
}

fn error_table() {
    eprintln!("\nFP8 GEMM relative error vs f64 (max |y - y64| / max |y64|, 4 x 64 outputs):");
    eprintln!("| K | 14-bit accumulator, promoted every 128 | 14-bit accumulator, not promoted |");
    eprintln!("|---:|---:|---:|");
    for k in [512, 1024, 2048, 4096, 8192] {
        let (m, n) = (4, 64);
        let x: Vec<f32> = vec(m * k, 1).into_iter().map(f32::abs).collect();
        let w: Vec<f32> = vec(n * k, 2).into_iter().map(|v| v.abs() * 0.05).collect();
        let (a, b) = (quantised(&x, m, k, (1, BLOCK)), quantised(&w, n, k, (BLOCK, BLOCK)));
        let (xa, wb) = (a.dequantize(), b.dequantize());
        let reference: Vec<f64> = (0..m * n)
            .map(|ij| (0..k).map(|t| xa[(ij / n) * k + t] as f64 * wb[(ij % n) * k + t] as f64).sum())
            .collect();
        let scale = reference.iter().map(|r| r.abs()).fold(0.0, f64::max);
        let err = |acc| {
            let y = fp8_gemm(&a, &b, acc);
            y.iter().zip(&reference).map(|(&v, &r)| (v as f64 - r).abs()).fold(0.0, f64::max) / scale
        };
        eprintln!("| {k} | {:.2e} | {:.2e} |", err(Accumulation::DEEPSEEK_V3), err(Accumulation::UNPROMOTED));
    }
    eprintln!();
}

fn gemm(c: &mut Criterion) {
    error_table();
    let (m, n, k) = (64, 256, 1024);
    let x = vec(m * k, 3);
    let w: Vec<f32> = vec(n * k, 4).into_iter().map(|v| v * 0.05).collect();
    let (a, b) = (quantised(&x, m, k, (1, BLOCK)), quantised(&w, n, k, (BLOCK, BLOCK)));
    let mut g = c.benchmark_group(format!("fp8_gemm_{m}x{n}x{k}"));
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    g.sample_size(10);
    // The element-by-element 14-bit emulation and the f32-partial-sum path (the training default).
    g.bench_function("whale_14bit", |bench| bench.iter(|| black_box(fp8_gemm(&a, &b, Accumulation::DEEPSEEK_V3))));
    g.bench_function("whale_f32_partials", |bench| bench.iter(|| black_box(fp8_gemm(&a, &b, Accumulation::F32))));
    let mut y = vec![0.0f32; m * n];
    g.bench_function("baseline", |bench| {
        bench.iter(|| {
            // y = x @ w^T: w [n, k] row-major read as [k, n] through its strides.
            let a = MatRef { data: &x, offset: 0, row_stride: k as isize, col_stride: 1 };
            let b = MatRef { data: &w, offset: 0, row_stride: 1, col_stride: k as isize };
            matmul(m, n, k, a, b, &mut y, false, rayon::current_num_threads());
            black_box(&y);
        })
    });
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let (rows, cols) = (1024, 4096);
    let x = vec(rows * cols, 5);
    let mut g = c.benchmark_group("fp8_quantize_1x128_1024x4096");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    g.bench_function("whale", |bench| bench.iter(|| black_box(quantised(&x, rows, cols, (1, BLOCK)))));
    g.finish();
}

criterion_group!(benches, gemm, quantize);
criterion_main!(benches);
