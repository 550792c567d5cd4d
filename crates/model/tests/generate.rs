//! The cached decode path against the training forward, and batch-independence of generation.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use whale_model::checkpoint::SaveDType;
use whale_model::generate::{sample_token, CacheMode, KvCache, SamplingConfig};
use whale_model::{CausalLm, DeepSeekV3, DeepSeekV3Config};
use whale_tensor::{no_grad, DType, Device, ParamStore, Rng, Tensor};

#[test]
fn cached_decode_gives_the_training_forward_logits_token_by_token() {
    for mode in [CacheMode::Naive, CacheMode::Absorb] {
        decode_matches_forward(mode);
    }
}

fn decode_matches_forward(mode: CacheMode) {
    let cfg = DeepSeekV3Config::small(); // YaRN on, q_lora, groups
    let model = DeepSeekV3::new(cfg.clone(), 3).unwrap();
    let mut rng = Rng::new(4);
    let ids: Vec<i64> = (0..2 * 9).map(|_| rng.below(cfg.vocab_size as u64) as i64).collect();
    let full = Tensor::from_vec(ids.clone(), &[2, 9], &Device::Cpu).unwrap();
    let want = no_grad(|| model.forward(&full, None)).unwrap().logits.to_vec_f32().unwrap();
    // Prefill 4 tokens, then one at a time.
    let (got, cache) = common::cached_logits(&model, &full, 4, mode);
    let got = got.to_vec_f32().unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "{mode:?} element {i}: cached {a} vs full {b}");
    }
    let per_token = |l: &Option<whale_model::generate::LayerCache>| match l.as_ref().unwrap() {
        whale_model::generate::LayerCache::Naive { k, v } => {
            (k.view().unwrap().elem_count() + v.view().unwrap().elem_count()) / (2 * 9)
        }
        whale_model::generate::LayerCache::Absorb { latent } => latent.view().unwrap().elem_count() / (2 * 9),
    };
    assert!(cache.layers.iter().all(|l| per_token(l) == mode.elements_per_token(&cfg)), "{mode:?}");
}

/// A prompt's prefill computes only its last position's logits, the values of the last row of
/// the full cached forward (DeepSeek-V3 and a dense student) to the head GEMM's rounding (a
/// one-row product may sum in another order than a seven-row one).
#[test]
fn the_prefill_keeps_the_last_positions_logits_only() {
    let v3 = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
    let dense = whale_model::DenseModel::new(whale_model::DenseConfig::student(353), 4).unwrap();
    for model in [&v3 as &dyn CausalLm, &dense] {
        let ids = Tensor::from_vec((0..2 * 7).map(|i| i % 50).collect::<Vec<i64>>(), &[2, 7], &Device::Cpu).unwrap();
        let all = no_grad(|| model.forward_cached(&ids, &mut KvCache::new(0))).unwrap();
        let last = no_grad(|| model.forward_cached_last(&ids, &mut KvCache::new(0))).unwrap();
        assert_eq!(last.dims(), [2, 1, model.vocab_size()]);
        let want = all.narrow(1, 6, 1).unwrap().to_vec_f32().unwrap();
        for (g, w) in last.to_vec_f32().unwrap().iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}

#[test]
fn cache_sizes_match_the_spec_table_for_v3() {
    // spec 1.5: bytes per token per layer in BF16.
    let v3 = DeepSeekV3Config::v3_671b();
    assert_eq!(CacheMode::Absorb.elements_per_token(&v3) * 2, 1_152);
    assert_eq!(CacheMode::Naive.elements_per_token(&v3) * 2, 81_920);
    assert_eq!(whale_model::mla::mha_cache_elements(&v3) * 2, 65_536);
    let lite = DeepSeekV3Config::v2_lite();
    assert_eq!(CacheMode::Absorb.elements_per_token(&lite) * 2, 1_152);
    assert_eq!(CacheMode::Naive.elements_per_token(&lite) * 2, 10_240);
}

#[test]
fn a_prompt_generates_the_same_alone_and_in_a_batch() {
    let cfg = DeepSeekV3Config::tiny();
    let model = DeepSeekV3::new(cfg, 5).unwrap();
    let prompts = vec![vec![5u32, 9, 12], vec![7, 7], vec![3, 4, 5, 6, 8], vec![11, 2, 40]];
    for sampling in [SamplingConfig::greedy(12, vec![2]), SamplingConfig::sampled(1.0, 12, vec![2])] {
        let batch = model.generate(&prompts, &sampling, &mut Rng::new(7)).unwrap();
        // Alone: the same position in the stream of prompts gives the same random stream.
        let mut rng = Rng::new(7);
        let streams: Vec<Rng> = prompts.iter().map(|_| rng.fork()).collect();
        for (i, p) in prompts.iter().enumerate() {
            let mut r = streams[i].clone();
            let alone =
                model.generate_with_streams(std::slice::from_ref(p), &sampling, std::slice::from_mut(&mut r)).unwrap();
            // Same tokens; log-probs agree to rounding (gemm may block a 1-row and a 2-row
            // product differently, so the last bit of a logit can differ).
            assert_eq!(alone[0].tokens, batch[i].tokens, "prompt {i}");
            assert_eq!(alone[0].truncated, batch[i].truncated);
            for (a, b) in alone[0].logprobs.iter().zip(&batch[i].logprobs) {
                assert!((a - b).abs() < 1e-5, "prompt {i}: {a} vs {b}");
            }
        }
        assert!(batch.iter().all(|g| !g.tokens.is_empty() && g.tokens.len() <= 12));
        assert!(batch.iter().all(|g| g.logprobs.iter().all(|&l| l <= 0.0 && l.is_finite())));
    }
}

/// A model of 4 tokens whose rows are scripted by decode step: row 0 stops (token 3) at once and
/// has NaN logits after that; row 1 always prefers token 1. Only what `generate` calls is here.
#[derive(Debug, Default)]
struct Scripted {
    params: ParamStore,
    forwards: AtomicUsize,
}

impl CausalLm for Scripted {
    fn vocab_size(&self) -> usize {
        4
    }
    fn hidden_size(&self) -> usize {
        1
    }
    fn num_layers(&self) -> usize {
        0
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn max_positions(&self) -> usize {
        64
    }
    fn forward_cached(&self, ids: &Tensor, _: &mut KvCache) -> whale_model::Result<Tensor> {
        let (b, s) = (ids.dims()[0], ids.dims()[1]);
        let after_stop = self.forwards.fetch_add(1, Ordering::SeqCst) > 0;
        let row = |r: usize| match r {
            0 if after_stop => [f32::NAN; 4],
            0 => [0.0, 0.0, 0.0, 5.0],
            _ => [f32::NEG_INFINITY, 5.0, 0.0, f32::NEG_INFINITY],
        };
        let v: Vec<f32> = (0..b).flat_map(|r| (0..s).flat_map(move |_| row(r))).collect();
        Ok(Tensor::from_vec(v, &[b, s, 4], &Device::Cpu)?)
    }
    fn logits(&self, _: &Tensor) -> whale_model::Result<Tensor> {
        unreachable!("generate decodes through forward_cached")
    }
    fn hidden_states(&self, _: &Tensor) -> whale_model::Result<Tensor> {
        unreachable!("generate decodes through forward_cached")
    }
    fn train_loss(&self, _: &Tensor, _: &Tensor, _: &[usize]) -> whale_model::Result<Tensor> {
        unreachable!("not trained")
    }
    fn save_pretrained(&self, _: &std::path::Path, _: SaveDType) -> whale_model::Result<()> {
        unreachable!("not saved")
    }
    fn duplicate(&self) -> whale_model::Result<Box<dyn CausalLm>> {
        unreachable!("not copied")
    }
    fn to_device(&self, _: &Device) -> whale_model::Result<Box<dyn CausalLm>> {
        unreachable!("not moved")
    }
}

#[test]
fn a_finished_sequence_samples_nothing_more_so_its_later_logits_cannot_fail_the_batch() {
    for cfg in [SamplingConfig::greedy(4, vec![3]), SamplingConfig::sampled(1.0, 4, vec![3])] {
        let gens = Scripted::default().generate(&[vec![1, 2], vec![2, 1]], &cfg, &mut Rng::new(0)).unwrap();
        assert_eq!((gens[0].tokens.as_slice(), gens[0].truncated), (&[3u32][..], false));
        assert_eq!(gens[1].tokens.len(), 4);
        assert!(gens[1].truncated);
    }
}

#[test]
fn a_filled_cache_of_another_layer_count_is_refused_not_reset() {
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap();
    let ids = Tensor::from_vec(vec![5i64, 6, 7], &[1, 3], &Device::Cpu).unwrap();
    let mut cache = KvCache::default();
    no_grad(|| model.forward_cached(&ids, &mut cache)).unwrap();
    assert_eq!(cache.len(), 3);
    cache.layers.push(None);
    let err = no_grad(|| model.forward_cached(&ids, &mut cache)).unwrap_err().to_string();
    assert!(err.contains("holding 3 positions"), "{err}");
}

#[test]
fn greedy_speculative_decoding_yields_the_plain_greedy_tokens() {
    let trained = whale_model::testing::periodic_pattern_model(11);
    let random = DeepSeekV3::new(DeepSeekV3Config::tiny(), 2).unwrap();
    for (name, model) in [("trained", &trained), ("random", &random)] {
        for mode in [CacheMode::Naive, CacheMode::Absorb] {
            let mut total = whale_model::speculative::SpeculativeStats::default();
            for prompt in [vec![10u32, 11, 12], vec![13], vec![12, 13, 14, 10, 11, 12, 13]] {
                let cfg = SamplingConfig { cache: mode, ..SamplingConfig::greedy(17, vec![2]) };
                let plain = model.generate(std::slice::from_ref(&prompt), &cfg, &mut Rng::new(0)).unwrap().remove(0);
                let (spec, stats) = model.generate_speculative(&prompt, &cfg, &mut Rng::new(0)).unwrap();
                assert_eq!(spec.tokens, plain.tokens, "{name} {mode:?} {prompt:?}");
                assert_eq!(spec.truncated, plain.truncated);
                for (a, b) in spec.logprobs.iter().zip(&plain.logprobs) {
                    assert!((a - b).abs() < 1e-4, "{name}: log-prob {a} vs {b}");
                }
                // Each main forward emits one token, and one more per draft it accepts (the last
                // forward may find the budget or a stop token cut its second token).
                let emitted = stats.main_forwards + stats.accepted;
                assert!(stats.tokens <= emitted && stats.tokens + 1 >= emitted, "{name} {mode:?}: {stats:?}");
                assert!(stats.accepted <= stats.drafted && stats.tokens == spec.tokens.len(), "{stats:?}");
                total.add(&stats);
            }
            if name == "trained" {
                // The pattern is learnt by both heads: most drafts are accepted.
                assert!(total.acceptance_rate() > 0.8, "{mode:?}: {total:?}");
                assert!(total.tokens_per_forward() > 1.6, "{mode:?}: {total:?}");
            }
        }
    }
    let mut no_mtp = DeepSeekV3Config::tiny();
    no_mtp.num_nextn_predict_layers = 0;
    let m = DeepSeekV3::new(no_mtp, 1).unwrap();
    let err = m.generate_speculative(&[10], &SamplingConfig::greedy(4, vec![]), &mut Rng::new(0)).unwrap_err();
    assert!(err.to_string().contains("MTP"), "{err}");
    // It keeps a vocabulary limit as plain generation does.
    let limited = SamplingConfig { vocab_limit: Some(12), ..SamplingConfig::greedy(17, vec![]) };
    let plain = trained.generate(&[vec![10u32, 11]], &limited, &mut Rng::new(0)).unwrap().remove(0);
    let (spec, _) = trained.generate_speculative(&[10, 11], &limited, &mut Rng::new(0)).unwrap();
    assert_eq!(spec.tokens, plain.tokens);
    assert!(spec.tokens.iter().all(|&t| t < 12), "{:?}", spec.tokens);
}

#[test]
fn speculative_sampling_near_temperature_zero_keeps_greedy_tokens_through_kept_and_rejected_drafts() {
    // At a temperature this low both distributions are one-hot on their argmax, so speculative
    // sampling must walk the greedy path: a bookkeeping slip after a rejection (a cache entry
    // left behind, the wrong hidden state drafting next) would change the tokens.
    let trained = whale_model::testing::periodic_pattern_model(11);
    let random = DeepSeekV3::new(DeepSeekV3Config::tiny(), 2).unwrap();
    // The trained model with noise in its MTP module's matrices: it drafts right some of the
    // time, so sequences mix kept and rejected drafts (the trained model keeps every draft, the
    // random one none).
    let mixed = whale_model::testing::periodic_pattern_model(11);
    let mtp = format!("model.layers.{}.", mixed.config.num_hidden_layers);
    let mut rng = Rng::new(9);
    for (name, p) in mixed.params.iter().filter(|(name, p)| name.starts_with(&mtp) && p.rank() == 2) {
        let noise = Tensor::randn(p.dims(), 0.0, 0.6, DType::F32, &mut rng).unwrap().to_vec_f32().unwrap();
        p.with_f32_mut(|v| v.iter_mut().zip(&noise).for_each(|(w, n)| *w += n))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, model) in [("trained", &trained), ("mixed", &mixed), ("random", &random)] {
        let mut total = whale_model::speculative::SpeculativeStats::default();
        for mode in [CacheMode::Naive, CacheMode::Absorb] {
            for prompt in [vec![10u32, 11, 12], vec![13], vec![12, 13, 14, 10, 11, 12, 13], vec![20, 31, 7]] {
                let greedy = SamplingConfig { cache: mode, ..SamplingConfig::greedy(17, vec![2]) };
                let plain = model.generate(std::slice::from_ref(&prompt), &greedy, &mut Rng::new(0)).unwrap();
                let cold = SamplingConfig { temperature: 1e-5, ..greedy };
                let (spec, stats) = model.generate_speculative(&prompt, &cold, &mut Rng::new(3)).unwrap();
                assert_eq!(spec.tokens, plain[0].tokens, "{name} {mode:?} {prompt:?}");
                assert!(spec.logprobs.iter().all(|&lp| lp > -1e-3), "{name}: {:?}", spec.logprobs);
                total.add(&stats);
            }
        }
        // Drafts were kept (trained, mixed) and rejected (mixed, random).
        let (kept, rejected) = (total.accepted > 0, total.accepted < total.drafted);
        assert!((kept || name == "random") && (rejected || name == "trained"), "{name}: {total:?}");
    }
}

/// The exact probability of each continuation of `len` tokens under plain sampling with `cfg`
/// (temperature, every id below `cfg.vocab_limit`; no top-k / top-p), by enumeration.
fn continuation_probs(model: &DeepSeekV3, prompt: &[u32], cfg: &SamplingConfig, len: usize) -> Vec<(Vec<u32>, f64)> {
    let vocab = cfg.vocab_limit.unwrap();
    let mut out = vec![(vec![], 1.0)];
    for _ in 0..len {
        let mut longer = vec![];
        for (seq, p) in out {
            let ids: Vec<i64> = prompt.iter().chain(&seq).map(|&t| t as i64).collect();
            let ids = Tensor::from_vec(ids.clone(), &[1, ids.len()], &Device::Cpu).unwrap();
            let logits = no_grad(|| model.forward_cached_last(&ids, &mut KvCache::default())).unwrap();
            let z: Vec<f64> =
                logits.to_vec_f32().unwrap()[..vocab].iter().map(|&l| l as f64 / cfg.temperature as f64).collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|&v| (v - max).exp()).sum();
            for (t, &v) in z.iter().enumerate() {
                longer.push(([seq.as_slice(), &[t as u32]].concat(), p * (v - max).exp() / sum));
            }
        }
        out = longer;
    }
    out
}

#[test]
fn speculative_sampling_draws_continuations_with_plain_samplings_probabilities() {
    // Three tokens over a vocabulary of three: 27 continuations whose exact probabilities the
    // model gives. The second and third tokens go through drafts kept with probability
    // min(1, p/q) and the residual draw, so a wrong acceptance rule skews their frequencies
    // (keeping every draft gives a chi-square of about 16000 here). Temperature 0.2 sets the
    // MTP module's q and the model's p apart: about half the drafts are kept.
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 5).unwrap();
    let prompt = [7u32, 3, 9];
    let cfg =
        SamplingConfig { vocab_limit: Some(3), cache: CacheMode::Absorb, ..SamplingConfig::sampled(0.2, 3, vec![]) };
    let exact = continuation_probs(&model, &prompt, &cfg, 3);
    let n = 3000;
    let mut rng = Rng::new(11);
    let mut counts = vec![0usize; exact.len()];
    let mut total = whale_model::speculative::SpeculativeStats::default();
    for _ in 0..n {
        let (g, stats) = model.generate_speculative(&prompt, &cfg, &mut rng).unwrap();
        counts[exact.iter().position(|(seq, _)| *seq == g.tokens).unwrap()] += 1;
        // Each token's log-probability is the plain sampling distribution's.
        let lp: f64 = g.logprobs.iter().map(|&l| l as f64).sum();
        let want = exact.iter().find(|(seq, _)| *seq == g.tokens).unwrap().1.ln();
        assert!((lp - want).abs() < 1e-3, "{:?}: log-prob {lp} vs {want}", g.tokens);
        total.add(&stats);
    }
    assert!(total.acceptance_rate() > 0.2 && total.acceptance_rate() < 0.9, "{total:?}");
    // Pearson's chi-square over the continuations expected at least 5 times, against its 1e-6
    // tail for their degrees of freedom (Wilson-Hilferty; z = 4.75).
    let cells: Vec<(f64, usize)> =
        exact.iter().zip(&counts).map(|((_, p), &c)| (p * n as f64, c)).filter(|(e, _)| *e >= 5.0).collect();
    let chi2: f64 = cells.iter().map(|&(e, c)| (c as f64 - e).powi(2) / e).sum();
    let df = (cells.len() - 1) as f64;
    let tail = df * (1.0 - 2.0 / (9.0 * df) + 4.75 * (2.0 / (9.0 * df)).sqrt()).powi(3);
    assert!(cells.len() >= 10, "too few well-filled cells: {}", cells.len());
    assert!(chi2 < tail, "chi-square {chi2} over {} cells (tail {tail}): counts {counts:?} vs {exact:?}", cells.len());
}

#[test]
fn top_k_then_top_p_sample_as_hf_warpers_do() {
    let draw = |logits: &[f32], top_k: Option<usize>, top_p: Option<f32>| -> Vec<(u32, f32)> {
        let cfg = SamplingConfig { top_k, top_p, ..SamplingConfig::sampled(1.0, 1, vec![]) };
        let mut rng = Rng::new(7);
        (0..400).map(|_| sample_token(logits, &cfg, &mut rng).unwrap()).collect()
    };
    let seen = |d: &[(u32, f32)]| -> Vec<u32> {
        let mut t: Vec<u32> = d.iter().map(|x| x.0).collect();
        t.sort_unstable();
        t.dedup();
        t
    };
    // Probabilities 0.5, 0.3, 0.2. Top-k 2 renormalises to 0.625 / 0.375, so top-p 0.6 keeps the
    // first token alone (HF), not both (0.5 < 0.6 of the unrenormalised mass).
    let probs = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let d = draw(&probs, Some(2), Some(0.6));
    assert_eq!(seen(&d), [0]);
    assert!(d.iter().all(|&(_, lp)| lp.abs() < 1e-6), "log-prob of the only candidate is 0");
    // Top-p alone measures against the whole distribution: 0.5 < 0.6 keeps two.
    assert_eq!(seen(&draw(&probs, None, Some(0.6))), [0, 1]);
    // Top-k keeps ties with its k-th score; 0 turns it off.
    assert_eq!(seen(&draw(&[1.0, 1.0, 1.0, -1.0], Some(2), None)), [0, 1, 2]);
    assert_eq!(seen(&draw(&[0.0, 0.0, 0.0], Some(0), None)), [0, 1, 2]);
    assert_eq!(seen(&draw(&probs, Some(1), None)), [0]);
}

#[test]
fn sampling_refuses_non_finite_logits_and_out_of_range_settings() {
    let sampled = SamplingConfig::sampled(1.0, 4, vec![]);
    let greedy = SamplingConfig::greedy(4, vec![]);
    let mut rng = Rng::new(3);
    for bad in [vec![f32::NAN, 0.0, 1.0], vec![f32::INFINITY, 0.0, 1.0], vec![f32::NEG_INFINITY; 3]] {
        for cfg in [&sampled, &greedy] {
            let err = sample_token(&bad, cfg, &mut rng).unwrap_err().to_string();
            assert!(err.contains("logit"), "{bad:?}: {err}");
        }
    }
    // A -inf logit is a masked token: legal, and never drawn.
    for _ in 0..50 {
        assert_ne!(sample_token(&[f32::NEG_INFINITY, 0.0, 1.0], &sampled, &mut rng).unwrap().0, 0);
    }
    // Tokens whose probability underflows to 0 are never drawn and the log-prob stays finite.
    for _ in 0..50 {
        let (t, lp) = sample_token(&[0.0, -2000.0, -2000.0], &sampled, &mut rng).unwrap();
        assert_eq!((t, lp), (0, 0.0));
    }

    let with = |temperature: f32, top_p: Option<f32>| SamplingConfig {
        top_p,
        ..SamplingConfig::sampled(temperature, 4, vec![])
    };
    for ok in [with(0.0, None), with(0.7, Some(1.0)), with(1.0, Some(0.01))] {
        ok.validate().unwrap();
    }
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap();
    // sample_token checks its settings itself (a NaN temperature would sample from NaNs).
    let err = sample_token(&[0.0, 1.0], &with(f32::NAN, None), &mut rng).unwrap_err().to_string();
    assert!(err.contains("temperature"), "{err}");
    for (bad, key) in [
        (with(f32::NAN, None), "temperature"),
        (with(-1.0, None), "temperature"),
        (with(f32::INFINITY, None), "temperature"),
        (with(1.0, Some(0.0)), "top_p"),
        (with(1.0, Some(1.5)), "top_p"),
        (with(1.0, Some(f32::NAN)), "top_p"),
    ] {
        let err = model.generate(&[vec![5, 6]], &bad, &mut Rng::new(0)).unwrap_err().to_string();
        assert!(err.contains(key), "{bad:?}: {err}");
    }
}

/// `vocab_limit` (a tokenizer's vocabulary under a padded embedding table): no id at or above it
/// is generated, greedy or sampled, and the log-probs are over the ids allowed.
#[test]
fn generation_stays_within_the_vocab_limit() {
    let mut rng = Rng::new(5);
    // The padding ids score highest: without the limit greedy would pick id 3.
    let logits = [0.0f32, 1.0, 0.5, 9.0, 8.0];
    let limited = |cfg: SamplingConfig| SamplingConfig { vocab_limit: Some(3), ..cfg };
    let (t, lp) = sample_token(&logits, &limited(SamplingConfig::greedy(1, vec![])), &mut rng).unwrap();
    let lse = (0.0f64.exp() + 1.0f64.exp() + 0.5f64.exp()).ln();
    assert_eq!(t, 1);
    assert!((lp as f64 - (1.0 - lse)).abs() < 1e-6, "{lp}");
    assert_eq!(sample_token(&logits, &SamplingConfig::greedy(1, vec![]), &mut rng).unwrap().0, 3);
    let sampled = limited(SamplingConfig::sampled(1.0, 1, vec![]));
    let draws: Vec<u32> = (0..300).map(|_| sample_token(&logits, &sampled, &mut rng).unwrap().0).collect();
    assert!(draws.iter().all(|&t| t < 3) && (0..3).all(|i| draws.contains(&i)), "{draws:?}");
    let err = sample_token(&logits, &SamplingConfig { vocab_limit: Some(0), ..sampled }, &mut rng).unwrap_err();
    assert!(err.to_string().contains("vocab_limit"), "{err}");
    // A fresh tiny model (64 ids) sampled at temperature 1 under a limit of 62 (the character
    // tokenizer's): 640 draws would give an id of 62 or 63 about 20 times without it.
    let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 9).unwrap();
    let cfg = SamplingConfig { vocab_limit: Some(62), ..SamplingConfig::sampled(1.0, 20, vec![]) };
    let gens = model.generate(&vec![vec![5u32, 6]; 32], &cfg, &mut Rng::new(1)).unwrap();
    assert!(gens.iter().flat_map(|g| &g.tokens).all(|&t| t < 62));
    let free = model.generate(&vec![vec![5u32, 6]; 32], &SamplingConfig::sampled(1.0, 20, vec![]), &mut Rng::new(1));
    assert!(free.unwrap().iter().flat_map(|g| &g.tokens).any(|&t| t >= 62), "the limit is what keeps them out");
}

#[test]
fn generation_stops_at_the_models_last_position() {
    let mut cfg = DeepSeekV3Config::tiny();
    cfg.max_position_embeddings = 8;
    let short = DeepSeekV3::new(cfg.clone(), 4).unwrap();
    cfg.max_position_embeddings = 64;
    let long = DeepSeekV3::new(cfg, 4).unwrap();
    let prompts = vec![vec![5u32, 9, 12, 3, 7], vec![1u32; 8]];
    let sampling = SamplingConfig::greedy(10, vec![]);
    let capped = short.generate(&prompts, &sampling, &mut Rng::new(0)).unwrap();
    let free = long.generate(&prompts, &sampling, &mut Rng::new(0)).unwrap();
    // 8 positions: 3 new tokens after a 5-token prompt, none after an 8-token one; both truncated,
    // and the tokens are the unlimited model's (RoPE does not depend on the limit).
    assert_eq!(capped[0].tokens, free[0].tokens[..3]);
    assert!(capped[1].tokens.is_empty());
    assert!(capped.iter().all(|g| g.truncated));
    let (spec, _) = short
        .generate_speculative(
            &prompts[0],
            &SamplingConfig { cache: CacheMode::Absorb, ..SamplingConfig::greedy(10, vec![]) },
            &mut Rng::new(0),
        )
        .unwrap();
    assert_eq!(spec.tokens, capped[0].tokens);
    assert!(spec.truncated);

    let err = short.generate(&[vec![5], vec![1; 9]], &sampling, &mut Rng::new(0)).unwrap_err().to_string();
    assert!(err.contains("prompt 1 has 9 tokens") && err.contains("8 positions"), "{err}");
    let err = short.generate_speculative(&[1; 9], &SamplingConfig::greedy(2, vec![]), &mut Rng::new(0));
    let err = err.unwrap_err().to_string();
    assert!(err.contains("9 tokens") && err.contains("8 positions"), "{err}");
}

#[test]
fn a_cache_buffer_appends_in_place_grows_by_doubling_and_copies_on_write() {
    for dtype in [DType::F32, DType::BF16] {
        common::cache_buffer_appends_in_place(&Device::Cpu, dtype);
    }
}

#[test]
fn generation_config_json_sets_the_default_sampling_as_in_hf_generate() {
    let dir = whale_tensor::testing::TempDir::new("generate-test-generation-config");
    let read_at = |json: Option<&str>, temperature: Option<f32>| {
        let path = dir.join("generation_config.json");
        match json {
            Some(text) => std::fs::write(&path, text).unwrap(),
            None => std::fs::remove_file(&path).unwrap_or(()),
        }
        SamplingConfig::from_generation_config(&dir, 32, vec![1], temperature)
    };
    let read = |json: Option<&str>| read_at(json, None);
    // No file, or do_sample false (its temperature then unused): greedy.
    let greedy = SamplingConfig::greedy(32, vec![1]);
    assert_eq!(read(None).unwrap(), (greedy.clone(), vec![]));
    assert_eq!(read(Some(r#"{"do_sample": false, "temperature": 0.6}"#)).unwrap().0, greedy);
    // DeepSeek-R1's: temperature and top-p, with HF's default top-k of 50.
    let (r1, unapplied) =
        read(Some(r#"{"bos_token_id": 0, "do_sample": true, "temperature": 0.6, "top_p": 0.95}"#)).unwrap();
    assert_eq!((r1.temperature, r1.top_k, r1.top_p), (0.6, Some(50), Some(0.95)));
    assert!(unapplied.is_empty(), "{unapplied:?}");
    // Qwen2.5-Instruct's: a repetition penalty is named as not applied; neutral values are not.
    let qwen = r#"{"do_sample": true, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05,
                  "num_beams": 1, "min_p": 0.0, "suppress_tokens": []}"#;
    let (cfg, unapplied) = read(Some(qwen)).unwrap();
    assert_eq!((cfg.temperature, cfg.top_k, cfg.top_p), (0.7, Some(20), Some(0.8)));
    assert_eq!(unapplied, vec!["repetition_penalty 1.05".to_string()]);
    // A sampling-only key is named when the file samples, not when it decodes greedily (HF's
    // greedy search ignores it); a repetition penalty acts on both.
    let (_, unapplied) = read(Some(r#"{"do_sample": true, "min_p": 0.1}"#)).unwrap();
    assert_eq!(unapplied, vec!["min_p 0.1".to_string()]);
    let (_, unapplied) = read(Some(r#"{"min_p": 0.1, "repetition_penalty": 1.2}"#)).unwrap();
    assert_eq!(unapplied, vec!["repetition_penalty 1.2".to_string()]);
    // top_k 0 or null and top_p 1 are off, as in HF's warpers.
    for json in [r#"{"do_sample": true, "top_k": 0, "top_p": 1.0}"#, r#"{"do_sample": true, "top_k": null}"#] {
        let (off, _) = read(Some(json)).unwrap();
        assert_eq!((off.temperature, off.top_k, off.top_p), (1.0, None, None), "{json}");
    }
    // A temperature given samples at it with the file's cuts, HF's defaults without the file.
    let (given, _) = read_at(Some(r#"{"do_sample": false, "temperature": 0.6, "top_p": 0.9}"#), Some(0.8)).unwrap();
    assert_eq!((given.temperature, given.top_k, given.top_p), (0.8, Some(50), Some(0.9)));
    let (bare, _) = read_at(None, Some(0.8)).unwrap();
    assert_eq!((bare.temperature, bare.top_k, bare.top_p), (0.8, Some(50), None));
    // Values HF would refuse are named with the file.
    for (json, key) in [
        (r#"{"do_sample": true, "temperature": 0.0}"#, "temperature"),
        (r#"{"do_sample": "yes"}"#, "do_sample"),
        (r#"{"do_sample": true, "top_p": 1.5}"#, "top_p"),
        (r#"{"do_sample": true, "top_k": 2.5}"#, "top_k"),
    ] {
        let err = read(Some(json)).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("generation_config.json"), "{json}: {err}");
    }
}
