//! Decoding: tokens/s of 8 decode steps after a prefilled context, with the MLA cache `absorb`
//! (whale: latent + rotated k_pe, W_UK/W_UV absorbed) against `naive` (baseline: per-head K/V),
//! at batch 1 and 8 and context 128 and 2048; and MTP self-speculative greedy decoding (whale)
//! against plain greedy decoding (baseline) of the same model.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use whale_model::generate::{CacheMode, KvCache, SamplingConfig};
use whale_model::{CausalLm, DeepSeekV3, DeepSeekV3Config};
use whale_tensor::{no_grad, Device, Rng, Tensor};

/// V2-Lite's attention shape scaled down (16 heads, latent 256, nope 64 + rope 32, v 64), where the
/// two caches differ by 9x per token, on two layers.
fn decode_config() -> DeepSeekV3Config {
    DeepSeekV3Config {
        num_hidden_layers: 2,
        first_k_dense_replace: 1,
        hidden_size: 512,
        intermediate_size: 1024,
        num_attention_heads: 16,
        q_lora_rank: Some(256),
        kv_lora_rank: 256,
        qk_nope_head_dim: 64,
        qk_rope_head_dim: 32,
        v_head_dim: 64,
        rope_scaling: None,
        max_position_embeddings: 4096,
        num_nextn_predict_layers: 0,
        ..DeepSeekV3Config::small()
    }
}

fn ids(rng: &mut Rng, vocab: usize, b: usize, s: usize) -> Tensor {
    let v: Vec<i64> = (0..b * s).map(|_| rng.below(vocab as u64) as i64).collect();
    Tensor::from_vec(v, &[b, s], &Device::Cpu).unwrap()
}

const STEPS: usize = 8;

fn decode(c: &mut Criterion) {
    let cfg = decode_config();
    let model = DeepSeekV3::new(cfg.clone(), 0).unwrap();
    let mut rng = Rng::new(1);
    let shapes: &[(usize, usize)] =
        if whale_benches::bench_mode() { &[(1, 128), (8, 128), (1, 2048), (8, 2048)] } else { &[(1, 16), (2, 16)] };
    // (Long prefills: only when these benchmarks may run.)
    if !whale_benches::filter_may_select("decode_") {
        return;
    }
    for &(b, ctx) in shapes {
        let prompt = ids(&mut rng, cfg.vocab_size, b, ctx);
        let step_ids: Vec<Tensor> = (0..STEPS).map(|_| ids(&mut rng, cfg.vocab_size, b, 1)).collect();
        let mut g = c.benchmark_group(format!("decode_b{b}_ctx{ctx}"));
        g.throughput(Throughput::Elements((b * STEPS) as u64));
        g.sample_size(10);
        for (name, mode) in [("whale", CacheMode::Absorb), ("baseline", CacheMode::Naive)] {
            let mut prefilled = KvCache::with_mode(model.layers.len(), mode);
            no_grad(|| model.forward_cached(&prompt, &mut prefilled)).unwrap();
            // A clone shares the prefilled buffers, which are full: its first step would copy the
            // whole cache into a buffer of twice the room, a cost decoding pays once per doubling,
            // not once per 8 steps. So the untimed setup takes that step and drops its token,
            // and the timed steps write in place; the cache is dropped after the timing.
            let unshared = || {
                let mut cache = prefilled.clone();
                no_grad(|| model.forward_cached(&step_ids[0], &mut cache)).unwrap();
                cache.truncate(ctx).unwrap();
                cache
            };
            g.bench_function(name, |bench| {
                bench.iter_batched(
                    unshared,
                    |mut cache| {
                        no_grad(|| {
                            for t in &step_ids {
                                black_box(model.forward_cached(t, &mut cache).unwrap());
                            }
                        });
                        cache
                    },
                    BatchSize::LargeInput,
                )
            });
        }
        g.finish();
    }
}

fn speculative(c: &mut Criterion) {
    let model = whale_model::testing::periodic_pattern_model(11);
    let prompt = vec![10u32, 11, 12];
    let new = 48;
    // Greedy, and speculative sampling at temperature 1 (no stop token: every run makes `new`
    // tokens), each against plain decoding in the same mode.
    for (mode, temperature) in [("greedy", 0.0), ("sampled", 1.0)] {
        let cfg = SamplingConfig { cache: CacheMode::Absorb, temperature, ..SamplingConfig::greedy(new, vec![]) };
        let (_, stats) = model.generate_speculative(&prompt, &cfg, &mut Rng::new(0)).unwrap();
        eprintln!(
            "speculative {mode}: acceptance {:.2}, {:.2} tokens per main-model forward",
            stats.acceptance_rate(),
            stats.tokens_per_forward()
        );
        let mut g = c.benchmark_group(format!("speculative_{mode}_tiny_{new}_tokens"));
        g.throughput(Throughput::Elements(new as u64));
        g.bench_function("whale", |bench| {
            bench.iter(|| black_box(model.generate_speculative(&prompt, &cfg, &mut Rng::new(0)).unwrap()))
        });
        g.bench_function("baseline", |bench| {
            bench.iter(|| black_box(model.generate(std::slice::from_ref(&prompt), &cfg, &mut Rng::new(0)).unwrap()))
        });
        g.finish();
    }
}

criterion_group!(benches, decode, speculative);
criterion_main!(benches);
