//! Fused ops against the same math composed from primitive tensor ops (what a framework without
//! the fused kernel would run), forward + backward: attention, RMSNorm, cross-entropy; and the
//! fused AdamW step built for the CPU's FMA against its portable build; whale's `expf` against
//! libm's.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use whale_benches::{config, randn};
use whale_tensor::{Device, Result, Tensor};

/// Forward, then backward of `sum(out * r)`, on fresh variables.
fn fwd_bwd(inputs: &[Tensor], r: &Tensor, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Tensor> = inputs.iter().map(Tensor::variable).collect();
    let out = f(&vars).unwrap();
    out.mul(r).unwrap().sum_all().unwrap().backward().unwrap();
    black_box(vars[0].grad());
}

fn attention(c: &mut Criterion) {
    for seq in [256usize, 1024] {
        let (b, h, d) = (1, 8, 64);
        let inputs = [randn(&[b, h, seq, d], 1), randn(&[b, h, seq, d], 2), randn(&[b, h, seq, d], 3)];
        let r = randn(&[b, h, seq, d], 4);
        let scale = 1.0 / (d as f32).sqrt();
        let mask: Vec<f32> = (0..seq).flat_map(|i| (0..seq).map(move |j| if j > i { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, &[seq, seq], &Device::Cpu).unwrap();
        let fused = |t: &[Tensor]| Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], scale, true);
        let plain = |t: &[Tensor]| {
            let s = t[0].matmul(&t[1].t()?)?.mul_scalar(scale)?.masked_fill(&mask, f32::NEG_INFINITY)?;
            s.softmax_last_dim()?.matmul(&t[2])
        };
        let mut g = c.benchmark_group(format!("attention_fwd_bwd_seq{seq}"));
        g.bench_function("whale", |bench| bench.iter(|| fwd_bwd(&inputs, &r, &fused)));
        g.bench_function("baseline", |bench| bench.iter(|| fwd_bwd(&inputs, &r, &plain)));
        g.finish();
    }
}

fn rms_norm(c: &mut Criterion) {
    let (rows, dim) = (4096, 1024);
    let inputs = [randn(&[rows, dim], 1), randn(&[dim], 2)];
    let r = randn(&[rows, dim], 3);
    let fused = |t: &[Tensor]| t[0].rms_norm(&t[1], 1e-6);
    let plain = |t: &[Tensor]| t[0].mul(&t[0].sqr()?.mean_keepdim(1)?.add_scalar(1e-6)?.rsqrt()?)?.mul(&t[1]);
    let mut g = c.benchmark_group("rmsnorm_fwd_bwd_4096x1024");
    g.bench_function("whale", |bench| bench.iter(|| fwd_bwd(&inputs, &r, &fused)));
    g.bench_function("baseline", |bench| bench.iter(|| fwd_bwd(&inputs, &r, &plain)));
    g.finish();
}

fn cross_entropy(c: &mut Criterion) {
    let (rows, vocab) = (512, 8192);
    let logits = [randn(&[rows, vocab], 1)];
    let t: Vec<i64> = (0..rows as i64).map(|i| (i * 31) % vocab as i64).collect();
    let targets = Tensor::from_vec(t.clone(), &[rows], &Device::Cpu).unwrap();
    let targets_col = Tensor::from_vec(t, &[rows, 1], &Device::Cpu).unwrap();
    let one = Tensor::scalar(1.0);
    let fused = |x: &[Tensor]| x[0].cross_entropy(&targets, -100);
    let plain = |x: &[Tensor]| x[0].log_softmax_last_dim()?.gather(1, &targets_col)?.mean_all()?.neg();
    let mut g = c.benchmark_group("cross_entropy_fwd_bwd_512x8192");
    g.bench_function("whale", |bench| bench.iter(|| fwd_bwd(&logits, &one, &fused)));
    g.bench_function("baseline", |bench| bench.iter(|| fwd_bwd(&logits, &one, &plain)));
    g.finish();
}

/// One AdamW step over 4M parameters: the build `adamw_step` picks on this CPU (AVX2 + FMA on
/// x86-64) against the portable one (a `fmaf` call per element). Same bits (the kernel's tests).
fn adamw(c: &mut Criterion) {
    use whale_kernels::cpu::adamw::{adamw_step, adamw_step_portable, AdamWStep};
    let n = 1 << 22;
    let values = |seed| randn(&[n], seed).to_vec_f32().unwrap();
    let (mut p, g, mut m) = (values(1), values(2), values(3));
    let mut v: Vec<f32> = values(4).iter().map(|x| x * x).collect();
    let hp = AdamWStep { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 10 };
    let mut group = c.benchmark_group("adamw_step_4M");
    group.bench_function("whale", |b| b.iter(|| adamw_step(&mut p, &g, &mut m, &mut v, &hp)));
    group.bench_function("baseline", |b| b.iter(|| adamw_step_portable(&mut p, &g, &mut m, &mut v, &hp)));
    group.finish();
}

/// `exp` of 1M floats on one thread: whale's `expf` (inlined, vectorised, built for AVX2 + FMA
/// where the CPU has them) against libm's `expf`, a call per element. Same bits on glibc (the
/// kernel's tests).
fn exp(c: &mut Criterion) {
    use whale_kernels::cpu::expf::exp_slice;
    let x: Vec<f32> = randn(&[1 << 20], 1).to_vec_f32().unwrap().iter().map(|x| 4.0 * x).collect();
    let mut y = vec![0.0f32; x.len()];
    let mut group = c.benchmark_group("exp_1M");
    group.bench_function("whale", |b| b.iter(|| exp_slice(black_box(&x), &mut y)));
    group.bench_function("baseline", |b| b.iter(|| y.iter_mut().zip(black_box(&x)).for_each(|(y, &x)| *y = x.exp())));
    group.finish();
}

criterion_group! { name = benches; config = config(); targets = attention, rms_norm, cross_entropy, adamw, exp }
criterion_main!(benches);
