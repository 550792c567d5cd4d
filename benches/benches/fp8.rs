//! FP8 (spec deepseek-v3.md section 4), each beside an f32 baseline in the same run:
//! - the block-scaled FP8 GEMM with f32 partial sums (the training path) and with the emulated
//!   14-bit accumulator, against an f32 GEMM of the same shape (on a CPU FP8 brings no speed: the
//!   codes are decoded to f32; the emulation exists for its numerics);
//! - the FP8 linear layer's forward and backward (three FP8 GEMMs plus online quantization)
//!   against the f32 linear layer's;
//! - the MoE expert MLP with its SwiGLU inputs cached in FP8 against the same MLP keeping them;
//! - FP8 1x128 quantisation throughput, against one thread encoding value by value;
//! - printed before the timings: the GEMM's relative error against an f64 GEMM of the dequantised
//!   operands for K = 512..8192 with and without promotion (DeepSeek-V3 reports ~2% at K = 4096
//!   without), and the `tiny` preset trained in fp32, bf16 and fp8 (also with the MoE dispatch in
//!   FP8, V3's low-precision communication, and with the experts' SwiGLU inputs cached in FP8)
//!   from the same seed, whose loss curves go to
//!   `target/fp8-loss-curves.jsonl` (300 steps when benchmarking, 3 in the smoke test).

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use whale_benches::{bench_mode, randn};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::trainer::{Precision, TokenWalk, TrainConfig, Trainer};
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::{Rng, Tensor};

fn vec(n: usize, seed: u64) -> Vec<f32> {
    randn(&[n], seed).to_vec_f32().expect("f32")
}
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, Overflow, ScaleFormat, MIN_AMAX};
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
    // Minutes of training: only when this target's benchmarks may run.
    if whale_benches::filter_may_select("fp8_") {
        error_table();
        training_curves();
    }
    let (m, n, k) = (64, 256, 1024);
    let x = vec(m * k, 3);
    let w: Vec<f32> = vec(n * k, 4).into_iter().map(|v| v * 0.05).collect();
    let (a, b) = (quantised(&x, m, k, (1, BLOCK)), quantised(&w, n, k, (BLOCK, BLOCK)));
    // f32 partial sums (the training path), then the element-by-element 14-bit accumulator.
    for (name, acc) in [("fp8_gemm", Accumulation::F32), ("fp8_gemm_14bit", Accumulation::DEEPSEEK_V3)] {
        let mut g = c.benchmark_group(format!("{name}_{m}x{n}x{k}"));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.sample_size(10);
        g.bench_function("whale", |bench| bench.iter(|| black_box(fp8_gemm(&a, &b, acc))));
        f32_baseline(&mut g, &x, &w, (m, n, k));
        g.finish();
    }
}

/// `y = x @ w^T` in f32: w `[n, k]` row-major read as `[k, n]` through its strides.
fn f32_baseline(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
) {
    let mut y = vec![0.0f32; m * n];
    g.bench_function("baseline", |bench| {
        bench.iter(|| {
            let a = MatRef { data: x, offset: 0, row_stride: k as isize, col_stride: 1 };
            let b = MatRef { data: w, offset: 0, row_stride: 1, col_stride: k as isize };
            matmul(m, n, k, a, b, &mut y, false, rayon::current_num_threads());
            black_box(&y);
        })
    });
}

/// The FP8 linear layer's forward and backward against the f32 layer's.
fn linear(c: &mut Criterion) {
    let (m, n, k) = (256, 512, 512);
    let x = randn(&[m, k], 6).variable();
    let w = randn(&[n, k], 7).mul_scalar(0.05).expect("scale").variable();
    let mut g = c.benchmark_group(format!("fp8_linear_fwd_bwd_{m}x{n}x{k}"));
    g.throughput(Throughput::Elements((6 * m * n * k) as u64));
    g.sample_size(10);
    let recipe = Fp8Recipe::default();
    let step = |f: &dyn Fn() -> Tensor| {
        f().sum_all().and_then(|l| l.backward()).expect("backward");
        x.zero_grad();
        w.zero_grad();
    };
    g.bench_function("whale", |bench| bench.iter(|| step(&|| x.fp8_linear(&w, &recipe).expect("fp8 linear"))));
    g.bench_function("baseline", |bench| bench.iter(|| step(&|| x.matmul(&w.t().expect("t")).expect("matmul"))));
    g.finish();
}

/// The MoE expert MLP in FP8 with its SwiGLU inputs cached in FP8 (its backward decodes them and
/// recomputes the SwiGLU output), forward and backward, against the same MLP keeping its
/// activations (three FP8 linear layers and the SwiGLU): what the cache costs in time.
fn swiglu_cache(c: &mut Criterion) {
    let (m, d, h) = (512, 512, 256);
    let x = randn(&[m, d], 8).variable();
    let w: Vec<Tensor> = [([h, d], 9), ([h, d], 10), ([d, h], 11)]
        .iter()
        .map(|&(s, seed)| randn(&s, seed).mul_scalar(0.05).expect("scale").variable())
        .collect();
    let mut g = c.benchmark_group(format!("fp8_swiglu_mlp_fwd_bwd_{m}x{d}x{h}"));
    g.throughput(Throughput::Elements((18 * m * d * h) as u64));
    g.sample_size(10);
    let recipes = [Fp8Recipe::default(); 3];
    let step = |f: &dyn Fn() -> Tensor| {
        f().sum_all().and_then(|l| l.backward()).expect("backward");
        std::iter::once(&x).chain(&w).for_each(Tensor::zero_grad);
    };
    let cached = || Tensor::fp8_swiglu_mlp((&x, &x), [&w[0], &w[1], &w[2]], recipes).expect("fp8 swiglu mlp");
    let kept = || {
        let (gate, up) =
            (x.fp8_linear(&w[0], &recipes[0]).expect("gate"), x.fp8_linear(&w[1], &recipes[1]).expect("up"));
        Tensor::swiglu(&gate, &up).and_then(|a| a.fp8_linear(&w[2], &recipes[2])).expect("down")
    };
    g.bench_function("whale", |bench| bench.iter(|| step(&cached)));
    g.bench_function("baseline", |bench| bench.iter(|| step(&kept)));
    g.finish();
}

/// The `tiny` preset trained from one seed on the same token walk in fp32, bf16, fp8, fp8 with an
/// FP8 dispatch and fp8 with the experts' SwiGLU inputs cached in FP8; the curves go to
/// `target/fp8-loss-curves.jsonl` and the end points and step times are printed.
fn training_curves() {
    let steps: u64 = if bench_mode() { 300 } else { 3 };
    let mut curves: Vec<(&str, Vec<f64>, f64, f64)> = Vec::new();
    // (label, precision, FP8 dispatch, SwiGLU inputs cached in FP8)
    let runs = [
        ("fp32", Precision::Fp32, false, false),
        ("bf16", Precision::Bf16, false, false),
        ("fp8", Precision::Fp8, false, false),
        ("fp8_dispatch", Precision::Fp8, true, false),
        ("fp8_swiglu_cache", Precision::Fp8, false, true),
    ];
    for (label, precision, fp8_dispatch, fp8_swiglu_cache) in runs {
        let cfg = TrainConfig {
            steps,
            micro_batch: 4,
            seq_len: 16,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 2,
            precision,
            fp8_dispatch,
            fp8_swiglu_cache,
            ..TrainConfig::default()
        };
        // Steps of 1 or 2: the loss nears the walk's entropy (ln 2) in these steps, where the
        // comparison measures the precision rather than where each curve happens to be.
        let walk = |seed| TokenWalk { rng: Rng::new(seed), vocab: 64, max_step: 2 };
        let data = Box::new(walk(5));
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 11).expect("model");
        let mut t = Trainer::new(model, cfg, data).expect("trainer");
        let t0 = Instant::now();
        let losses: Vec<f64> = (0..steps).map(|_| t.train_step().expect("step").main_loss).collect();
        let per_step = t0.elapsed().as_secs_f64() / steps as f64;
        let mut held_out = walk(1234);
        let held = t.held_out_loss(&mut held_out, 64).expect("held-out loss");
        curves.push((label, losses, per_step, held));
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fp8-loss-curves.jsonl");
    let mut text = String::new();
    for i in 0..steps as usize {
        let mut line = serde_json::json!({ "step": i + 1 });
        for (p, losses, _, _) in &curves {
            line[*p] = serde_json::json!(losses[i]);
        }
        text.push_str(&format!("{line}\n"));
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)).expect("writing the loss curves");
    let tail = |v: &[f64]| {
        let n = v.len().min(20);
        v[v.len() - n..].iter().sum::<f64>() / n as f64
    };
    let (base, base_step, base_held) = (tail(&curves[0].1), curves[0].2, curves[0].3);
    eprintln!("\ntiny preset, {steps} steps, same seed and data; training loss: mean of the last 20 steps;");
    eprintln!("held-out: 64 batches of another walk stream, each model in its own precision");
    eprintln!("| precision | training loss | vs fp32 | held-out loss | vs fp32 | s/step | step time / fp32 |");
    eprintln!("|---|---:|---:|---:|---:|---:|---:|");
    for (p, losses, per_step, held) in &curves {
        let l = tail(losses);
        eprintln!(
            "| {p} | {l:.4} | {:+.2}% | {held:.4} | {:+.2}% | {per_step:.3} | {:.2} |",
            100.0 * (l - base) / base,
            100.0 * (held - base_held) / base_held,
            per_step / base_step
        );
    }
    eprintln!("curves: {}\n", path.display());
}

fn quantize(c: &mut Criterion) {
    let (rows, cols) = (1024, 4096);
    let x = vec(rows * cols, 5);
    let mut g = c.benchmark_group("fp8_quantize_1x128_1024x4096");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    g.bench_function("whale", |bench| bench.iter(|| black_box(quantised(&x, rows, cols, (1, BLOCK)))));
    // Baseline: the same 1x128 tiles, one thread, each value through the reference encoder.
    g.bench_function("baseline", |bench| {
        bench.iter(|| {
            let mut codes = vec![0u8; x.len()];
            let scales: Vec<f32> = x
                .chunks(BLOCK)
                .zip(codes.chunks_mut(BLOCK))
                .map(|(tile, out)| {
                    let scale = tile.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(MIN_AMAX) / Fp8Format::E4M3.max();
                    for (c, &v) in out.iter_mut().zip(tile) {
                        *c = Fp8Format::E4M3.encode(v / scale, Overflow::Saturate);
                    }
                    scale
                })
                .collect();
            black_box((codes, scales))
        })
    });
    g.finish();
}

criterion_group!(benches, gemm, linear, swiglu_cache, quantize);
criterion_main!(benches);
