//! Evaluation on held-out problems (spec/rl.md "Definitions"): greedy accuracy, pass@1 (mean
//! accuracy of k samples at the sampling temperature), pass@k with the unbiased estimator,
//! cons@k (majority vote over the k answers), mean completion length and format rate.

use std::collections::HashMap;

use whale_parallel::model::generate::{CacheMode, Generation, SamplingConfig};
use whale_parallel::model::tensor::Rng;
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::CausalLm;
use whale_parallel::trainer::check_batch_tokens;

use crate::rewards::{LanguageConsistency, Sample};
use crate::tasks::{answer_key, verify, AnswerKey, Problem};
use crate::{Error, Result};

/// The unbiased pass@k estimator `1 - C(n-c, k) / C(n, k)` for `c` correct of `n` samples;
/// NaN where it is undefined (`k > n`, or more correct samples than samples).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if k > n || c > n {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // Product form, stable for large n: prod_{i=n-c+1}^{n} (1 - k / i).
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// A generation as rewards and evaluation read it: its tokens decoded without the stop token
/// that ended it (whatever text that token decodes to in the tokenizer at hand).
pub fn completion_text(tok: &dyn Tokenizer, g: &Generation) -> String {
    let tokens =
        if g.truncated { &g.tokens[..] } else { g.tokens.split_last().map_or(&g.tokens[..], |(_, rest)| rest) };
    tok.decode(tokens)
}

/// Whether a completion ([`completion_text`]) follows the R1 template: `<think>...</think>` then
/// `<answer>...</answer>`, each once, in that order, and nothing after.
pub fn well_formatted(completion: &str) -> bool {
    let Some(rest) = completion.strip_prefix("<think>") else { return false };
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
    /// Share of sampled completions in the R1 template and ended (a truncated one is not, as the
    /// format reward has it).
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
    /// The samples' top-k and top-p filters ([`SamplingConfig`]'s); off by default. The R1
    /// paper's evaluations sample at temperature 0.6 with top-p 0.95.
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub cache: CacheMode,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            samples: 8,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            max_new_tokens: 96,
            seed: 1234,
            cache: CacheMode::Absorb,
        }
    }
}

impl EvalConfig {
    /// The defaults with `samples` per problem and room for the completions of a model trained
    /// to write up to `trained` tokens (an RL run's `max_new_tokens`): a longer limit than the
    /// default's is kept, so a correct long answer is not cut off and counted wrong.
    pub fn covering(samples: usize, trained: usize) -> Self {
        let d = EvalConfig::default();
        EvalConfig { samples, max_new_tokens: d.max_new_tokens.max(trained), ..d }
    }
}

/// The completion whose answer most of `texts` give (cons@k), compared by value (a numeral in
/// either script, a countdown expression's value: see [`answer_key`]); ties go to the answer
/// seen first. `None` when no completion has an answer.
pub fn majority_vote(p: &Problem, texts: &[String]) -> Option<usize> {
    let keys: Vec<Option<AnswerKey>> = texts.iter().map(|t| answer_key(p, t)).collect();
    let mut votes: HashMap<&AnswerKey, (usize, std::cmp::Reverse<usize>)> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if let Some(key) = key {
            votes.entry(key).or_insert((0, std::cmp::Reverse(i))).0 += 1;
        }
    }
    votes.into_values().max().map(|(_, std::cmp::Reverse(first))| first)
}

/// How many of one problem's samples solve it, and whether their majority answer does. A
/// truncated sample (`None`: it never ended) neither solves it nor votes, as the accuracy
/// reward has it.
pub fn score_samples(p: &Problem, samples: &[Option<String>]) -> (usize, bool) {
    let correct = samples.iter().flatten().filter(|t| verify(p, t)).count();
    let texts: Vec<String> = samples.iter().map(|t| t.clone().unwrap_or_default()).collect();
    (correct, majority_vote(p, &texts).is_some_and(|w| verify(p, &texts[w])))
}

/// `text`, the completion of `g`, as [`score_samples`] takes it: `None` when `g` was truncated.
fn finished(g: &Generation, text: &str) -> Option<String> {
    (!g.truncated).then(|| text.to_string())
}

/// Evaluates `model` on `problems`.
pub fn evaluate(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    cfg: &EvalConfig,
) -> Result<EvalReport> {
    // Either would report 0.000 for a model that was never asked.
    if problems.is_empty() || cfg.samples == 0 {
        return Err(Error::Rl(format!(
            "evaluation of {} problems with {} samples each: there is nothing to score",
            problems.len(),
            cfg.samples
        )));
    }
    // Every problem's samples are one generation's rows.
    if let Err(why) = check_batch_tokens(problems.len().saturating_mul(cfg.samples), cfg.max_new_tokens) {
        return Err(Error::Rl(format!(
            "evaluation of {} problems with {} samples each: {why}",
            problems.len(),
            cfg.samples
        )));
    }
    let stop = tok.stop_ids();
    let prompts = crate::rollout::problem_prompts(tok, problems)?;
    let mut rng = Rng::new(cfg.seed);
    let greedy_cfg =
        SamplingConfig { cache: cfg.cache, ..SamplingConfig::greedy(cfg.max_new_tokens, stop.clone()) }.limited_to(tok);
    let greedy = model.generate(&prompts, &greedy_cfg, &mut rng)?;
    let k = cfg.samples;
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), k)).collect();
    let sampled_cfg = SamplingConfig {
        cache: cfg.cache,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
        ..SamplingConfig::sampled(cfg.temperature, cfg.max_new_tokens, stop)
    }
    .limited_to(tok);
    let sampled = model.generate(&repeated, &sampled_cfg, &mut rng)?;

    let n = problems.len() as f64;
    let (mut g_ok, mut p1, mut pk, mut cons, mut len, mut fmt) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut lang, mut lang_n) = (0.0, 0usize);
    let mut per_task: HashMap<String, (f64, usize)> = HashMap::new();
    for (i, p) in problems.iter().enumerate() {
        g_ok += score_samples(p, &[finished(&greedy[i], &completion_text(tok, &greedy[i]))]).0 as f64;
        let group = &sampled[i * k..(i + 1) * k];
        let texts: Vec<String> = group.iter().map(|g| completion_text(tok, g)).collect();
        let samples: Vec<Option<String>> = group.iter().zip(&texts).map(|(g, t)| finished(g, t)).collect();
        let (correct, majority) = score_samples(p, &samples);
        p1 += correct as f64 / k as f64;
        pk += pass_at_k(k, correct, k);
        cons += majority as u8 as f64;
        len += sampled[i * k..(i + 1) * k].iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / k as f64;
        fmt += samples.iter().flatten().filter(|t| well_formatted(t)).count() as f64 / k as f64;
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
        assert!(pass_at_k(3, 5, 1).is_nan() && pass_at_k(3, 1, 4).is_nan(), "undefined, not a number");
    }

    #[test]
    fn majority_vote_counts_answers_by_value() {
        use crate::tasks::language::to_digits;
        use crate::tasks::{Split, TaskSet};
        let answer = |a: &str| format!("<think>x</think><answer>{a}</answer>");
        // `c3,7,25t35=`: three spellings of one right expression outvote two identical wrong ones
        // (voting on the text alone, `25*7*3` would win 2 to 1).
        let p = Problem {
            task: "countdown".into(),
            prompt: "c3,7,25t35=".into(),
            answer: "(25+7)+3".into(),
            solution: String::new(),
        };
        let texts: Vec<String> = ["25*7*3", "(25+7)+3", "25*7*3", "25+(7+3)", "3+7+25", "<think>no answer"]
            .iter()
            .map(|a| if a.starts_with('<') { a.to_string() } else { answer(a) })
            .collect();
        let winner = majority_vote(&p, &texts).unwrap();
        assert!(verify(&p, &texts[winner]), "{}", texts[winner]);
        // Ties go to the answer seen first; no answer at all, no vote.
        assert_eq!(majority_vote(&p, &texts[..2]), Some(0));
        assert_eq!(majority_vote(&p, &texts[5..]), None);
        // A letter-numeral problem answered in either script: one answer.
        let tasks = TaskSet::parse("add:2").unwrap().with_letters(1.0).unwrap();
        let p = &tasks.problems(1, 3, Split::Train)[0];
        let (letters, digits) = (p.answer.clone(), to_digits(&p.answer));
        assert_ne!(letters, digits);
        let texts = vec![answer("1"), answer(&letters), answer("1"), answer(&digits), answer(&digits)];
        assert!(verify(p, &texts[majority_vote(p, &texts).unwrap()]));
    }

    #[test]
    fn truncated_samples_neither_solve_nor_vote() {
        let p = Problem { task: "add".into(), prompt: "12+7=".into(), answer: "19".into(), solution: String::new() };
        let text = |a: &str| Some(format!("<think>x</think><answer>{a}</answer>"));
        assert_eq!(score_samples(&p, &[text("19"), text("18"), text("18")]), (1, false));
        // The two right answers never ended: no credit, and the one finished answer wins the vote.
        assert_eq!(score_samples(&p, &[None, None, text("18")]), (0, false));
        assert_eq!(score_samples(&p, &[None, None, text("19")]), (1, true));
        assert_eq!(score_samples(&p, &[None]), (0, false));
    }

    #[test]
    fn format_check_is_strict_about_order_and_repetition() {
        assert!(well_formatted("<think>1+1=2</think><answer>2</answer>"));
        assert!(!well_formatted("<think>1+1=2</think><answer>2</answer><eos>"), "texts end before the stop token");
        assert!(well_formatted("<think></think><answer>2</answer>"));
        assert!(!well_formatted("<answer>2</answer><think>x</think>"));
        assert!(!well_formatted("<think>a</think><answer>2</answer>junk"));
        assert!(!well_formatted("<think>a<think>b</think><answer>2</answer>"));
        assert!(!well_formatted("<think>a</think><answer>2"));
    }

    #[test]
    fn top_k_and_top_p_reach_the_samples() {
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::{DeepSeekV3, DeepSeekV3Config};
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 3).unwrap();
        let tok = CharTokenizer::new();
        let problems = crate::tasks::TaskSet::parse("add:1").unwrap().held_out(6, 0);
        let cfg = EvalConfig { samples: 4, max_new_tokens: 12, ..EvalConfig::default() };
        // Keeping one token, every sample is the greedy completion: the samples' mean length is
        // the greedy completions' mean length, and both filters give the same report.
        let prompts = crate::rollout::problem_prompts(&tok, &problems).unwrap();
        let greedy_cfg = SamplingConfig::greedy(cfg.max_new_tokens, tok.stop_ids()).limited_to(&tok);
        let greedy = model.generate(&prompts, &greedy_cfg, &mut Rng::new(0)).unwrap();
        let greedy_length = greedy.iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / problems.len() as f64;
        let top_k = evaluate(&model, &tok, &problems, &EvalConfig { top_k: Some(1), ..cfg.clone() }).unwrap();
        let top_p = evaluate(&model, &tok, &problems, &EvalConfig { top_p: Some(1e-6), ..cfg.clone() }).unwrap();
        let plain = evaluate(&model, &tok, &problems, &cfg).unwrap();
        assert_eq!(top_k.mean_length, greedy_length);
        assert_eq!(
            (top_p.mean_length, top_p.format_rate, top_p.pass1),
            (top_k.mean_length, top_k.format_rate, top_k.pass1)
        );
        assert_eq!(top_k.pass1, top_k.greedy);
        assert_ne!(plain.mean_length, greedy_length, "an untrained model's samples at T = 1 wander");
    }

    #[test]
    fn an_evaluation_that_would_score_nothing_or_cannot_be_held_is_refused() {
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::{DeepSeekV3, DeepSeekV3Config};
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 1).unwrap();
        let tok = CharTokenizer::new();
        let problems = crate::tasks::TaskSet::parse("add:1").unwrap().held_out(2, 0);
        let cfg = EvalConfig::covering(2, 4);
        for (problems, cfg, words) in [
            (&problems[..0], cfg.clone(), "0 problems with 2 samples each: there is nothing to score"),
            (&problems[..], EvalConfig { samples: 0, ..cfg.clone() }, "2 problems with 0 samples each"),
            (&problems[..], EvalConfig { samples: usize::MAX / 2, ..cfg.clone() }, "positions a batch may hold"),
        ] {
            let err = evaluate(&model, &tok, problems, &cfg).unwrap_err().to_string();
            assert!(err.contains(words), "{err}");
        }
        let report = evaluate(&model, &tok, &problems, &cfg).unwrap();
        assert!((0.0..=1.0).contains(&report.pass1));
    }
}
