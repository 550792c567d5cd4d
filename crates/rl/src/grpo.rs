//! Group Relative Policy Optimization (spec/rl.md sections 1, 3.1, 3.7, 3.8).
//!
//! One step: sample `prompts_per_step` training problems, G completions each; score them with the
//! rule rewards; turn rewards into advantages relative to the group; then `num_iterations` passes
//! over the rollout (split into `minibatches` optimizer steps) minimising, per completion token,
//!
//! ```text
//! -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A) + beta * (exp(ref - l) - (ref - l) - 1)
//! ```
//!
//! with `rho = exp(l - l_old)`, aggregated by the chosen loss type. Log-probs are always taken at
//! the sampling temperature.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use whale_parallel::model::checkpoint::{complete_checkpoint, write_dir_atomically, write_json_synced};
use whale_parallel::model::checkpoint::{load_file, save_file, SaveDType};
use whale_parallel::model::generate::CacheMode;
use whale_parallel::model::tensor::optim::{AdamW, AdamWConfig, LrSchedule, WarmupCosine};
use whale_parallel::model::tensor::{no_grad, DType, Device, ParamStore, Rng, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::{load_pretrained, moved_to, CausalLm};
use whale_parallel::trainer::check_batch_tokens;
use whale_parallel::trainer::truncate_metrics;

use crate::rewards::{RewardSet, Sample, Scores};
use crate::rollout::{logprobs, sample_groups, score, PackedBatch, PromptTemplate, Rollout, RolloutConfig};
use crate::tasks::{verify, Problem, Split, TaskSet};
use crate::{Error, Result};

/// How per-token losses are averaged (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// DeepSeekMath: mean over each completion's tokens, then over completions.
    Grpo,
    /// Sum over tokens / active tokens of the micro-batch.
    Bnpo,
    /// Dr. GRPO: sum over tokens / (completions * max_new_tokens), independent of lengths.
    DrGrpo,
    /// DAPO: sum over tokens / active tokens of the whole optimizer step's batch (with
    /// `minibatches` > 1, each update's own tokens, as verl's token-mean; TRL divides every update
    /// by the generation batch's tokens over the number of updates).
    Dapo,
}

/// How group-centred rewards are scaled (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divide by the group's sample std (+1e-4).
    Group,
    /// Divide by the whole batch's sample std (Lite PPO).
    Batch,
    /// No scaling (Dr. GRPO).
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Optimizer steps.
    pub steps: u64,
    /// Unique prompts per rollout.
    pub prompts_per_step: usize,
    /// Completions per prompt (G).
    pub group_size: usize,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    /// Peak learning rate, reached after `warmup` steps and then held (DAPO's schedule).
    pub lr: f32,
    pub warmup: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub grad_clip: f64,
    /// Lower clip range.
    pub epsilon: f32,
    /// Upper clip range (DAPO's clip-higher, e.g. 0.28); `epsilon` when unset.
    pub epsilon_high: Option<f32>,
    /// Weight of the k3 KL to the reference model; 0 skips the reference forward.
    pub beta: f32,
    pub loss_type: LossType,
    pub scale_rewards: ScaleRewards,
    /// Passes over each rollout (mu).
    pub num_iterations: usize,
    /// Optimizer steps per pass over a rollout, each on whole groups taken in order (TRL's
    /// `steps_per_generation / gradient_accumulation_steps`; TRL shuffles the completions before
    /// splitting them). `dapo` divides each step's loss by that minibatch's tokens (DAPO's
    /// definition; TRL divides by the whole generation batch's, the same with one minibatch).
    pub minibatches: usize,
    /// Completions per forward/backward chunk (memory, not maths).
    pub micro_batch: usize,
    /// Reset the reference to the current policy every this many steps (0: never; R1 used 400).
    pub ref_sync_every: u64,
    /// Drop groups whose accuracy is all equal (all right or all wrong; the total reward without
    /// an `accuracy` reward) and sample more prompts (DAPO).
    pub dynamic_sampling: bool,
    /// Extra sampling rounds dynamic sampling may use per step.
    pub max_resample_rounds: usize,
    /// Leave completions that hit `max_new_tokens` out of the loss (DAPO's overlong filtering).
    pub mask_truncated: bool,
    /// Per-step advantages from checkable reasoning steps (DeepSeekMath's process supervision).
    pub process_supervision: bool,
    /// Rewards and weights, e.g. `accuracy,format:0.5`.
    pub rewards: String,
    /// Training tasks, e.g. `add:2-3`.
    pub tasks: String,
    /// Share of numeric training problems posed in letter numerals.
    pub letters: f64,
    /// Write sample completions every this many steps (0: never).
    pub log_completions_every: u64,
    pub seed: u64,
    /// What the prompts are written in before sampling: `plain`, or `r1` (R1-Zero's template,
    /// for a base model that has never seen the tags).
    pub template: PromptTemplate,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            // Calibrated on 2 cores from the main job's base model: 1.7-2.5 s per step (these
            // machines vary run to run), so the run and its evaluations fit in 5 minutes.
            steps: 100,
            prompts_per_step: 32,
            group_size: 8,
            temperature: 1.0,
            top_p: None,
            max_new_tokens: 48,
            lr: 1e-4,
            warmup: 10,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.99,
            grad_clip: 1.0,
            epsilon: 0.2,
            epsilon_high: None,
            beta: 0.0,
            loss_type: LossType::Grpo,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            minibatches: 1,
            micro_batch: 128,
            ref_sync_every: 0,
            dynamic_sampling: false,
            max_resample_rounds: 2,
            mask_truncated: false,
            process_supervision: false,
            rewards: "accuracy,format:0.1".into(),
            tasks: "add:2-3".into(),
            letters: 0.25,
            log_completions_every: 10,
            seed: 0,
            template: PromptTemplate::Plain,
        }
    }
}

impl GrpoConfig {
    /// Refuses settings out of range, naming the key.
    pub fn validate(&self) -> Result<()> {
        self.validated_rewards().map(drop)
    }

    /// [`GrpoConfig::validate`], returning the parsed `rewards`.
    fn validated_rewards(&self) -> Result<RewardSet> {
        let bad = |k: &str, why: &str| Err(Error::Rl(format!("grpo config `{k}`: {why}")));
        if self.prompts_per_step == 0 {
            return bad("prompts_per_step", "must be at least 1");
        }
        if self.group_size == 0 {
            return bad("group_size", "must be at least 1");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be positive (log-probs are taken at it)");
        }
        if self.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1");
        }
        // A step's completions, one row per sample.
        let rows = self.prompts_per_step.saturating_mul(self.group_size);
        if let Err(why) = check_batch_tokens(rows, self.max_new_tokens) {
            return bad(
                "prompts_per_step",
                &format!("{} x group_size {}: {why}", self.prompts_per_step, self.group_size),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be positive");
        }
        // 1 or more leaves the ratio unclipped below (it is positive): R1 used 10 (spec 1.8),
        // and TRL takes it.
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return bad("epsilon", "must be non-negative");
        }
        if self.epsilon_high.is_some_and(|e| !(e >= 0.0 && e.is_finite())) {
            return bad("epsilon_high", "must be non-negative");
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad("beta", "must be non-negative");
        }
        if self.num_iterations == 0 {
            return bad("num_iterations", "must be at least 1");
        }
        if self.minibatches == 0 || self.minibatches > self.prompts_per_step {
            return bad("minibatches", "must be between 1 and prompts_per_step");
        }
        if self.micro_batch == 0 {
            return bad("micro_batch", "must be at least 1");
        }
        if !(self.grad_clip > 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", "must be positive (a gradient norm)");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be non-negative");
        }
        for (key, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(key, "an AdamW moment decay, so in [0, 1)");
            }
        }
        let rewards = RewardSet::parse(&self.rewards, self.max_new_tokens)?;
        if self.process_supervision && rewards.names() != ["accuracy"] {
            return bad(
                "rewards",
                "process supervision scores the reasoning steps and the answer; set `rewards` to `accuracy` \
                 (other rewards would not reach its advantages)",
            );
        }
        if !(0.0..=1.0).contains(&self.letters) {
            return bad("letters", "a share of the problems, so between 0 and 1");
        }
        Ok(rewards)
    }

    pub fn epsilon_high(&self) -> f32 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    pub fn rollout(&self) -> RolloutConfig {
        RolloutConfig {
            group_size: self.group_size,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: None,
            max_new_tokens: self.max_new_tokens,
            cache: CacheMode::Absorb,
            template: self.template,
        }
    }

    pub fn schedule(&self) -> WarmupCosine {
        WarmupCosine { peak: self.lr, min: self.lr, warmup: self.warmup, total: self.steps }
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            decay_1d: false,
            ..AdamWConfig::default()
        }
    }
}

/// The file a complete RL checkpoint writes last.
pub const RL_STATE_FILE: &str = "rl_state.json";
const GRPO_SALT: u64 = 0x6772_706F;

/// RL errors inside the parallel crate's atomic directory writer.
pub(crate) fn to_parallel(e: Error) -> whale_parallel::Error {
    whale_parallel::Error::Train(e.to_string())
}

/// The epsilon TRL adds to the std.
pub const STD_EPS: f64 = 1e-4;

/// Sample mean and std (ddof = 1) of the finite values; `None` when there are none.
fn mean_std(xs: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = xs.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    Some((mean, var.sqrt()))
}

/// Outcome advantages (spec 1.3): `(r - group mean) / (std + 1e-4)` with the std of the group,
/// of the batch, or none. NaN rewards (no reward applied) are left out of the statistics and get
/// advantage 0. A group of one completion has no baseline: it is not centred, and `group` scaling
/// takes its std as 1, so it gets `r / (1 + 1e-4)` (verl's rule, at TRL's epsilon; `batch` still
/// divides it by the batch's std).
pub fn group_advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let batch_std = mean_std(rewards.iter().copied()).map_or(0.0, |(_, s)| s);
    let mut out = vec![0.0; rewards.len()];
    for (g, chunk) in rewards.chunks(group.max(1)).enumerate() {
        let Some((mean, std)) = mean_std(chunk.iter().copied()) else { continue };
        let (mean, std) = if group == 1 { (0.0, 1.0) } else { (mean, std) };
        for (j, &r) in chunk.iter().enumerate() {
            if !r.is_finite() {
                continue;
            }
            let centred = r - mean;
            out[g * group.max(1) + j] = match scale {
                ScaleRewards::Group => centred / (std + STD_EPS),
                ScaleRewards::Batch => centred / (batch_std + STD_EPS),
                ScaleRewards::None => centred,
            };
        }
    }
    out
}

/// Process-supervised advantages (spec 1.4) for one group: `steps[i]` lists, for completion i,
/// each step's (index of the token that ends it, reward). Rewards are centred on the mean of all
/// steps of the group and scaled as outcome rewards are (`batch_std`: the std of every step of
/// the batch, for [`ScaleRewards::Batch`]), a group of one included: its several steps give it a
/// mean and a std of its own; token t's advantage is the sum of the normalised
/// rewards of the steps ending at or after t. `lengths[i]` is completion i's token count.
pub fn process_advantages(
    steps: &[Vec<(usize, f64)>],
    lengths: &[usize],
    scale: ScaleRewards,
    batch_std: f64,
) -> Vec<Vec<f64>> {
    let stats = mean_std(steps.iter().flatten().map(|&(_, r)| r));
    steps
        .iter()
        .zip(lengths)
        .map(|(s, &len)| {
            let mut adv = vec![0.0; len];
            let Some((mean, std)) = stats else { return adv };
            for &(end, r) in s {
                let norm = match scale {
                    ScaleRewards::Group => (r - mean) / (std + STD_EPS),
                    ScaleRewards::Batch => (r - mean) / (batch_std + STD_EPS),
                    ScaleRewards::None => r - mean,
                };
                for a in adv.iter_mut().take((end + 1).min(len)) {
                    *a += norm;
                }
            }
            adv
        })
        .collect()
}

/// The checkable steps of a completion for tasks with one right trace (add, mul, modchain, sort,
/// reverse): step j of the `<think>` block (split at `;`) is right when it equals step j of the
/// reference solution; a completion without the block has one wrong step, its missing reasoning,
/// up to its answer. The answer is the last step, right as the accuracy reward is (verified, and
/// not truncated), and it ends with the completion: whatever follows `</answer>`, and the EOS
/// token after the text, take its reward (so stopping gets a gradient, as it does under outcome
/// supervision). Returns (byte offset where each step ends, reward 0/1); `None` for tasks with
/// many right traces (countdown) or no reference steps.
pub fn checkable_steps(problem: &Problem, text: &str, truncated: bool) -> Option<Vec<(usize, f64)>> {
    if matches!(problem.task.as_str(), "countdown" | "jsonl") {
        return None;
    }
    let reference = problem.solution.strip_prefix("<think>")?.split_once("</think>")?.0;
    let want: Vec<&str> = reference.split(';').collect();
    let mut out = Vec::new();
    match text.find("<think>") {
        Some(open) => {
            let start = open + "<think>".len();
            let end = text[start..].find("</think>").map_or(text.len(), |e| start + e);
            let mut at = start;
            for (j, step) in text[start..end].split(';').enumerate() {
                at += step.len();
                out.push((at, (want.get(j) == Some(&step)) as u8 as f64));
                at += 1;
            }
        }
        None => out.push((text.find("<answer>").unwrap_or(text.len()), 0.0)),
    }
    out.push((text.len(), (!truncated && verify(problem, text)) as u8 as f64));
    Some(out)
}

/// The index of the token in which each byte offset of the decoded text falls: the first token
/// whose prefix decodes to at least that many bytes. Prefixes are decoded whole (a token decoded
/// alone may read differently: a leading-space marker dropped, half a multi-byte character), by
/// binary search, so a long completion costs a few decodes per offset, not one per token.
pub fn token_of_offsets(tok: &dyn Tokenizer, tokens: &[u32], offsets: &[usize]) -> Vec<usize> {
    let end_of = |i: usize| tok.decode(&tokens[..=i]).len();
    offsets
        .iter()
        .map(|&o| {
            let (mut lo, mut hi) = (0, tokens.len());
            while lo < hi {
                let mid = (lo + hi) / 2;
                if end_of(mid) >= o {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo.min(tokens.len().saturating_sub(1))
        })
        .collect()
}

/// The tensors one loss chunk needs, all `[n, len - 1]` over a packed batch.
#[derive(Debug, Clone)]
pub struct LossInputs {
    /// Current policy log-probs (differentiable).
    pub logprobs: Tensor,
    /// Sampling policy log-probs (constants).
    pub old: Tensor,
    /// Reference log-probs (constants), when beta > 0.
    pub reference: Option<Tensor>,
    pub advantages: Tensor,
    /// Aggregation weight of each token: 0 off the completion, else the loss type's normaliser.
    pub weights: Tensor,
}

/// Token-weighted statistics of a loss chunk (sums; divide by `tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    pub tokens: f64,
    /// Tokens with rho < 1 - eps and A < 0 (the clip binds from below).
    pub clip_low: f64,
    /// Tokens with rho > 1 + eps_high and A > 0.
    pub clip_high: f64,
    pub kl: f64,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.tokens += o.tokens;
        self.clip_low += o.clip_low;
        self.clip_high += o.clip_high;
        self.kl += o.kl;
    }
}

/// `sum(weights * (-min(rho A, clip(rho) A) + beta k3))`, with its statistics.
pub fn grpo_loss(inp: &LossInputs, eps_low: f32, eps_high: f32, beta: f32) -> Result<(Tensor, LossStats)> {
    let log_ratio = inp.logprobs.sub(&inp.old)?.clamp(-20.0, 20.0)?;
    let ratio = log_ratio.exp()?;
    let a = &inp.advantages;
    let unclipped = ratio.mul(a)?;
    let clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)?.mul(a)?;
    // -min(u, c) = max(-u, -c).
    let mut per_token = unclipped.neg()?.maximum(&clipped.neg()?)?;
    let mut kl_values = None;
    if beta > 0.0 {
        let r = inp.reference.as_ref().ok_or_else(|| Error::Rl("beta > 0 needs reference log-probs".into()))?;
        // k3 = exp(ref - l) - (ref - l) - 1 >= 0, clamped as verl does: the log-ratio to
        // [-20, 20] and k3 to at most 10 (one token far from the reference cannot swamp the
        // policy term).
        let d = r.sub(&inp.logprobs)?.clamp(-20.0, 20.0)?;
        let k3 = d.exp()?.sub(&d)?.add_scalar(-1.0)?.clamp(-10.0, 10.0)?;
        kl_values = Some(k3.detach().to_vec_f32()?);
        per_token = per_token.add(&k3.mul_scalar(beta)?)?;
    }
    let loss = per_token.mul(&inp.weights)?.sum_all()?;

    let (w, r, adv) = (inp.weights.to_vec_f32()?, ratio.detach().to_vec_f32()?, a.to_vec_f32()?);
    let mut stats = LossStats::default();
    for i in (0..w.len()).filter(|&i| w[i] != 0.0) {
        stats.tokens += 1.0;
        stats.clip_low += (r[i] < 1.0 - eps_low && adv[i] < 0.0) as u8 as f64;
        stats.clip_high += (r[i] > 1.0 + eps_high && adv[i] > 0.0) as u8 as f64;
        if let Some(k) = &kl_values {
            stats.kl += k[i] as f64;
        }
    }
    Ok((loss, stats))
}

/// Per-token aggregation weights of one micro-batch (rows `rows` of `all`, the optimizer step's
/// batch). `active[i]` is false for completions left out of the loss.
pub fn aggregation_weights(
    loss_type: LossType,
    batch: &PackedBatch,
    rows: std::ops::Range<usize>,
    active: &[bool],
    all_lengths: &[usize],
    n_micro: usize,
    max_new_tokens: usize,
) -> Result<Tensor> {
    let n_step = all_lengths.len() as f64;
    let step_tokens: f64 = all_lengths.iter().zip(active).filter(|(_, &a)| a).map(|(&l, _)| l as f64).sum();
    let micro_tokens: f64 = rows.clone().filter(|&i| active[i]).map(|i| all_lengths[i] as f64).sum();
    let per_row: Vec<Vec<f32>> = rows
        .clone()
        .enumerate()
        .map(|(j, i)| {
            let len = batch.lengths[j];
            let w = if !active[i] || len == 0 {
                0.0
            } else {
                match loss_type {
                    LossType::Grpo => 1.0 / (n_step * len as f64),
                    LossType::Bnpo => 1.0 / (micro_tokens.max(1.0) * n_micro as f64),
                    LossType::DrGrpo => 1.0 / (n_step * max_new_tokens as f64),
                    LossType::Dapo => 1.0 / step_tokens.max(1.0),
                }
            };
            vec![w as f32; len]
        })
        .collect();
    batch.scatter_tokens(&per_row)
}

/// One scored completion of a rollout, as logged.
#[derive(Debug, Clone)]
pub struct Scored {
    pub rollout: Rollout,
    pub scores: Scores,
    /// Per completion token.
    pub advantages: Vec<f64>,
}

/// Advantages (outcome, or per step with process supervision) of scored rollouts: `scores[i]`
/// is rollout i's, in whole groups of `cfg.group_size`; an error otherwise (a shorter list would
/// silently drop rollouts, a ragged group shift every baseline after it).
pub fn score_rollouts(
    rollouts: Vec<Rollout>,
    scores: Vec<Scores>,
    problems: &[Problem],
    cfg: &GrpoConfig,
    tok: &dyn Tokenizer,
) -> Result<Vec<Scored>> {
    if scores.len() != rollouts.len() || rollouts.len() % cfg.group_size.max(1) != 0 {
        return Err(Error::Rl(format!(
            "{} scores for {} rollouts in groups of {}",
            scores.len(),
            rollouts.len(),
            cfg.group_size
        )));
    }
    if let Some(r) = rollouts.iter().find(|r| r.problem >= problems.len()) {
        return Err(Error::Rl(format!("a rollout of problem {} among {} problems", r.problem, problems.len())));
    }
    let totals: Vec<f64> = scores.iter().map(|s| s.total).collect();
    let outcome = group_advantages(&totals, cfg.group_size, cfg.scale_rewards);
    let mut per_token: Vec<Vec<f64>> = rollouts.iter().zip(&outcome).map(|(r, &a)| vec![a; r.tokens.len()]).collect();
    if cfg.process_supervision {
        // Per group (one problem): its completions' steps as (token index, reward), or `None`
        // where the task has no checkable steps and the outcome advantages stay.
        type GroupSteps = Option<Vec<Vec<(usize, f64)>>>;
        let steps: Vec<GroupSteps> = rollouts
            .chunks(cfg.group_size)
            .map(|group| {
                group
                    .iter()
                    .map(|r| {
                        let s = checkable_steps(&problems[r.problem], &r.text, r.truncated)?;
                        let mut at = token_of_offsets(tok, &r.tokens, &s.iter().map(|x| x.0).collect::<Vec<_>>());
                        // The answer step ends at the last token: EOS, past the decoded text.
                        if let Some(last) = at.last_mut() {
                            *last = r.tokens.len().saturating_sub(1);
                        }
                        Some(at.into_iter().zip(s.iter().map(|x| x.1)).collect())
                    })
                    .collect()
            })
            .collect();
        let all = steps.iter().flatten().flatten().flatten().map(|&(_, r)| r);
        let batch_std = mean_std(all).map_or(0.0, |(_, s)| s);
        for (g, (group, steps)) in rollouts.chunks(cfg.group_size).zip(&steps).enumerate() {
            let Some(steps) = steps else { continue };
            let lengths: Vec<usize> = group.iter().map(|r| r.tokens.len()).collect();
            for (j, adv) in process_advantages(steps, &lengths, cfg.scale_rewards, batch_std).into_iter().enumerate() {
                per_token[g * cfg.group_size + j] = adv;
            }
        }
    }
    Ok(rollouts
        .into_iter()
        .zip(scores)
        .zip(per_token)
        .map(|((rollout, scores), advantages)| Scored { rollout, scores, advantages })
        .collect())
}

/// One optimizer update's share of a step: its rows, and the indices of the micro-batch chunks
/// (see [`split_rows`]) that cover them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Minibatch {
    pub rows: Range<usize>,
    pub chunks: Range<usize>,
}

/// An optimizer step's `rows` split into `minibatches` of whole `unit`s (a GRPO group, a PPO
/// completion; sizes differ by one unit at most), one optimizer update each, and every minibatch into chunks of at most
/// `micro_batch` rows, one forward and backward each: (minibatches, chunks in order).
pub(crate) fn split_rows(
    rows: usize,
    unit: usize,
    minibatches: usize,
    micro_batch: usize,
) -> (Vec<Minibatch>, Vec<Range<usize>>) {
    let units = rows / unit.max(1);
    // As even as whole units allow: the first `units % m` minibatches take one unit more.
    let m = minibatches.clamp(1, units.max(1));
    let start = |i: usize| i * (units / m) + i.min(units % m);
    let (mut mbs, mut chunks) = (Vec::new(), Vec::new());
    for i in 0..m {
        let rows = start(i) * unit..start(i + 1) * unit;
        let first = chunks.len();
        chunks.extend(rows.clone().step_by(micro_batch.max(1)).map(|s| s..(s + micro_batch).min(rows.end)));
        mbs.push(Minibatch { rows, chunks: first..chunks.len() });
    }
    (mbs, chunks)
}

/// Whether all rewards (`totals`, in groups of `group`) of each group are equal: no learning
/// signal.
pub fn zero_std_groups(totals: &[f64], group: usize) -> Vec<bool> {
    totals.chunks(group).map(no_spread).collect()
}

/// Whether the finite values of `values` are all equal (NaN, a reward that does not apply, is
/// left out).
fn no_spread(values: &[f64]) -> bool {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.windows(2).all(|w| w[0] == w[1])
}

/// Which groups (of `group` rollouts) dynamic sampling drops: those whose accuracy is the same
/// for all (DAPO: keep `0 < #correct < G`), read from the set's `accuracy` reward (`names`, in
/// the set's order); a group it does not apply to (R1 stage 4's non-reasoning prompts), or a
/// set without one, by its total reward (a learned reward's spread). Filtering on the total
/// would keep an all-wrong group that varies only in format, to teach format alone, and with
/// length shaping almost every group.
pub fn uninformative_groups(scores: &[Scores], names: &[String], group: usize) -> Vec<bool> {
    let accuracy = names.iter().position(|n| n == "accuracy");
    scores
        .chunks(group.max(1))
        .map(|g| {
            let acc: Option<Vec<f64>> = accuracy.and_then(|i| {
                g.iter().any(|s| s.each[i].is_some()).then(|| g.iter().map(|s| s.each[i].unwrap_or(f64::NAN)).collect())
            });
            no_spread(&acc.unwrap_or_else(|| g.iter().map(|s| s.total).collect()))
        })
        .collect()
}

/// The completion and reward metrics TRL logs, under TRL's names.
pub fn rollout_metrics(scored: &[Scored], rewards: &RewardSet, group: usize) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    let n = scored.len().max(1) as f64;
    let lens: Vec<f64> = scored.iter().map(|s| s.rollout.tokens.len() as f64).collect();
    let term: Vec<f64> =
        scored.iter().filter(|s| !s.rollout.truncated).map(|s| s.rollout.tokens.len() as f64).collect();
    m.insert("completions/mean_length".into(), lens.iter().sum::<f64>() / n);
    m.insert("completions/min_length".into(), lens.iter().copied().fold(f64::INFINITY, f64::min));
    m.insert("completions/max_length".into(), lens.iter().copied().fold(0.0, f64::max));
    m.insert(
        "completions/mean_terminated_length".into(),
        if term.is_empty() { 0.0 } else { term.iter().sum::<f64>() / term.len() as f64 },
    );
    m.insert("completions/clipped_ratio".into(), scored.iter().filter(|s| s.rollout.truncated).count() as f64 / n);
    for (k, name) in rewards.names().iter().enumerate() {
        if let Some((mean, std)) = mean_std(scored.iter().filter_map(|s| s.scores.each[k])) {
            m.insert(format!("rewards/{name}/mean"), mean);
            m.insert(format!("rewards/{name}/std"), std);
        }
    }
    let (mean, std) = mean_std(scored.iter().map(|s| s.scores.total)).unwrap_or((f64::NAN, f64::NAN));
    m.insert("reward".into(), mean);
    // TRL's reward_std: the sample std of the whole batch's rewards (early TRL releases logged
    // the mean within-group std; frac_reward_zero_std tells of the groups).
    m.insert("reward_std".into(), std);
    let totals: Vec<f64> = scored.iter().map(|s| s.scores.total).collect();
    let zero = zero_std_groups(&totals, group);
    m.insert("frac_reward_zero_std".into(), zero.iter().filter(|&&z| z).count() as f64 / zero.len().max(1) as f64);
    m.insert(
        "num_tokens".into(),
        scored.iter().map(|s| (s.rollout.prompt.len() + s.rollout.tokens.len()) as f64).sum(),
    );
    m
}

/// What every RL trainer here shares: the run's settings, step counter, task sampler, rewards,
/// tokenizer, random stream and log files.
pub struct RlRun {
    pub config: GrpoConfig,
    /// Optimizer steps taken (the next step's index).
    pub step: u64,
    pub tasks: TaskSet,
    pub rewards: RewardSet,
    pub tokenizer: Box<dyn Tokenizer>,
    pub rng: Rng,
    /// Prompts to sample from instead of the task generators (a user's JSONL dataset).
    pub pool: Option<Vec<Problem>>,
    /// The rewards were built in code ([`GrpoTrainer::with_rewards`]), not from `config.rewards`
    /// (which then only describes them): a resume must be given them again.
    pub rewards_in_code: bool,
    metrics: Option<File>,
    completions: Option<File>,
}

impl std::fmt::Debug for RlRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RlRun(step {} of {}, {:?}, {:?})", self.step, self.config.steps, self.tasks, self.rewards)
    }
}

impl RlRun {
    /// Validates `config` and builds its tasks and rewards; `salt` separates the random streams
    /// of different algorithms.
    pub fn new(config: GrpoConfig, tokenizer: Box<dyn Tokenizer>, salt: u64) -> Result<Self> {
        let rewards = config.validated_rewards()?;
        Ok(RlRun {
            tasks: TaskSet::parse(&config.tasks)?.with_letters(config.letters)?,
            rewards,
            rng: Rng::new(config.seed ^ salt),
            config,
            step: 0,
            tokenizer,
            pool: None,
            rewards_in_code: false,
            metrics: None,
            completions: None,
        })
    }

    /// Scores with `rewards`, built in code: `config.rewards` then only describes them, and a
    /// checkpoint records that a resume must be given them again.
    pub fn use_rewards(&mut self, rewards: RewardSet) {
        self.config.rewards = rewards.describe();
        self.rewards = rewards;
        self.rewards_in_code = true;
    }

    /// Appends metrics (one JSON object per step) to `metrics` and sample completions to
    /// `completions`.
    pub fn log_to(&mut self, metrics: &Path, completions: &Path) -> Result<()> {
        self.metrics = Some(open_log(metrics)?);
        self.completions = Some(open_log(completions)?);
        Ok(())
    }

    pub fn done(&self) -> bool {
        self.step >= self.config.steps
    }

    /// `n` training problems (from the pool when there is one).
    pub fn sample_problems(&mut self, n: usize) -> Vec<Problem> {
        match &self.pool {
            Some(pool) if !pool.is_empty() => {
                (0..n).map(|_| pool[self.rng.below(pool.len() as u64) as usize].clone()).collect()
            }
            _ => (0..n).map(|_| self.tasks.sample(&mut self.rng, Split::Train)).collect(),
        }
    }

    /// Rewards of each rollout, scored a prompt's group at a time. The rollouts of one problem
    /// must come together, as [`sample_groups`] makes them: a group reward would otherwise see a
    /// part of a group.
    pub fn score(&self, rollouts: &[Rollout], problems: &[Problem]) -> Result<Vec<Scores>> {
        let (mut scores, mut seen) = (Vec::with_capacity(rollouts.len()), HashSet::new());
        for group in rollouts.chunk_by(|a, b| a.problem == b.problem) {
            debug_assert!(
                seen.insert(group[0].problem),
                "the rollouts of problem {} are not together",
                group[0].problem
            );
            let samples: Vec<Sample> = group.iter().map(|r| r.sample(problems)).collect();
            scores.extend(self.rewards.score_group(&samples)?);
        }
        Ok(scores)
    }

    /// Saves the policy with its tokenizer's files, its optimizer state and this run's state
    /// (step, config, random stream) into `dir` (a directory being written by
    /// [`write_dir_atomically`]); `extra` names more models to save in subfolders.
    /// `rl_state.json` is written last.
    pub fn save(
        &self,
        dir: &Path,
        policy: &dyn CausalLm,
        opts: &[(&str, &AdamW)],
        extra: &[(&str, &dyn CausalLm)],
    ) -> Result<()> {
        policy.save_pretrained(dir, SaveDType::F32)?;
        self.tokenizer.save_pretrained(dir)?;
        let mut opt_steps = serde_json::Map::new();
        for (name, opt) in opts {
            let state: BTreeMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
            save_file(&dir.join(format!("{name}.safetensors")), &state, SaveDType::F32)?;
            opt_steps.insert(name.to_string(), json!(opt.steps()));
        }
        for (name, model) in extra {
            model.save_pretrained(&dir.join(name), SaveDType::F32)?;
        }
        let state = json!({
            "step": self.step,
            "optimizer_steps": opt_steps,
            "rng": self.rng.state(),
            "config": self.config,
            "rewards_in_code": self.rewards_in_code,
        });
        Ok(write_json_synced(&dir.join(RL_STATE_FILE), &state)?)
    }

    /// The run state and policy saved by [`RlRun::save`] in `dir` (or `dir.old` after a crash
    /// during the swap), with the directory they came from.
    /// A run whose rewards were built in code needs them again as `rewards` (their description
    /// must be the saved one); any other run takes `None`.
    pub fn load(
        dir: &Path,
        tokenizer: Box<dyn Tokenizer>,
        salt: u64,
        rewards: Option<RewardSet>,
    ) -> Result<(Self, Box<dyn CausalLm>, PathBuf)> {
        let dir = complete_checkpoint(dir, RL_STATE_FILE)?;
        let path = dir.join(RL_STATE_FILE);
        let bad = |what: String| Error::Rl(format!("{}: {what}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut config: GrpoConfig =
            serde_json::from_value(state["config"].clone()).map_err(|e| bad(format!("config: {e}")))?;
        let rng: [u64; 4] = serde_json::from_value(state["rng"].clone()).map_err(|e| bad(format!("rng: {e}")))?;
        let in_code = state["rewards_in_code"].as_bool().unwrap_or(false);
        let saved = config.rewards.clone();
        match (in_code, &rewards) {
            (true, None) => {
                return Err(bad(format!(
                    "its rewards ({saved}) were built in code: resume it with GrpoTrainer::resume_with_rewards"
                )))
            }
            (false, Some(_)) => {
                return Err(bad(format!("its rewards come from its config ({saved}); resume it plainly")))
            }
            (true, Some(r)) if r.describe() != saved => {
                return Err(bad(format!("it trained with the rewards {saved}, not {}", r.describe())))
            }
            // The config's string only describes them: it is parsed for a set that is replaced.
            (true, Some(_)) => config.rewards = "accuracy".into(),
            (false, None) => {}
        }
        let mut run = RlRun::new(config, tokenizer, salt)?;
        if let Some(r) = rewards {
            run.use_rewards(r);
        }
        run.step = state["step"].as_u64().ok_or_else(|| bad("missing `step`".into()))?;
        run.rng = Rng::from_state(rng).map_err(|e| bad(format!("`rng`: {e}")))?;
        let policy = load_pretrained(&dir)?;
        Ok((run, policy, dir))
    }

    /// Restores the optimizer `name` saved by [`RlRun::save`] in `dir` for `params`.
    pub fn load_optimizer(&self, dir: &Path, name: &str, opt: &mut AdamW, params: &ParamStore) -> Result<()> {
        let path = dir.join(RL_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))?;
        let steps = state["optimizer_steps"][name]
            .as_u64()
            .ok_or_else(|| Error::Rl(format!("{}: no optimizer `{name}`", path.display())))?;
        opt.load_state(steps, &load_file(&dir.join(format!("{name}.safetensors")))?, params)?;
        Ok(())
    }

    /// Keeps the log lines of steps before this run's step (an interrupted run may have written
    /// more) and appends from there.
    pub fn resume_logs(&mut self, metrics: &Path, completions: &Path) -> Result<()> {
        truncate_metrics(metrics, self.step)?;
        truncate_metrics(completions, self.step)?;
        self.log_to(metrics, completions)
    }

    /// Writes the step's metrics line and, every `log_completions_every` steps, the first group's
    /// completions (each with its problem's prompt and, in a template, the `input` the policy was
    /// given); then advances the step counter.
    pub fn finish_step(
        &mut self,
        values: BTreeMap<String, f64>,
        problems: &[Problem],
        scored: &[Scored],
    ) -> Result<StepLog> {
        let log = StepLog { step: self.step, values };
        append_line(&mut self.metrics, &log.to_json())?;
        let every = self.config.log_completions_every;
        if every > 0 && self.step % every == 0 {
            let names = self.rewards.names();
            for s in scored.iter().take(self.config.group_size) {
                let mut rewards = serde_json::Map::new();
                for (name, v) in names.iter().zip(&s.scores.each) {
                    rewards.insert(name.clone(), v.map_or(serde_json::Value::Null, |x| json!(x)));
                }
                let prompt = &problems[s.rollout.problem].prompt;
                let mut line = json!({
                    "step": self.step,
                    "prompt": prompt,
                    "completion": s.rollout.text,
                    "rewards": rewards,
                    "reward": if s.scores.total.is_finite() { json!(s.scores.total) } else { serde_json::Value::Null },
                    "advantage": s.advantages.first().copied(),
                    "truncated": s.rollout.truncated,
                });
                // In a template, the text the policy was given too (TRL logs that one).
                if self.config.template != PromptTemplate::Plain {
                    line["input"] = json!(self.config.template.apply(prompt));
                }
                append_line(&mut self.completions, &line)?;
            }
        }
        self.step += 1;
        Ok(log)
    }
}

/// GRPO on a policy, with its reference and optimizer.
pub struct GrpoTrainer {
    pub policy: Box<dyn CausalLm>,
    pub reference: Option<Box<dyn CausalLm>>,
    pub opt: AdamW,
    pub run: RlRun,
}

impl std::fmt::Debug for GrpoTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GrpoTrainer(step {} of {})", self.run.step, self.run.config.steps)
    }
}

/// What one GRPO step measured, under TRL's metric names.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub values: BTreeMap<String, f64>,
}

impl StepLog {
    pub fn get(&self, key: &str) -> f64 {
        self.values.get(key).copied().unwrap_or(f64::NAN)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        v.insert("step".into(), json!(self.step));
        for (k, x) in &self.values {
            v.insert(k.clone(), if x.is_finite() { json!(x) } else { serde_json::Value::Null });
        }
        serde_json::Value::Object(v)
    }
}

pub(crate) fn append_line(file: &mut Option<File>, value: &serde_json::Value) -> Result<()> {
    if let Some(f) = file {
        writeln!(f, "{value}").map_err(|e| Error::Rl(format!("writing a log line: {e}")))?;
    }
    Ok(())
}

pub(crate) fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::Rl(format!("{}: {e}", path.display())))
}

impl GrpoTrainer {
    pub fn new(policy: Box<dyn CausalLm>, config: GrpoConfig, tokenizer: Box<dyn Tokenizer>) -> Result<Self> {
        let reference = if config.beta > 0.0 { Some(policy.duplicate()?) } else { None };
        let opt = AdamW::new(config.adamw())?;
        Ok(GrpoTrainer { policy, reference, opt, run: RlRun::new(config, tokenizer, GRPO_SALT)? })
    }

    /// [`GrpoTrainer::new`] with rewards built in code (a learned reward model, task filters)
    /// instead of the config's `rewards` string.
    pub fn with_rewards(
        policy: Box<dyn CausalLm>,
        config: GrpoConfig,
        tokenizer: Box<dyn Tokenizer>,
        rewards: RewardSet,
    ) -> Result<Self> {
        let mut t = Self::new(policy, config, tokenizer)?;
        t.run.use_rewards(rewards);
        Ok(t)
    }

    pub fn log_to(&mut self, metrics: &Path, completions: &Path) -> Result<()> {
        self.run.log_to(metrics, completions)
    }

    pub fn done(&self) -> bool {
        self.run.done()
    }

    /// The policy and its reference compute in `dtype` (f32, or bf16 on f32 weights) from the
    /// next step on: the rollouts, their log-probs and the update (a resumed run's models load
    /// in f32).
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.policy.set_compute_dtype(dtype);
        self.reference.iter_mut().for_each(|r| r.set_compute_dtype(dtype));
    }

    /// Writes a checkpoint directory atomically: policy, optimizer, reference, run state.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let extra: Vec<(&str, &dyn CausalLm)> = self.reference.iter().map(|r| ("reference", &**r)).collect();
        Ok(write_dir_atomically(dir, |tmp| {
            self.run.save(tmp, &*self.policy, &[("optimizer", &self.opt)], &extra).map_err(to_parallel)
        })?)
    }

    /// Continues from a checkpoint of [`GrpoTrainer::save_checkpoint`], its models on `device`;
    /// the continuation is bit-identical to the uninterrupted run on the same device.
    pub fn resume(dir: &Path, tokenizer: Box<dyn Tokenizer>, device: &Device) -> Result<Self> {
        Self::resume_from(dir, tokenizer, device, None)
    }

    /// [`GrpoTrainer::resume`] of a run started with [`GrpoTrainer::with_rewards`]: `rewards`
    /// are built again in code (their description must be the one saved).
    pub fn resume_with_rewards(
        dir: &Path,
        tokenizer: Box<dyn Tokenizer>,
        device: &Device,
        rewards: RewardSet,
    ) -> Result<Self> {
        Self::resume_from(dir, tokenizer, device, Some(rewards))
    }

    fn resume_from(
        dir: &Path,
        tokenizer: Box<dyn Tokenizer>,
        device: &Device,
        rewards: Option<RewardSet>,
    ) -> Result<Self> {
        let (run, policy, dir) = RlRun::load(dir, tokenizer, GRPO_SALT, rewards)?;
        let policy = moved_to(policy, device)?;
        // The KL anchor the run had, never a copy of the resumed policy (which would quietly
        // move it): a checkpoint without one is an error naming the folder.
        let reference = if run.config.beta > 0.0 {
            Some(moved_to(load_pretrained(&dir.join("reference"))?, device)?)
        } else {
            None
        };
        let mut opt = AdamW::new(run.config.adamw())?;
        run.load_optimizer(&dir, "optimizer", &mut opt, policy.params())?;
        Ok(GrpoTrainer { policy, reference, opt, run })
    }

    /// Samples and scores one step's rollout; with dynamic sampling, groups without accuracy
    /// spread ([`uninformative_groups`]) are dropped and more prompts sampled (at most
    /// `max_resample_rounds` extra rounds). The advantages come from the kept groups only, once,
    /// so that `batch` scaling divides by the std of the batch that trains (DAPO's filter, then
    /// the advantages), not of one round.
    fn collect(&mut self) -> Result<(Vec<Problem>, Vec<Scored>, f64)> {
        let cfg = self.run.config.clone();
        let (mut problems, mut rollouts, mut scores) = (Vec::new(), Vec::new(), Vec::new());
        let mut first_zero_frac = None;
        for round in 0..=if cfg.dynamic_sampling { cfg.max_resample_rounds } else { 0 } {
            let want = cfg.prompts_per_step - problems.len();
            if want == 0 {
                break;
            }
            let batch = self.run.sample_problems(want);
            let sampled =
                sample_groups(&*self.policy, &*self.run.tokenizer, &batch, &cfg.rollout(), &mut self.run.rng)?;
            let scored = self.run.score(&sampled, &batch)?;
            let totals: Vec<f64> = scored.iter().map(|s| s.total).collect();
            let zero = zero_std_groups(&totals, cfg.group_size);
            first_zero_frac.get_or_insert(zero.iter().filter(|&&z| z).count() as f64 / zero.len() as f64);
            let drop = uninformative_groups(&scored, &self.run.rewards.names(), cfg.group_size);
            let last_round = round == cfg.max_resample_rounds;
            let (mut sampled, mut scored) = (sampled.into_iter(), scored.into_iter());
            for (p, drop) in batch.into_iter().zip(drop) {
                let group: Vec<Rollout> = sampled.by_ref().take(cfg.group_size).collect();
                let group_scores: Vec<Scores> = scored.by_ref().take(cfg.group_size).collect();
                if cfg.dynamic_sampling && drop && !last_round {
                    continue;
                }
                let base = problems.len();
                problems.push(p);
                rollouts.extend(group.into_iter().map(|r| Rollout { problem: base, ..r }));
                scores.extend(group_scores);
            }
        }
        let scored = score_rollouts(rollouts, scores, &problems, &cfg, &*self.run.tokenizer)?;
        Ok((problems, scored, first_zero_frac.unwrap_or(0.0)))
    }

    /// One GRPO step: rollout, rewards, advantages, then `num_iterations * minibatches` updates.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = Instant::now();
        let cfg = self.run.config.clone();
        if cfg.ref_sync_every > 0 && self.run.step > 0 && self.run.step % cfg.ref_sync_every == 0 {
            self.reference = Some(self.policy.duplicate()?);
        }
        let (problems, scored, zero_frac_sampled) = self.collect()?;
        let t_sample = t0.elapsed().as_secs_f64();
        let mut values = rollout_metrics(&scored, &self.run.rewards, cfg.group_size);
        values.insert("frac_reward_zero_std".into(), zero_frac_sampled);
        let (tok, device) = (&*self.run.tokenizer, self.policy.device());

        let n = scored.len();
        let active: Vec<bool> = scored.iter().map(|s| !(cfg.mask_truncated && s.rollout.truncated)).collect();
        // Minibatches of whole groups, in micro-batch chunks.
        let (minibatches, chunks) = split_rows(n, cfg.group_size, cfg.minibatches, cfg.micro_batch);
        let off_policy = cfg.num_iterations > 1 || minibatches.len() > 1;

        // Frozen log-probs: the sampling policy's (needed once the policy moves within a step)
        // and the reference's, per micro-batch chunk.
        let packed: Vec<PackedBatch> = chunks
            .iter()
            .map(|c| PackedBatch::new(&scored[c.clone()].iter().map(|s| &s.rollout).collect::<Vec<_>>(), tok, &device))
            .collect::<Result<_>>()?;
        let frozen = |model: &dyn CausalLm, b: &PackedBatch| -> Result<Tensor> {
            no_grad(|| Ok(logprobs(model, b, cfg.temperature)?.detach()))
        };
        let old: Vec<Option<Tensor>> = packed
            .iter()
            .map(|b| if off_policy { frozen(&*self.policy, b).map(Some) } else { Ok(None) })
            .collect::<Result<_>>()?;
        let reference: Vec<Option<Tensor>> = match (&self.reference, cfg.beta > 0.0) {
            (Some(r), true) => packed.iter().map(|b| frozen(&**r, b).map(Some)).collect::<Result<_>>()?,
            _ => vec![None; packed.len()],
        };

        let lr = cfg.schedule().lr(self.run.step);
        let (mut stats, mut loss_sum, mut entropy, mut grad_norm, mut updates) =
            (LossStats::default(), 0.0, 0.0, 0.0, 0);
        for _ in 0..cfg.num_iterations {
            for mb in &minibatches {
                let lengths: Vec<usize> = scored[mb.rows.clone()].iter().map(|s| s.rollout.tokens.len()).collect();
                let mb_active = &active[mb.rows.clone()];
                for c in mb.chunks.clone() {
                    let (rows, batch) = (&chunks[c], &packed[c]);
                    let local = rows.start - mb.rows.start..rows.end - mb.rows.start;
                    let weights = aggregation_weights(
                        cfg.loss_type,
                        batch,
                        local,
                        mb_active,
                        &lengths,
                        mb.chunks.len(),
                        cfg.max_new_tokens,
                    )?;
                    let adv: Vec<Vec<f32>> =
                        scored[rows.clone()].iter().map(|s| s.advantages.iter().map(|&a| a as f32).collect()).collect();
                    let scored_now = score(&*self.policy, batch, cfg.temperature)?;
                    // Over the loss's tokens: a truncated completion `mask_truncated` leaves out is
                    // left out of the entropy too.
                    entropy += scored_now.entropy_over(&weights.to_vec_f32()?).0;
                    let inputs = LossInputs {
                        old: old[c].clone().unwrap_or_else(|| scored_now.logprobs.detach()),
                        logprobs: scored_now.logprobs,
                        reference: reference[c].clone(),
                        advantages: batch.scatter_tokens(&adv)?,
                        weights,
                    };
                    let (loss, s) = grpo_loss(&inputs, cfg.epsilon, cfg.epsilon_high(), cfg.beta)?;
                    let lv = loss.to_scalar()? as f64;
                    if !lv.is_finite() {
                        self.policy.params().zero_grad();
                        return Err(Error::Rl(format!("step {}: the GRPO loss is not finite ({lv})", self.run.step)));
                    }
                    loss.backward()?;
                    loss_sum += lv;
                    stats.add(&s);
                }
                let norm =
                    crate::clip_finite(self.policy.params(), cfg.grad_clip, || format!("step {}", self.run.step))?;
                grad_norm += norm;
                self.opt.step(self.policy.params(), lr)?;
                self.policy.params().zero_grad();
                updates += 1;
            }
        }
        let tokens = stats.tokens.max(1.0);
        values.insert("policy_loss".into(), loss_sum / cfg.num_iterations as f64 / minibatches.len() as f64);
        values.insert("entropy".into(), entropy / tokens);
        values.insert("clip_ratio/low_mean".into(), stats.clip_low / tokens);
        values.insert("clip_ratio/high_mean".into(), stats.clip_high / tokens);
        values.insert("clip_ratio/region_mean".into(), (stats.clip_low + stats.clip_high) / tokens);
        if cfg.beta > 0.0 {
            values.insert("kl".into(), stats.kl / tokens);
        }
        values.insert("grad_norm".into(), grad_norm / updates.max(1) as f64);
        values.insert("learning_rate".into(), lr as f64);
        values.insert("sample_time".into(), t_sample);
        values.insert("step_time".into(), t0.elapsed().as_secs_f64());
        self.run.finish_step(values, &problems, &scored)
    }
}

/// A `[rows, cols]` tensor from rows of equal length.
pub fn grid(rows: &[Vec<f32>]) -> Result<Tensor> {
    let cols = rows.first().map_or(0, |r| r.len());
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, &[rows.len(), cols], &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reward_std_is_the_whole_batchs_sample_std() {
        // Two groups of two: rewards 1, 0 and 1, 1. Mean 0.75, squared deviations sum to 0.75,
        // over n - 1 = 3: a std of 0.5 (the mean within-group std would be 0.354).
        let rewards = RewardSet::parse("accuracy", 8).unwrap();
        let scored: Vec<Scored> = [1.0, 0.0, 1.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, &r)| Scored {
                rollout: Rollout {
                    problem: i / 2,
                    prompt: vec![1],
                    tokens: vec![2, 3],
                    sample_logprobs: vec![0.0; 2],
                    truncated: false,
                    text: String::new(),
                },
                scores: Scores { each: vec![Some(r)], total: r },
                advantages: vec![0.0; 2],
            })
            .collect();
        let m = rollout_metrics(&scored, &rewards, 2);
        assert!((m["reward_std"] - 0.5).abs() < 1e-12, "reward_std {}", m["reward_std"]);
        assert_eq!(m["reward"], 0.75);
        assert_eq!(m["frac_reward_zero_std"], 0.5);
    }

    #[test]
    fn rows_split_into_minibatches_of_whole_units_then_micro_batch_chunks() {
        // Two groups of four in two minibatches, chunks of at most three rows.
        let mb = |rows: Range<usize>, chunks: Range<usize>| Minibatch { rows, chunks };
        let (mbs, chunks) = split_rows(8, 4, 2, 3);
        assert_eq!(mbs, [mb(0..4, 0..2), mb(4..8, 2..4)]);
        assert_eq!(chunks, [0..3, 3..4, 4..7, 7..8]);
        // Nine single completions in two minibatches: 5 + 4; one chunk each.
        assert_eq!(split_rows(9, 1, 2, 64), (vec![mb(0..5, 0..1), mb(5..9, 1..2)], vec![0..5, 5..9]));
        // Three groups in two minibatches: two groups, then one.
        assert_eq!(split_rows(6, 2, 2, 64).0, [mb(0..4, 0..1), mb(4..6, 1..2)]);
        // Five prompts in four minibatches: four updates (2 + 1 + 1 + 1), as asked.
        let sizes: Vec<usize> = split_rows(20, 4, 4, 64).0.iter().map(|m| m.rows.len() / 4).collect();
        assert_eq!(sizes, [2, 1, 1, 1]);
    }

    #[test]
    fn dynamic_sampling_scales_by_the_std_of_the_kept_batch() {
        use whale_parallel::model::config::DeepSeekV3Config;
        use whale_parallel::model::tokenizer::CharTokenizer;
        use whale_parallel::model::DeepSeekV3;
        // Seed 11's first round has one group of four without reward spread: it is dropped, a
        // second round samples a replacement, and the kept batch mixes both rounds. (Without an
        // accuracy reward the filter reads the total: an untrained model solves nothing.)
        let cfg = GrpoConfig {
            prompts_per_step: 4,
            group_size: 4,
            max_new_tokens: 8,
            dynamic_sampling: true,
            max_resample_rounds: 2,
            scale_rewards: ScaleRewards::Batch,
            rewards: "format:0.5,overlong,language".into(),
            tasks: "add:1".into(),
            seed: 11,
            ..GrpoConfig::default()
        };
        let model = DeepSeekV3::new(DeepSeekV3Config::tiny(), 10).unwrap();
        let mut t = GrpoTrainer::new(Box::new(model), cfg, Box::new(CharTokenizer::new())).unwrap();
        let (problems, scored, first_round_zero) = t.collect().unwrap();
        assert_eq!(first_round_zero, 0.25, "the first round drops one group");
        assert_eq!(problems.len(), 4);
        assert!(scored.iter().enumerate().all(|(i, s)| s.rollout.problem == i / 4), "renumbered in order");
        let totals: Vec<f64> = scored.iter().map(|s| s.scores.total).collect();
        assert!(zero_std_groups(&totals, 4).iter().all(|&z| !z), "every kept group has spread");
        let want = group_advantages(&totals, 4, ScaleRewards::Batch);
        for (s, want) in scored.iter().zip(want) {
            assert!(s.advantages.iter().all(|&a| a == want), "{:?} vs {want}", s.advantages);
        }
    }

    #[test]
    fn dynamic_sampling_drops_groups_by_accuracy_not_by_the_total() {
        let names: Vec<String> = ["format", "accuracy"].map(String::from).to_vec();
        let sc = |format: f64, acc: f64| Scores { each: vec![Some(format), Some(acc)], total: 0.1 * format + acc };
        let scores = [
            // All wrong, spread in format only: no accuracy signal, dropped.
            sc(1.0, 0.0),
            sc(0.0, 0.0),
            // One right: kept.
            sc(1.0, 1.0),
            sc(1.0, 0.0),
            // All right: dropped.
            sc(0.0, 1.0),
            sc(1.0, 1.0),
        ];
        assert_eq!(uninformative_groups(&scores, &names, 2), [true, false, true]);
        let totals: Vec<f64> = scores.iter().map(|s| s.total).collect();
        assert_eq!(zero_std_groups(&totals, 2), [false, false, false], "the total has spread everywhere");
        // Without an accuracy reward, the total decides.
        assert_eq!(uninformative_groups(&scores, &names[..1], 2), [false, false, false]);
        let flat = [sc(1.0, 0.0), sc(1.0, 0.0)];
        assert_eq!(uninformative_groups(&flat, &names[..1], 2), [true]);
        // A group accuracy does not apply to (R1 stage 4's non-reasoning prompts, scored by a
        // learned reward) is judged by its total.
        let na = |total: f64| Scores { each: vec![Some(1.0), None], total };
        assert_eq!(uninformative_groups(&[na(0.3), na(0.7), na(0.5), na(0.5)], &names, 2), [false, true]);
    }
}
