//! Evaluation on held-out problems (spec/rl.md "Definitions"): greedy accuracy, pass@1 (mean
//! accuracy of k samples at the sampling temperature), pass@k with the unbiased estimator,
//! cons@k (majority vote over the k answers), mean completion length and format rate.

use std::collections::HashMap;

use whale_parallel::model::generate::{CacheMode, SamplingConfig};
use whale_parallel::model::tensor::Rng;
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::CausalLm;

use crate::rewards::{LanguageConsistency, Sample};
use crate::tasks::{extract_answer, verify, Problem};
use crate::Result;

/// The unbiased pass@k estimator `1 - C(n-c, k) / C(n, k)` for `c` correct of `n` samples.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // Product form, stable for large n: prod_{i=n-c+1}^{n} (1 - k / i).
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// Whether a completion follows the R1 template: `<think>...</think>` then `<answer>...</answer>`,
/// each once, in that order, and nothing after but the end-of-sequence token.
pub fn well_formatted(completion: &str) -> bool {
    let body = completion.strip_suffix("<eos>").unwrap_or(completion);
    let Some(rest) = body.strip_prefix("<think>") else { return false };
    let Some((think, rest)) = rest.split_once("</think>") else { return false };
    let Some(rest) = rest.strip_prefix("<answer>") else { return false };
    let Some((answer, tail)) = rest.split_once("</answer>") else { return false };
    let tags = ["<think>", "</think>", "<answer>", "</answer>"];
    tail.is_empty() && !tags.iter().any(|t| think.contains(t) || answer.contains(t))
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    pub problems: usize,
    pub samples: usize,
    /// Greedy accuracy (not pass@1).
    pub greedy: f64,
    /// Mean accuracy of the k samples per problem at the sampling temperature.
    pub pass1: f64,
    /// pass@k for k = `samples`.
    pub pass_k: f64,
    /// Majority vote over the k extracted answers.
    pub cons_k: f64,
    /// Mean completion length in tokens (sampled).
    pub mean_length: f64,
    /// Share of sampled completions in the R1 template.
    pub format_rate: f64,
    /// Mean language consistency of the sampled completions of problems that have a language
    /// (the share of the reasoning's numerals in the prompt's script); NaN when none has one.
    pub language: f64,
    /// pass@1 per task name.
    pub per_task: Vec<(String, f64)>,
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub samples: usize,
    pub temperature: f32,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub cache: CacheMode,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { samples: 8, temperature: 1.0, max_new_tokens: 96, seed: 1234, cache: CacheMode::Absorb }
    }
}

/// Evaluates `model` on `problems`.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    let stop = vec![tok.eos_id()];
    let prompts: Vec<Vec<u32>> =
        problems.iter().map(|p| tok.encode(&p.prompt)).collect::<std::result::Result<_, _>>()?;
    let mut rng = Rng::new(cfg.seed);
    let greedy_cfg = SamplingConfig { cache: cfg.cache, ..SamplingConfig::greedy(cfg.max_new_tokens, stop.clone()) };
    let greedy = model.generate(&prompts, &greedy_cfg, &mut rng)?;
    let k = cfg.samples.max(1);
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let sampled_cfg =
        SamplingConfig { cache: cfg.cache, ..SamplingConfig::sampled(cfg.temperature, cfg.max_new_tokens, stop) };
    let sampled = model.generate(&repeated, &sampled_cfg, &mut rng)?;

    let n = problems.len().max(1) as f64;
    let (mut g_ok, mut p1, mut pk, mut cons, mut len, mut fmt) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut lang, mut lang_n) = (0.0, 0usize);
    let mut per_task: HashMap<String, (f64, usize)> = HashMap::new();
    for (i, p) in problems.iter().enumerate() {
        g_ok += verify(p, &tok.decode(&greedy[i].tokens)) as u8 as f64;
        let texts: Vec<String> = sampled[i * k..(i + 1) * k].iter().map(|g| tok.decode(&g.tokens)).collect();
        let correct = texts.iter().filter(|t| verify(p, t)).count();
        p1 += correct as f64 / k as f64;
        pk += pass_at_k(k, correct, k);
        let mut votes: HashMap<&str, usize> = HashMap::new();
        for t in &texts {
            if let Some(a) = extract_answer(t) {
                *votes.entry(a).or_default() += 1;
            }
        }
        // Most votes; ties to the answer seen first, so the vote is deterministic.
        let best = texts
            .iter()
            .filter_map(|t| extract_answer(t))
            .max_by_key(|a| (votes[a], std::cmp::Reverse(texts.iter().position(|t| extract_answer(t) == Some(a)))));
        if let Some(best) = best {
            let winner = texts.iter().find(|t| extract_answer(t) == Some(best)).expect("voted answer exists");
            cons += verify(p, winner) as u8 as f64;
        }
        len += sampled[i * k..(i + 1) * k].iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / k as f64;
        fmt += texts.iter().filter(|t| well_formatted(t)).count() as f64 / k as f64;
        for (t, g) in texts.iter().zip(&sampled[i * k..(i + 1) * k]) {
            let s = Sample { problem: p, text: t, tokens: g.tokens.len(), truncated: g.truncated };
            if let Some(v) = LanguageConsistency.share(&s) {
                lang += v;
                lang_n += 1;
            }
        }
        let e = per_task.entry(p.task.clone()).or_default();
        e.0 += correct as f64 / k as f64;
        e.1 += 1;
    }
    let mut per_task: Vec<(String, f64)> = per_task.into_iter().map(|(t, (s, c))| (t, s / c as f64)).collect();
    per_task.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(EvalReport {
        problems: problems.len(),
        samples: k,
        greedy: g_ok / n,
        pass1: p1 / n,
        pass_k: pk / n,
        cons_k: cons / n,
        mean_length: len / n,
        format_rate: fmt / n,
        language: if lang_n == 0 { f64::NAN } else { lang / lang_n as f64 },
        per_task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_combinatorial_definition() {
        let binom = |n: u64, r: u64| -> f64 { (0..r).map(|i| (n - i) as f64 / (i + 1) as f64).product() };
        for n in 1..12u64 {
            for c in 0..=n {
                for k in 1..=n {
                    let want = if n - c < k { 1.0 } else { 1.0 - binom(n - c, k) / binom(n, k) };
                    assert!((pass_at_k(n as usize, c as usize, k as usize) - want).abs() < 1e-12);
                }
            }
        }
        assert_eq!(pass_at_k(8, 0, 8), 0.0);
        assert_eq!(pass_at_k(8, 1, 8), 1.0);
        assert!((pass_at_k(8, 2, 1) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn format_check_is_strict_about_order_and_repetition() {
        assert!(well_formatted("<think>1+1=2</think><answer>2</answer><eos>"));
        assert!(well_formatted("<think></think><answer>2</answer>"));
        assert!(!well_formatted("<answer>2</answer><think>x</think>"));
        assert!(!well_formatted("<think>a</think><answer>2</answer>junk"));
        assert!(!well_formatted("<think>a<think>b</think><answer>2</answer>"));
        assert!(!well_formatted("<think>a</think><answer>2"));
    }
}
