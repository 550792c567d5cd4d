//! Supervised fine-tuning on (prompt, completion) examples, for any [`CausalLm`]: R1's cold start
//! and its stage-3 SFT on rejection-sampled traces, distillation into a dense student, and the
//! student's own pretraining (with the loss on the prompt too). Plus rejection sampling: keep the
//! verified, well-formatted, language-consistent samples of a model, deduplicated.

use std::collections::HashSet;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use whale_parallel::model::generate::{CacheMode, SamplingConfig};
use whale_parallel::model::tensor::optim::{AdamW, AdamWConfig, LrSchedule, WarmupCosine};
use whale_parallel::model::tensor::{Device, Rng, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::{CausalLm, IGNORE_INDEX};
use whale_parallel::trainer::check_batch_tokens;

use crate::eval::{completion_text, well_formatted};
use crate::rewards::{LanguageConsistency, Sample};
use crate::rollout::{problem_prompts, prompt_ids};
use crate::tasks::language::language_share;
use crate::tasks::{verify, Language, Problem};
use crate::{Error, Result};

/// One training example: the completion is learnt given the prompt; EOS is appended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
}

impl Example {
    /// A problem's reference solution.
    pub fn solution(p: &Problem) -> Self {
        Example { prompt: p.prompt.clone(), completion: p.solution.clone() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Tokens per row: prompt, completion and EOS must fit in `seq_len + 1` (inputs and shifted
    /// targets); a longer example is an error, not a silently cut trace.
    pub seq_len: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub grad_clip: f64,
    /// Learn the prompt tokens too (pretraining-style); SFT proper learns only the completion.
    pub loss_on_prompt: bool,
    pub seed: u64,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            steps: 60,
            batch: 24,
            seq_len: 48,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 5,
            weight_decay: 0.0,
            grad_clip: 1.0,
            loss_on_prompt: false,
            seed: 0,
        }
    }
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::Rl(format!("sft config `{k}`: {why}")));
        if self.batch == 0 {
            return bad("batch", "must be at least 1");
        }
        if self.seq_len < 2 {
            return bad("seq_len", "must be at least 2");
        }
        if let Err(why) = check_batch_tokens(self.batch, self.seq_len) {
            return bad("batch", &why);
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be positive");
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            let why = format!(
                "{} must be between 0 and `lr` {} (the cosine ends there; above it, the rate would rise): set `min_lr` with `lr`",
                self.min_lr, self.lr
            );
            return bad("min_lr", &why);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be non-negative");
        }
        if !(self.grad_clip > 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", "must be positive (a gradient norm)");
        }
        Ok(())
    }
}

/// One SFT step's measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SftLog {
    pub step: u64,
    pub loss: f64,
    pub lr: f32,
    pub seconds: f64,
}

/// `(ids, targets, lengths)` rows for `examples`: targets are the next tokens, `IGNORE_INDEX` on
/// padding (and on the prompt unless `loss_on_prompt`); `lengths` counts each row's real inputs
/// (prompt and completion), the rest being padding.
pub fn sft_batch(
    tok: &dyn Tokenizer,
    examples: &[&Example],
    seq_len: usize,
    loss_on_prompt: bool,
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let (mut ids, mut targets, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for ex in examples {
        let prompt = prompt_ids(tok, &ex.prompt)?;
        let mut row = prompt.clone();
        row.extend(tok.encode(&ex.completion)?);
        row.push(tok.eos_id());
        row.truncate(seq_len + 1);
        lengths.push(row.len().min(seq_len));
        for t in 0..seq_len {
            ids.push(*row.get(t).unwrap_or(&tok.pad_id()) as i64);
            let learn = t + 1 < row.len() && (loss_on_prompt || t + 1 >= prompt.len());
            targets.push(if learn { row[t + 1] as i64 } else { IGNORE_INDEX });
        }
    }
    let shape = [examples.len(), seq_len];
    Ok((Tensor::from_vec(ids, &shape, &Device::Cpu)?, Tensor::from_vec(targets, &shape, &Device::Cpu)?, lengths))
}

/// Tokens `ex` takes in a row: prompt, completion and EOS (a row holds `seq_len + 1`).
fn row_len(tok: &dyn Tokenizer, ex: &Example) -> Result<usize> {
    Ok(prompt_ids(tok, &ex.prompt)?.len() + tok.encode(&ex.completion)?.len() + 1)
}

/// The examples of `data` that fit a row of `seq_len`, and how many did not: sampled traces
/// (rejection sampling, a teacher's) can run longer than any reference solution, and a filter
/// drops them rather than stop the run.
pub fn fitting(tok: &dyn Tokenizer, data: Vec<Example>, seq_len: usize) -> Result<(Vec<Example>, usize)> {
    let total = data.len();
    let mut kept = Vec::with_capacity(total);
    for ex in data {
        if row_len(tok, &ex)? <= seq_len + 1 {
            kept.push(ex);
        }
    }
    let dropped = total - kept.len();
    Ok((kept, dropped))
}

/// Refuses `data` when an example does not fit a row of `seq_len` (prompt, completion and EOS in
/// `seq_len + 1` tokens), naming how many and the length they need: cut, a trace would teach its
/// reasoning without its `</answer>` and EOS.
pub fn check_lengths(tok: &dyn Tokenizer, data: &[Example], seq_len: usize) -> Result<()> {
    let mut long = (0, 0, None);
    for ex in data {
        let len = row_len(tok, ex)?;
        if len > seq_len + 1 {
            long.0 += 1;
            if len > long.1 {
                long = (long.0, len, Some(ex));
            }
        }
    }
    match long {
        (n, longest, Some(ex)) => Err(Error::Rl(format!(
            "SFT: {n} of {} examples do not fit `seq_len` = {seq_len} (prompt + completion + EOS up to {longest} \
             tokens, e.g. {:?}); set `seq_len` to at least {}",
            data.len(),
            ex.prompt,
            longest - 1
        ))),
        _ => Ok(()),
    }
}

/// Fine-tunes `model` in place on `data` (shuffled, cycled), calling `on_step` after each step.
pub fn sft(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    data: &[Example],
    cfg: &SftConfig,
    mut on_step: impl FnMut(&SftLog),
) -> Result<Vec<SftLog>> {
    if data.is_empty() {
        return Err(Error::Rl("SFT: no training examples".into()));
    }
    cfg.validate()?;
    check_lengths(tok, data, cfg.seq_len)?;
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: cfg.weight_decay,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        decay_1d: false,
        ..AdamWConfig::default()
    })?;
    let schedule = WarmupCosine { peak: cfg.lr, min: cfg.min_lr, warmup: cfg.warmup, total: cfg.steps };
    let mut rng = Rng::new(cfg.seed ^ 0x5F7);
    let mut order: Vec<usize> = Vec::new();
    let mut logs = Vec::new();
    for step in 0..cfg.steps {
        let t0 = Instant::now();
        let mut batch = Vec::with_capacity(cfg.batch);
        while batch.len() < cfg.batch {
            if order.is_empty() {
                order = rng.permutation(data.len());
            }
            batch.push(&data[order.pop().expect("refilled")]);
        }
        let (ids, targets, lengths) = sft_batch(tok, &batch, cfg.seq_len, cfg.loss_on_prompt)?;
        let loss = model.train_loss(&ids, &targets, &lengths)?;
        let lv = loss.to_scalar()? as f64;
        if !lv.is_finite() {
            model.params().zero_grad();
            return Err(Error::Rl(format!("SFT step {step}: the loss is not finite ({lv})")));
        }
        loss.backward()?;
        crate::clip_finite(model.params(), cfg.grad_clip, || format!("SFT step {step}"))?;
        let lr = schedule.lr(step);
        opt.step(model.params(), lr)?;
        model.params().zero_grad();
        let log = SftLog { step, loss: lv, lr, seconds: t0.elapsed().as_secs_f64() };
        on_step(&log);
        logs.push(log);
    }
    Ok(logs)
}

/// How many samples rejection sampling drew and kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RejectionStats {
    pub sampled: usize,
    pub correct: usize,
    /// Correct, well-formatted and (where the problem has a language) fully in its language.
    pub accepted: usize,
    /// After removing duplicates.
    pub unique: usize,
}

/// Whether a correct completion of `p` ([`completion_text`]) is fit to fine-tune on: in the R1
/// template and, where the problem has a language, with its reasoning and its answer all in it
/// (R1 filters out mixed languages; the verifier accepts an answer's value in either script).
pub fn fit_for_sft(p: &Problem, text: &str) -> bool {
    let sample = Sample { problem: p, text, tokens: 0, truncated: false };
    let consistent = LanguageConsistency.share(&sample).is_none_or(|s| s == 1.0)
        && Language::of_problem(p).is_none_or(|l| language_share(text, l).is_none_or(|s| s == 1.0));
    well_formatted(text) && consistent
}

/// R1's rejection sampling: `samples` completions per problem at `temperature`; keep those whose
/// answer verifies, that follow the template, that are not truncated, that hold no control token
/// before their stop (a BOS, padding or an EOS mid-text decodes to markup fine-tuning would teach)
/// and whose reasoning is all in the prompt's language; drop duplicates.
pub fn rejection_sample(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    samples: usize,
    temperature: f32,
    max_new_tokens: usize,
    rng: &mut Rng,
) -> Result<(Vec<Example>, RejectionStats)> {
    let prompts: Vec<Vec<u32>> =
        problem_prompts(tok, problems)?.into_iter().flat_map(|p| std::iter::repeat_n(p, samples)).collect();
    let cfg = SamplingConfig {
        cache: CacheMode::Absorb,
        ..SamplingConfig::sampled(temperature, max_new_tokens, tok.stop_ids())
    }
    .limited_to(tok);
    let gens = model.generate(&prompts, &cfg, rng)?;
    let mut stats = RejectionStats { sampled: gens.len(), ..Default::default() };
    let (mut kept, mut seen) = (Vec::new(), HashSet::new());
    let control: HashSet<u32> = [tok.bos_id(), tok.pad_id(), tok.eos_id()].into_iter().chain(tok.stop_ids()).collect();
    for (i, g) in gens.iter().enumerate() {
        let p = &problems[i / samples.max(1)];
        let text = completion_text(tok, g);
        if g.truncated || !verify(p, &text) {
            continue;
        }
        stats.correct += 1;
        // The tokens before the stop token that ended the completion.
        let body = g.tokens.split_last().map_or(&[][..], |(_, body)| body);
        if !fit_for_sft(p, &text) || body.iter().any(|t| control.contains(t)) {
            continue;
        }
        stats.accepted += 1;
        let ex = Example { prompt: p.prompt.clone(), completion: text };
        if seen.insert(ex.clone()) {
            kept.push(ex);
        }
    }
    stats.unique = kept.len();
    Ok((kept, stats))
}
