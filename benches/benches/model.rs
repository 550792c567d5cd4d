//! DeepSeek-V3 training: one step (forward + backward + AdamW) of the `tiny` and `small` presets,
//! reported as tokens/s; and one MoE layer (grouped dispatch) against a dense SwiGLU layer with
//! the same activated FLOPs per token, forward + backward; the `tiny` step on a pool of its own
//! against started from outside one; and the `small` step recomputing its attention and MLP
//! sublayers in the backward against keeping their activations.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use whale_benches::{config, randn};
use whale_model::nn::{Recompute, SwiGluMlp};
use whale_model::{DeepSeekV3, DeepSeekV3Config};
use whale_parallel::threads::compute_pool;
use whale_tensor::optim::{AdamW, AdamWConfig};
use whale_tensor::{Device, Rng, Tensor};

fn batch(cfg: &DeepSeekV3Config, b: usize, s: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Rng::new(seed);
    let ids: Vec<i64> = (0..b * s).map(|_| rng.below(cfg.vocab_size as u64) as i64).collect();
    let targets: Vec<i64> = ids.iter().skip(1).copied().chain([-100]).collect();
    (Tensor::from_vec(ids, &[b, s], &Device::Cpu).unwrap(), Tensor::from_vec(targets, &[b, s], &Device::Cpu).unwrap())
}

fn train_step(c: &mut Criterion) {
    // tiny at the pretraining job's default shape; small at a longer context.
    for (name, b, s) in [("tiny", 24, 44), ("small", 4, 128)] {
        let cfg = DeepSeekV3Config::preset(name).unwrap();
        let model = DeepSeekV3::new(cfg.clone(), 0).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
        let (ids, targets) = batch(&cfg, b, s, 1);
        let mut g = c.benchmark_group(format!("train_step_{name}_b{b}_s{s}"));
        g.throughput(Throughput::Elements((b * s) as u64));
        g.bench_function("whale", |bench| {
            bench.iter(|| {
                let out = model.forward(&ids, Some(&targets)).unwrap();
                out.loss.unwrap().backward().unwrap();
                opt.step(&model.params, 1e-3).unwrap();
                model.update_balancing_biases(&out.expert_load).unwrap();
                model.params.zero_grad();
            })
        });
        g.finish();
    }
}

/// The same `tiny` step run as the job of a pool of its own (how `whale` and every rank run,
/// `whale_parallel::threads`) against run from a thread outside any pool, whose every parallel
/// loop is queued to the global pool and waited for.
fn train_step_in_own_pool(c: &mut Criterion) {
    let (b, s) = (24, 44);
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg.clone(), 0).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let (ids, targets) = batch(&cfg, b, s, 1);
    let mut step = || {
        let out = model.forward(&ids, Some(&targets)).unwrap();
        out.loss.unwrap().backward().unwrap();
        opt.step(&model.params, 1e-3).unwrap();
        model.update_balancing_biases(&out.expert_load).unwrap();
        model.params.zero_grad();
    };
    let pool = compute_pool(rayon::current_num_threads(), "bench").unwrap();
    let mut g = c.benchmark_group(format!("train_step_tiny_b{b}_s{s}_own_pool_vs_outside"));
    g.throughput(Throughput::Elements((b * s) as u64));
    g.bench_function("whale", |bench| bench.iter(|| pool.install(&mut step)));
    g.bench_function("baseline", |bench| bench.iter(&mut step));
    g.finish();
}

/// The `small` step recomputing every attention sublayer and SwiGLU MLP (dense, routed and
/// shared experts) in the backward (`whale_model::nn::Recompute`, "whale") against keeping their
/// activations ("baseline"): what the memory it saves costs in time
/// (`crates/model/tests/recompute.rs` measures the memory).
fn train_step_recomputing(c: &mut Criterion) {
    let (b, s) = (4, 128);
    let cfg = DeepSeekV3Config::small();
    let mut model = DeepSeekV3::new(cfg.clone(), 0).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let (ids, targets) = batch(&cfg, b, s, 1);
    let mut g = c.benchmark_group(format!("train_step_small_b{b}_s{s}_recompute_vs_keep"));
    g.throughput(Throughput::Elements((b * s) as u64));
    for (id, recompute) in [("whale", Recompute { attention: true, mlp: true }), ("baseline", Recompute::default())] {
        model.set_recompute(recompute);
        g.bench_function(id, |bench| {
            bench.iter(|| {
                let out = model.forward(&ids, Some(&targets)).unwrap();
                out.loss.unwrap().backward().unwrap();
                opt.step(&model.params, 1e-3).unwrap();
                model.params.zero_grad();
            })
        });
    }
    g.finish();
}

fn moe_vs_dense(c: &mut Criterion) {
    let cfg = DeepSeekV3Config::small();
    let model = DeepSeekV3::new(cfg.clone(), 0).unwrap();
    let moe = model.moe_layers()[0].clone();
    let active = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size;
    let mut params = whale_tensor::ParamStore::new();
    let mut buffers = Default::default();
    let mut source = whale_model::nn::WeightSource::Random { rng: Rng::new(3), std: 0.02 };
    let dense = SwiGluMlp::new(
        &mut whale_model::nn::ParamBuilder::new(&mut params, &mut buffers, &mut source),
        cfg.hidden_size,
        active,
    )
    .unwrap();
    let x = randn(&[4, 128, cfg.hidden_size], 5);
    let mut g = c.benchmark_group("moe_layer_vs_dense_same_active_flops");
    g.throughput(Throughput::Elements(512));
    g.bench_function("whale", |bench| {
        bench.iter(|| {
            let xv = x.input_variable();
            moe.forward(&xv, None).unwrap().output.sum_all().unwrap().backward().unwrap();
            black_box(xv.grad());
        })
    });
    g.bench_function("baseline", |bench| {
        bench.iter(|| {
            let xv = x.input_variable();
            dense.forward(&xv).unwrap().sum_all().unwrap().backward().unwrap();
            black_box(xv.grad());
        })
    });
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = train_step, train_step_in_own_pool, train_step_recomputing, moe_vs_dense }
criterion_main!(benches);
