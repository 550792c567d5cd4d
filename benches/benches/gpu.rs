//! GPU benchmarks (the CUDA issue's figures): cuBLAS bf16 matmul against cuBLAS f32, the block-
//! scaled FP8 GEMM (mma.sync and wgmma) against cuBLAS bf16 at the same shapes (4096³ and
//! DeepSeek-V3's projection shapes) and against the simple CUDA-core kernel, wgmma against
//! mma.sync on small products, training attention forward and backward (simple and tiled), MLA
//! decode over the latent cache, a device copy as the memory-bandwidth ceiling and a whole
//! tensor's sum beside it, one linear layer's forward and backward in FP8 against f32 on CUDA
//! tensors, a training step of the `small` preset on the GPU (f32, bf16, and bf16 with FP8 GEMMs)
//! against the CPU and on other kernels (the simple attention backward, the opt-in wgmma GEMM)
//! against the defaults, and a GRPO step of the `tiny` preset on the GPU against the CPU.
//! Kernels are timed with CUDA events inside criterion's `iter_custom`, so the clock reads the
//! GPU's own time for `iters` back-to-back launches; the tensor-level rows, which synchronise
//! with the host, by wall clock.
//!
//! Without a GPU it says so and exits successfully. `cargo xtask bench gpu` runs it; the GPU
//! check (`scripts/gpu-check.sh`) runs the prebuilt binary, one process per set of groups
//! (`$WHALE_GPU_BENCH_GROUPS`: kernels, linear, train_step, other_kernels_step, train_step_cpu,
//! grpo_step), each writing its table to `$WHALE_GPU_BENCH_OUT` (default
//! the workspace's `target/gpu-bench.md`).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, SamplingMode};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use half::bf16;
use whale_kernels::cpu::attention::AttnShape;
use whale_kernels::cuda::{device_count, AttentionKernels, Fp8GemmKernel, Fp8Operand, GemmShape, Gpu};
use whale_model::tokenizer::CharTokenizer;
use whale_model::{CausalLm, DeepSeekV3, DeepSeekV3Config};
use whale_rl::grpo::{GrpoConfig, GrpoTrainer};
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::optim::{AdamW, AdamWConfig};
use whale_tensor::{DType, Device, Rng, Tensor};

/// One benchmark's measurements: the GPU seconds of each sample divided by its launches.
struct Row {
    group: String,
    name: String,
    /// FLOPs (or bytes, for bandwidth rows) of one launch.
    work: f64,
    unit: &'static str,
    per_launch: RefCell<Vec<f64>>,
}

/// Samples per benchmark. Criterion calls `iter_custom` in its warm-up too (the cold first
/// launch among them); in flat sampling the last `SAMPLES` calls are the measured ones.
const SAMPLES: usize = 10;

impl Row {
    /// The median of the measured samples (the warm-up's calls left out).
    fn median(&self) -> f64 {
        let all = self.per_launch.borrow();
        let mut v = all[all.len().saturating_sub(SAMPLES)..].to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// TFLOP/s, GB/s, thousands of tokens or completions per second.
    fn rate(&self) -> f64 {
        let scale = match self.unit {
            "TFLOP/s" => 1e12,
            "ktok/s" => 1e3,
            "completions/s" => 1.0,
            _ => 1e9,
        };
        self.work / self.median() / scale
    }
}

/// Times `launch` (which only enqueues work on `stream`) with CUDA events.
fn bench(c: &mut Criterion, g: &Gpu, row: &Row, mut launch: impl FnMut()) {
    let stream: Arc<CudaStream> = g.stream.clone();
    let start = g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("an event");
    let end = g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("an event");
    let mut group = c.benchmark_group(&row.group);
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function(&row.name, |b| {
        b.iter_custom(|iters| {
            start.record(&stream).expect("record");
            for _ in 0..iters {
                launch();
            }
            end.record(&stream).expect("record");
            let s = start.elapsed_ms(&end).expect("elapsed") as f64 / 1e3;
            row.per_launch.borrow_mut().push(s / iters as f64);
            Duration::from_secs_f64(s)
        })
    });
    group.finish();
}

fn row(group: &str, name: &str, work: f64, unit: &'static str) -> Row {
    Row { group: group.into(), name: name.into(), work, unit, per_launch: RefCell::new(vec![]) }
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// [`values`] rounded to bf16.
fn bf16_values(n: usize, seed: u64) -> Vec<bf16> {
    values(n, seed).into_iter().map(bf16::from_f32).collect()
}

fn upload<T: DeviceRepr>(g: &Gpu, v: &[T]) -> CudaSlice<T> {
    g.stream.clone_htod(v).expect("upload")
}

/// A random E4M3 operand (finite codes, scales near 1): speed does not depend on the values.
fn fp8_operand(g: &Gpu, rows: usize, cols: usize, block_rows: usize, seed: u64) -> Fp8Operand {
    let codes: Vec<u8> =
        values(rows * cols, seed).iter().map(|v| ((v.abs() * 126.0) as u8) | ((*v < 0.0) as u8) << 7).collect();
    let grid = rows.div_ceil(block_rows) * cols.div_ceil(128);
    let scales: Vec<f32> = values(grid, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    Fp8Operand { codes: upload(g, &codes), scales: upload(g, &scales), rows, cols, block_rows }
}

fn matmuls(c: &mut Criterion, g: &Gpu, rows: &mut Vec<Row>) {
    for n in [4096usize, 8192] {
        let s = GemmShape::new(n, n, n);
        let (da, db) = (upload(g, &bf16_values(n * n, 1)), upload(g, &bf16_values(n * n, 2)));
        let mut dc = g.stream.alloc_zeros::<bf16>(n * n).expect("alloc");
        let r = row("matmul", &format!("cublas_bf16/{n}^3"), s.flops(), "TFLOP/s");
        bench(c, g, &r, || g.gemm_dev(&s, &da, &db, &mut dc).expect("gemm"));
        rows.push(r);
        if n == 4096 {
            let (da, db) = (upload(g, &values(n * n, 1)), upload(g, &values(n * n, 2)));
            let mut dc = g.stream.alloc_zeros::<f32>(n * n).expect("alloc");
            let r = row("matmul", &format!("cublas_f32/{n}^3"), s.flops(), "TFLOP/s");
            bench(c, g, &r, || g.gemm_dev(&s, &da, &db, &mut dc).expect("gemm"));
            rows.push(r);
        }
    }
}

/// 4096³ and DeepSeek-V3's projections at 4096 tokens, `[n, k]` weights (DeepGEMM's table).
const FP8_SHAPES: [(usize, usize, usize); 6] = [
    (4096, 4096, 4096),
    (4096, 2112, 7168),
    (4096, 24576, 1536),
    (4096, 4096, 7168),
    (4096, 7168, 2048),
    (4096, 7168, 16384),
];

fn fp8_gemms(c: &mut Criterion, g: &Gpu, rows: &mut Vec<Row>) {
    for (i, &(m, n, k)) in FP8_SHAPES.iter().enumerate() {
        let kernels: &[Fp8GemmKernel] = if i == 0 {
            &[Fp8GemmKernel::Wgmma, Fp8GemmKernel::TensorCore, Fp8GemmKernel::Simple]
        } else {
            &[Fp8GemmKernel::Wgmma, Fp8GemmKernel::TensorCore]
        };
        fp8_gemm_kernels(c, g, rows, (m, n, k), i as u64, kernels);
        // The baseline at the same shape: cuBLAS in bf16 (twice the operand bytes), on random
        // operands as the FP8 kernels' (on zeros tensor cores draw less power and clock higher).
        let s = GemmShape::linear(m, n, k);
        let random = |len: usize, seed: u64| upload(g, &bf16_values(len, seed));
        let (da, db) = (random(m * k, 30 + i as u64), random(n * k, 40 + i as u64));
        let mut dc = g.stream.alloc_zeros::<bf16>(m * n).expect("alloc");
        let r = row("fp8_gemm", &format!("cublas_bf16/{m}x{n}x{k}"), s.flops(), "TFLOP/s");
        bench(c, g, &r, || g.gemm_dev(&s, &da, &db, &mut dc).expect("gemm"));
        rows.push(r);
    }
}

/// Small products, on both tensor-core kernels: the `small` preset's projections and experts (at
/// 1024 tokens, 64 tokens per expert), then 64 and 256 output tiles, fewer than and about twice
/// an H200's 132 multiprocessors.
const SMALL_FP8_SHAPES: [(usize, usize, usize); 5] =
    [(1024, 256, 256), (64, 128, 256), (64, 256, 128), (1024, 1024, 1024), (2048, 2048, 2048)];

fn small_fp8_gemms(c: &mut Criterion, g: &Gpu, rows: &mut Vec<Row>) {
    for (i, &shape) in SMALL_FP8_SHAPES.iter().enumerate() {
        fp8_gemm_kernels(c, g, rows, shape, 50 + i as u64, &[Fp8GemmKernel::TensorCore, Fp8GemmKernel::Wgmma]);
    }
}

/// Times each of `kernels` this GPU runs on random operands of shape (m, n, k): `[m, k]`
/// activations tiled 1x128, `[n, k]` weights tiled 128x128.
fn fp8_gemm_kernels(
    c: &mut Criterion,
    g: &Gpu,
    rows: &mut Vec<Row>,
    (m, n, k): (usize, usize, usize),
    seed: u64,
    kernels: &[Fp8GemmKernel],
) {
    let flops = GemmShape::linear(m, n, k).flops();
    let (a, b) = (fp8_operand(g, m, k, 1, 10 + seed), fp8_operand(g, n, k, 128, 20 + seed));
    let mut y = g.stream.alloc_zeros::<f32>(m * n).expect("alloc");
    for &kernel in kernels.iter().filter(|&&x| g.runs_fp8_gemm(x, k)) {
        let label = match kernel {
            Fp8GemmKernel::Wgmma => "wgmma",
            Fp8GemmKernel::TensorCore => "tensor_core",
            Fp8GemmKernel::Simple => "simple",
        };
        let r = row("fp8_gemm", &format!("{label}/{m}x{n}x{k}"), flops, "TFLOP/s");
        bench(c, g, &r, || g.fp8_gemm_dev(&a.view(), &b.view(), &mut y, kernel).expect("fp8 gemm"));
        rows.push(r);
    }
}

fn copy_bandwidth(c: &mut Criterion, g: &Gpu, rows: &mut Vec<Row>) {
    let n = 1usize << 28; // 1 GiB of f32
    let src = g.stream.alloc_zeros::<f32>(n).expect("alloc");
    let mut dst = g.stream.alloc_zeros::<f32>(n).expect("alloc");
    let r = row("memory", "device_copy/1GiB", 2.0 * 4.0 * n as f64, "GB/s");
    bench(c, g, &r, || g.stream.memcpy_dtod(&src, &mut dst).expect("copy"));
    rows.push(r);
    // A whole tensor's sum (the gradient norm's): bytes read per second, beside the copy's.
    let mut total = g.stream.alloc_zeros::<f32>(1).expect("alloc");
    let r = row("memory", "sum_all/1GiB", 4.0 * n as f64, "GB/s");
    bench(c, g, &r, || g.sum_mid_dev(&src.slice(..), &mut total, (1, n, 1)).expect("sum"));
    rows.push(r);
}

/// Training attention's shape (causal, 16 heads of 128, 2048 tokens) and its FLOPs forward.
const TRAIN_ATTENTION: (usize, usize, usize, usize) = (1, 16, 2048, 128);

/// Times training attention on `kernels`: the forward (its `forward` label) and, with a
/// `backward` label, the backward after it.
fn training_attention(
    c: &mut Criterion,
    g: &Gpu,
    rows: &mut Vec<Row>,
    kernels: AttentionKernels,
    (forward, backward): (Option<&str>, Option<&str>),
) {
    let up = |n: usize, seed: u64| upload(g, &values(n, seed));
    let (b, h, t, d) = TRAIN_ATTENTION;
    let s = AttnShape::new(b, (h, h), (t, t), (d, d), true);
    let n = b * h * t * d;
    let (q, k, v, d_o) = (up(n, 30), up(n, 31), up(n, 32), up(n, 33));
    let mut o = g.stream.alloc_zeros::<f32>(n).expect("alloc");
    let mut lse = g.stream.alloc_zeros::<f32>(b * h * t).expect("alloc");
    // Causal: half of the t² scores; QKᵀ and PV are 2·d FLOPs per score each.
    let fwd = 2.0 * 2.0 * (b * h * t * t / 2 * d) as f64;
    let mut grads = g.attention_grads(&s).expect("alloc");
    let default = g.attention_kernels();
    g.set_attention_kernels(kernels);
    let r = row("attention", &format!("forward_{}/{b}x{h}x{t}x{d}", forward.unwrap_or("for_backward")), fwd, "TFLOP/s");
    if forward.is_some() {
        bench(c, g, &r, || g.attention_forward_dev(&s, (&q, &k, &v), &mut o, &mut lse).expect("attention"));
        rows.push(r);
    } else {
        g.attention_forward_dev(&s, (&q, &k, &v), &mut o, &mut lse).expect("attention");
    }
    if let Some(label) = backward {
        // Backward recomputes P and runs four products (dV, dP, dQ, dK): 2.5 times the forward.
        let r = row("attention", &format!("backward_{label}/{b}x{h}x{t}x{d}"), 2.5 * fwd, "TFLOP/s");
        bench(c, g, &r, || g.attention_backward_dev(&s, (&q, &k, &v), (&o, &lse, &d_o), &mut grads).expect("backward"));
        rows.push(r);
    }
    g.set_attention_kernels(default);
}

/// Training attention forward and backward (simple and tiled kernels), and MLA's decode
/// over the latent cache (V3: 128 heads, one KV head of [c ; k_pe] = 576, value c = 512, 32
/// sequences of 4096 cached tokens, one new token each).
fn attention(c: &mut Criterion, g: &Gpu, rows: &mut Vec<Row>) {
    training_attention(c, g, rows, AttentionKernels::Simple, (Some("simple"), Some("simple")));
    training_attention(c, g, rows, AttentionKernels::Tiled, (Some("tiled"), Some("tiled")));
    let up = |n: usize, seed: u64| upload(g, &values(n, seed));

    let (b, h, t, dc, dr) = (32, 128, 4096, 512, 64);
    // V3's scale is that of the unabsorbed 128 + 64-wide heads.
    let s =
        AttnShape { scale: 1.0 / ((128 + dr) as f32).sqrt(), ..AttnShape::new(b, (h, 1), (1, t), (dc + dr, dc), true) };
    let (q, k, v) = (up(b * h * (dc + dr), 34), up(b * t * (dc + dr), 35), up(b * t * dc, 36));
    let mut o = g.stream.alloc_zeros::<f32>(b * h * dc).expect("alloc");
    let mut lse = g.stream.alloc_zeros::<f32>(b * h).expect("alloc");
    // Bytes that must move: the cache (keys and values, f32) once, plus q and o.
    let bytes = 4.0 * (b * t * (dc + dr) + b * t * dc + b * h * (dc + dr) + b * h * dc) as f64;
    let default = g.attention_kernels();
    for kernels in [AttentionKernels::Simple, AttentionKernels::Tiled] {
        g.set_attention_kernels(kernels);
        let k_name = if kernels == AttentionKernels::Simple { "simple" } else { "tiled" };
        let r = row("mla_decode", &format!("{k_name}/{b}x{h}x{t}"), bytes, "GB/s");
        bench(c, g, &r, || g.attention_forward_dev(&s, (&q, &k, &v), &mut o, &mut lse).expect("decode"));
        rows.push(r);
    }
    g.set_attention_kernels(default);
}

/// Times `step` (tensor ops that end by reading a value back, which synchronises) by wall clock.
fn bench_wall(c: &mut Criterion, row: &Row, mut step: impl FnMut()) {
    let mut group = c.benchmark_group(&row.group);
    group.sampling_mode(SamplingMode::Flat).sample_size(SAMPLES);
    group.bench_function(&row.name, |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                step();
            }
            let t = start.elapsed();
            row.per_launch.borrow_mut().push(t.as_secs_f64() / iters as f64);
            t
        })
    });
    group.finish();
}

/// One linear layer's forward and backward (Fprop, Dgrad, Wgrad) on CUDA tensors at a
/// DeepSeek-V3 shape: the FP8 linear (quantising its operands on the GPU every call) against the
/// f32 linear on cuBLAS.
fn linear_layers(c: &mut Criterion, rows: &mut Vec<Row>) {
    let (m, n, k) = (4096, 2048, 7168);
    let gpu = Device::cuda(0).expect("GPU 0");
    let on_gpu = |shape: &[usize], seed: u64, scale: f32| {
        let v: Vec<f32> = values(shape.iter().product(), seed).iter().map(|x| x * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).and_then(|t| t.to_device(&gpu)).expect("upload").variable()
    };
    let (x, w) = (on_gpu(&[m, k], 11, 1.0), on_gpu(&[n, k], 12, 0.02));
    let recipe = Fp8Recipe::default();
    for name in ["fp8", "f32"] {
        let r = row("linear", &format!("{name}/{m}x{n}x{k}"), 6.0 * (m * n * k) as f64, "TFLOP/s");
        bench_wall(c, &r, || {
            let y = if name == "fp8" { x.fp8_linear(&w, &recipe) } else { x.matmul(&w.t().expect("t")) };
            let loss = y.and_then(|y| y.sum_all()).expect("forward");
            loss.backward().expect("backward");
            assert!(loss.to_scalar().expect("loss").is_finite(), "a finite sum");
            x.zero_grad();
            w.zero_grad();
        });
        rows.push(r);
    }
}

/// A training step of the `small` preset (forward, backward, AdamW, balancing) on the GPU in f32,
/// in bf16, and in bf16 with FP8 GEMMs (DeepSeek-V3's recipe).
fn training_step(c: &mut Criterion, rows: &mut Vec<Row>) {
    let gpu = Device::cuda(0).expect("GPU 0");
    let runs =
        [("gpu", gpu, DType::F32, false), ("gpu_bf16", gpu, DType::BF16, false), ("gpu_fp8", gpu, DType::BF16, true)];
    training_steps(c, rows, &runs, "");
}

/// [`training_step`]'s baseline, the same step on the CPU in f32: a group of its own, measured
/// after the GPU's (and the other kernels') rows, which a run cut short needs more.
fn training_step_cpu(c: &mut Criterion, rows: &mut Vec<Row>) {
    training_steps(c, rows, &[("cpu", Device::Cpu, DType::F32, false)], "");
}

/// The GPU runs of [`training_step`] on other kernels than the defaults, each beside the default
/// run: the simple attention backward (the default before the tiled one passed an H200), and
/// the opt-in wgmma FP8 GEMM. Guarded: the defaults are restored whatever happens.
fn other_kernels_step(c: &mut Criterion, rows: &mut Vec<Row>) {
    let gpu = Device::cuda(0).expect("GPU 0");
    let g = gpu.gpu().expect("GPU 0's kernels");
    let defaults = (g.attention_kernels(), g.preferred_fp8_gemm_kernel());
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        g.set_attention_kernels(AttentionKernels::TiledForward);
        training_steps(c, rows, &[("gpu", gpu, DType::F32, false)], "_simple_backward");
        g.set_attention_kernels(defaults.0);
        if g.runs_fp8_gemm(Fp8GemmKernel::Wgmma, 128) {
            g.set_fp8_gemm_kernel(Fp8GemmKernel::Wgmma);
            training_steps(c, rows, &[("gpu_fp8", gpu, DType::BF16, true)], "_wgmma");
        }
    }));
    g.set_attention_kernels(defaults.0);
    g.set_fp8_gemm_kernel(defaults.1);
    if let Err(e) = run {
        std::panic::resume_unwind(e);
    }
}

/// A training step of the `small` preset (8 x 128 tokens: forward, backward, AdamW, the
/// balancing update) for each (name, device, compute dtype, FP8 GEMMs) of `runs`, its rows named
/// `small_{name}{suffix}`.
fn training_steps(c: &mut Criterion, rows: &mut Vec<Row>, runs: &[(&str, Device, DType, bool)], suffix: &str) {
    let cfg = DeepSeekV3Config::small();
    let (batch, seq) = (8, 128);
    let mut rng = Rng::new(5);
    let mut tokens = || {
        let v: Vec<i64> = (0..batch * seq).map(|_| rng.below(cfg.vocab_size as u64) as i64).collect();
        Tensor::from_vec(v, &[batch, seq], &Device::Cpu).expect("tokens")
    };
    let (ids, targets) = (tokens(), tokens());
    let cpu = DeepSeekV3::new(cfg.clone(), 3).expect("model");
    for &(name, device, dtype, fp8) in runs {
        let mut model = cpu.to_device(&device).expect("model on the device");
        model.compute_dtype = dtype;
        model.set_fp8(fp8.then(Fp8Recipe::default));
        let mut opt = AdamW::new(AdamWConfig::default()).expect("AdamW");
        let r = row("train_step", &format!("small_{name}{suffix}/{batch}x{seq}"), (batch * seq) as f64, "ktok/s");
        bench_wall(c, &r, || {
            let out = model.forward(&ids, Some(&targets)).expect("forward");
            let loss = out.loss.expect("a loss");
            loss.backward().expect("backward");
            opt.step(&model.params, 1e-3).expect("AdamW");
            model.params.iter().for_each(|(_, p)| p.zero_grad());
            model.update_balancing_biases(&out.expert_load).expect("balancing");
            assert!(loss.to_scalar().expect("loss").is_finite(), "a finite loss");
        });
        rows.push(r);
    }
}

/// One GRPO step of the `tiny` preset (sampling 8 completions for each of 16 prompts, rule
/// rewards, scoring, the clipped loss, backward, AdamW) with the policy on the GPU, beside the
/// same on the CPU. Each step samples new prompts and completions: the median of ten steps.
fn grpo_step(c: &mut Criterion, rows: &mut Vec<Row>) {
    let (prompts, group) = (16, 8);
    let cfg = GrpoConfig {
        steps: 10_000,
        prompts_per_step: prompts,
        group_size: group,
        log_completions_every: 0,
        ..GrpoConfig::default()
    };
    for (name, device) in [("gpu", Device::cuda(0).expect("GPU 0")), ("cpu", Device::Cpu)] {
        let policy = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).and_then(|m| m.to_device(&device));
        let policy: Box<dyn CausalLm> = Box::new(policy.expect("the policy on the device"));
        let mut t = GrpoTrainer::new(policy, cfg.clone(), Box::new(CharTokenizer::new())).expect("a GRPO trainer");
        let r = row("grpo_step", &format!("tiny_{name}/{prompts}x{group}"), (prompts * group) as f64, "completions/s");
        bench_wall(c, &r, || {
            let log = t.train_step().expect("a GRPO step");
            assert!(log.get("policy_loss").is_finite(), "a finite loss");
        });
        rows.push(r);
    }
}

/// The markdown table of every row with its ratio to the baseline measured in the same run
/// (cuBLAS bf16 for FP8, cuBLAS f32 for bf16, the simple attention kernels for the tiled ones,
/// the CPU for the training step, the default kernels for the others) and, for attention and
/// decode, the share of their ceiling.
fn table(rows: &[Row]) -> String {
    let mut out = String::from("| benchmark | time | rate | vs baseline |\n| --- | --- | --- | --- |\n");
    // A row criterion's filter left out has no samples.
    let rows: Vec<&Row> = rows.iter().filter(|r| !r.per_launch.borrow().is_empty()).collect();
    for &r in &rows {
        let shape = r.name.split('/').nth(1).unwrap_or("");
        let base = match (r.group.as_str(), r.name.split('/').next()) {
            // cuBLAS at the same shape, or for wgmma at the small shapes the tensor-core kernel.
            ("fp8_gemm", Some(k)) if k != "cublas_bf16" => {
                let cublas = rows.iter().find(|b| b.name == format!("cublas_bf16/{shape}"));
                cublas.or_else(|| rows.iter().find(|b| k == "wgmma" && b.name == format!("tensor_core/{shape}")))
            }
            ("matmul", Some("cublas_bf16")) => rows.iter().find(|b| b.name == format!("cublas_f32/{shape}")),
            ("train_step" | "grpo_step", Some(k)) if k.ends_with("_gpu") => {
                rows.iter().find(|b| b.name == r.name.replace("_gpu", "_cpu"))
            }
            ("train_step", Some(k)) if k.ends_with("_simple_backward") || k.ends_with("_wgmma") => {
                rows.iter().find(|b| b.name == r.name.replace("_simple_backward", "").replace("_wgmma", ""))
            }
            ("train_step", Some(k)) if k.ends_with("_gpu_fp8") || k.ends_with("_gpu_bf16") => {
                rows.iter().find(|b| b.name == r.name.replace("_gpu_fp8", "_gpu").replace("_gpu_bf16", "_gpu"))
            }
            ("linear", Some(_)) if r.name.starts_with("fp8") => {
                rows.iter().find(|b| b.group == r.group && b.name == r.name.replace("fp8", "f32"))
            }
            ("attention" | "mla_decode", Some(k)) if k.contains("tiled") => {
                rows.iter().find(|b| b.group == r.group && b.name == r.name.replace("tiled", "simple"))
            }
            _ => None,
        };
        let mut ratio = base.map(|b| format!("{:.2}x {}", b.median() / r.median(), b.name)).unwrap_or_default();
        // Attention runs on the CUDA cores in f32 (cuBLAS f32 is that ceiling); decode is bound by
        // memory (a device copy is that ceiling).
        let ceiling = match r.group.as_str() {
            "attention" => rows.iter().find(|b| b.name == "cublas_f32/4096^3"),
            "mla_decode" => rows.iter().find(|b| b.group == "memory"),
            _ => None,
        };
        if let Some(b) = ceiling {
            let of = format!("{:.2} of {}", r.rate() / b.rate(), b.name);
            ratio = if ratio.is_empty() { of } else { format!("{ratio}; {of}") };
        }
        out += &format!(
            "| {}/{} | {:.3} ms | {:.1} {} | {} |\n",
            r.group,
            r.name,
            r.median() * 1e3,
            r.rate(),
            r.unit,
            ratio
        );
    }
    out
}

fn main() {
    if device_count() == 0 {
        eprintln!("gpu benches: skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let g = Gpu::new(0).expect("GPU 0 opens");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(SAMPLES)
        .configure_from_args();
    let mut rows = vec![];
    // The table is written after every group, so a run cut short (the GPU check's time limit)
    // keeps the figures it measured.
    // Cargo runs a bench from its package's folder: the default is the workspace's target/.
    let path = std::env::var("WHALE_GPU_BENCH_OUT")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/gpu-bench.md").into());
    let arch = g.arch;
    // A driver that would not load the wgmma module leaves its rows out: say so in the header.
    let unloaded = match g.unloaded_modules() {
        [] => String::new(),
        why => format!("not loaded (no wgmma rows): {}\n", why.join("; ")),
    };
    let save = |rows: &[Row], failed: &str| {
        let text = format!("GPU: compute capability {}.{}\n{unloaded}\n{}{failed}", arch.0, arch.1, table(rows));
        if let Err(e) = std::fs::write(&path, &text) {
            eprintln!("could not write {path}: {e}");
        }
        text
    };
    // `WHALE_GPU_BENCH_GROUPS` (comma-separated names below; default: all) picks the groups, so
    // the GPU check runs the kernels no GPU has run yet in processes of their own: a fault there
    // leaves the CUDA context unusable for whatever would follow in the same process.
    let picked = std::env::var("WHALE_GPU_BENCH_GROUPS").ok();
    let wanted = |name: &str| picked.as_deref().is_none_or(|p| p.split(',').any(|w| w.trim() == name));
    type Kernels<'a> = &'a dyn Fn(&mut Criterion, &Gpu, &mut Vec<Row>);
    let kernels: [Kernels; 5] = [&copy_bandwidth, &matmuls, &fp8_gemms, &small_fp8_gemms, &attention];
    if wanted("kernels") {
        for group in kernels {
            group(&mut c, &g, &mut rows);
            save(&rows, "");
        }
    }
    // The tensor-level groups run whole models: a group that fails is reported, and the others
    // (and the table) still come out.
    let mut failed = String::new();
    // Hopper loads the wgmma module: one that did not is a failure, not a table without its rows.
    if arch == (9, 0) && !unloaded.is_empty() && (wanted("kernels") || wanted("other_kernels_step")) {
        failed += &format!("\nwgmma: FAILED: compute capability 9.0 and the module is {unloaded}");
    }
    type Group<'a> = &'a dyn Fn(&mut Criterion, &mut Vec<Row>);
    // In this order whatever order `WHALE_GPU_BENCH_GROUPS` names them: the GPU's steps before
    // the CPU baselines and the GRPO step, so a run cut at its time cap keeps them.
    let groups: [(&str, Group); 5] = [
        ("linear", &linear_layers),
        ("train_step", &training_step),
        ("other_kernels_step", &other_kernels_step),
        ("train_step_cpu", &training_step_cpu),
        ("grpo_step", &grpo_step),
    ];
    for (name, group) in groups.into_iter().filter(|(name, _)| wanted(name)) {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| group(&mut c, &mut rows)));
        if let Err(e) = run {
            let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            failed += &format!("\n{name}: FAILED: {}\n", why.unwrap_or_default());
        }
        save(&rows, &failed);
    }
    c.final_summary();
    println!("\n{}", save(&rows, &failed));
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
