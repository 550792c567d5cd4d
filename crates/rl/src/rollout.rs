//! Rollouts: G sampled completions per prompt, and the per-token log-probabilities of a batch of
//! rollouts under a policy (the quantity every RL loss here is written in).
//!
//! Sampling goes through the model's cached generation (prefill, then one token per step). Scoring
//! re-runs the whole `prompt + completion` in one training forward; at the sampling temperature it
//! gives the log-probs the sampler saw (spec/rl.md section 7: logits are divided by the sampling
//! temperature in both places).

use serde::{Deserialize, Serialize};
use whale_parallel::model::generate::{CacheMode, SamplingConfig};
use whale_parallel::model::tensor::{no_grad, Device, Rng, Tensor};
use whale_parallel::model::tokenizer::Tokenizer;
use whale_parallel::model::CausalLm;

use crate::rewards::Sample;
use crate::tasks::Problem;
use crate::{Error, Result};

/// How completions are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Completions per prompt (G).
    pub group_size: usize,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub max_new_tokens: usize,
    /// The decode cache (the absorbed latent by default: the smallest).
    pub cache: CacheMode,
    /// What each problem's prompt is written in before it is encoded.
    pub template: PromptTemplate,
}

/// The text a problem's prompt is sampled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptTemplate {
    /// The prompt as it is: what whale's own models are pretrained to continue with
    /// `<think>...</think><answer>...</answer>`.
    #[default]
    Plain,
    /// DeepSeek-R1-Zero's template (the R1 paper's Table 1), for a base model that has never seen
    /// the tags: a preamble asking for the reasoning in `<think>` and the answer in `<answer>`,
    /// then `User: {prompt}. Assistant:`.
    R1,
}

impl PromptTemplate {
    /// `plain` or `r1`; an error names the choices.
    pub fn parse(name: &str) -> Result<Self> {
        [PromptTemplate::Plain, PromptTemplate::R1]
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::Rl(format!("prompt template `{name}`: plain or r1")))
    }

    /// The name settings and flags spell it with.
    pub fn name(&self) -> &'static str {
        match self {
            PromptTemplate::Plain => "plain",
            PromptTemplate::R1 => "r1",
        }
    }

    /// `prompt` written in the template.
    pub fn apply<'a>(&self, prompt: &'a str) -> std::borrow::Cow<'a, str> {
        match self {
            PromptTemplate::Plain => prompt.into(),
            PromptTemplate::R1 => format!("{R1_ZERO_PREAMBLE} User: {prompt}. Assistant:").into(),
        }
    }
}

impl std::fmt::Display for PromptTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The R1 paper's Table 1, before `User: prompt. Assistant:`.
pub const R1_ZERO_PREAMBLE: &str = "A conversation between User and Assistant. The user asks a question, and the \
     Assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the \
     user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> \
     </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.";

impl RolloutConfig {
    /// These settings for `tok`'s completions: its stop tokens, and only ids it has.
    fn sampling(&self, tok: &dyn Tokenizer) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            cache: self.cache,
            ..SamplingConfig::greedy(self.max_new_tokens, tok.stop_ids())
        }
        .limited_to(tok)
    }
}

/// The ids of a prompt as every stage reads it (sampling, scoring, SFT, evaluation): with the
/// special tokens HF's `tokenizer(prompt)` adds (a Llama-style BOS; none for the character
/// tokenizer). An error names the prompt.
pub fn prompt_ids(tok: &dyn Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    tok.encode_prompt(prompt).map_err(|e| Error::Rl(format!("prompt {prompt:?}: {e}")))
}

/// The ids of every problem's prompt ([`prompt_ids`]).
pub fn problem_prompts(tok: &dyn Tokenizer, problems: &[Problem]) -> Result<Vec<Vec<u32>>> {
    templated_prompts(tok, problems, PromptTemplate::Plain)
}

/// The ids of every problem's prompt written in `template` ([`prompt_ids`]).
pub fn templated_prompts(tok: &dyn Tokenizer, problems: &[Problem], template: PromptTemplate) -> Result<Vec<Vec<u32>>> {
    problems.iter().map(|p| prompt_ids(tok, &template.apply(&p.prompt))).collect()
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Index of its problem in the slice given to [`sample_groups`].
    pub problem: usize,
    pub prompt: Vec<u32>,
    /// Completion tokens, up to and including EOS when it was produced.
    pub tokens: Vec<u32>,
    /// Log-probs the sampler drew each token with (temperature applied).
    pub sample_logprobs: Vec<f32>,
    /// Stopped by the length limit, not by EOS.
    pub truncated: bool,
    /// The decoded completion without its EOS ([`crate::eval::completion_text`]).
    pub text: String,
}

impl Rollout {
    /// The completion as rewards see it, `problems` being the slice it was sampled for.
    pub fn sample<'a>(&'a self, problems: &'a [Problem]) -> Sample<'a> {
        Sample {
            problem: &problems[self.problem],
            text: &self.text,
            tokens: self.tokens.len(),
            truncated: self.truncated,
        }
    }
}

/// `cfg.group_size` completions for each problem, grouped: rollouts `i*G .. (i+1)*G` belong to
/// problem `i`.
pub fn sample_groups(
    model: &dyn CausalLm,
    tok: &dyn Tokenizer,
    problems: &[Problem],
    cfg: &RolloutConfig,
    rng: &mut Rng,
) -> Result<Vec<Rollout>> {
    if cfg.group_size == 0 {
        return Err(Error::Rl("rollout group_size must be at least 1".into()));
    }
    let prompts = templated_prompts(tok, problems, cfg.template)?;
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), cfg.group_size)).collect();
    let gens = model.generate(&repeated, &cfg.sampling(tok), rng)?;
    Ok(gens
        .into_iter()
        .zip(repeated)
        .enumerate()
        .map(|(i, (g, prompt))| Rollout {
            problem: i / cfg.group_size,
            text: crate::eval::completion_text(tok, &g),
            prompt,
            tokens: g.tokens,
            sample_logprobs: g.logprobs,
            truncated: g.truncated,
        })
        .collect())
}

/// Rollouts packed into one right-padded batch: row `i` is `prompt_i ++ completion_i ++ pad`.
/// Column `t` of the `[n, len - 1]` per-token tensors is the prediction of token `t + 1`.
#[derive(Debug, Clone)]
pub struct PackedBatch {
    /// `[n, len]` token ids (host data, as every index tensor is).
    pub ids: Tensor,
    /// Where the per-token value tensors (mask, advantages, weights) are made: the scoring
    /// model's device.
    pub device: Device,
    pub n: usize,
    pub len: usize,
    /// `[n * (len - 1)]`: 1 where column `t` predicts a completion token of row `i`.
    pub mask: Vec<f32>,
    /// Completion tokens per row.
    pub lengths: Vec<usize>,
    /// First column of each row's completion (`prompt_len - 1`).
    pub starts: Vec<usize>,
    /// The tokenizer's ids (one past its largest): the policy is scored over these, as it
    /// samples over them ([`SamplingConfig::limited_to`]), whatever padding rows the model's
    /// embedding table has.
    pub vocab: usize,
}

impl PackedBatch {
    /// Packs `rollouts`, completions of `tok`'s (padded with its pad id); the value tensors it
    /// makes live on `device`.
    pub fn new(rollouts: &[&Rollout], tok: &dyn Tokenizer, device: &Device) -> Result<Self> {
        let pad = tok.pad_id();
        let n = rollouts.len();
        if n == 0 {
            return Err(Error::Rl("cannot pack an empty batch of rollouts".into()));
        }
        if let Some(r) = rollouts.iter().find(|r| r.prompt.is_empty()) {
            return Err(Error::Rl(format!("rollout of problem {} has an empty prompt", r.problem)));
        }
        let len = rollouts.iter().map(|r| r.prompt.len() + r.tokens.len()).max().expect("n > 0").max(2);
        let cols = len - 1;
        let (mut ids, mut mask) = (Vec::with_capacity(n * len), vec![0.0f32; n * cols]);
        let (mut lengths, mut starts) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (i, r) in rollouts.iter().enumerate() {
            let row: Vec<i64> = r.prompt.iter().chain(&r.tokens).map(|&t| t as i64).collect();
            ids.extend(&row);
            ids.extend(std::iter::repeat_n(pad as i64, len - row.len()));
            let start = r.prompt.len() - 1;
            mask[i * cols + start..i * cols + start + r.tokens.len()].fill(1.0);
            lengths.push(r.tokens.len());
            starts.push(start);
        }
        let ids = Tensor::from_vec(ids, &[n, len], &Device::Cpu)?;
        Ok(PackedBatch { ids, device: *device, n, len, mask, lengths, starts, vocab: tok.vocab_size() })
    }

    /// The `[n, len - 1]` mask as a tensor.
    pub fn mask_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.mask, &[self.n, self.len - 1], &self.device)?)
    }

    /// Spreads one value per completion token (row `i`: `lengths[i]` values) onto the
    /// `[n, len - 1]` grid, zeros elsewhere.
    pub fn scatter_tokens(&self, per_row: &[Vec<f32>]) -> Result<Tensor> {
        let cols = self.len - 1;
        let mut out = vec![0.0f32; self.n * cols];
        for (i, vals) in per_row.iter().enumerate() {
            if vals.len() != self.lengths[i] {
                return Err(Error::Rl(format!("row {i}: {} values for {} tokens", vals.len(), self.lengths[i])));
            }
            out[i * cols + self.starts[i]..i * cols + self.starts[i] + vals.len()].copy_from_slice(vals);
        }
        Ok(Tensor::from_vec(out, &[self.n, cols], &self.device)?)
    }

    /// The completion part of row `i` of a `[n, len - 1]` grid of values.
    pub fn row_tokens<'a>(&self, grid: &'a [f32], i: usize) -> &'a [f32] {
        let at = i * (self.len - 1) + self.starts[i];
        &grid[at..at + self.lengths[i]]
    }
}

/// What scoring a batch gives.
#[derive(Debug, Clone)]
pub struct Scored {
    /// `[n, len - 1]` log-probs of each next token at the temperature (differentiable when
    /// gradients are on); meaningful where the batch mask is 1.
    pub logprobs: Tensor,
    /// `[n * (len - 1)]`: the entropy (nats) of each next-token distribution on the batch mask,
    /// 0 off it.
    pub entropies: Vec<f64>,
}

impl Scored {
    /// The sum and count of the entropies at the positions `keep` (`[n * (len - 1)]`) marks
    /// non-zero: the batch mask, or a loss's weights, so that a logged entropy covers the tokens
    /// the loss trains on (TRL's `entropy`), not completions the loss leaves out.
    pub fn entropy_over(&self, keep: &[f32]) -> (f64, f64) {
        self.entropies.iter().zip(keep).filter(|(_, &k)| k != 0.0).fold((0.0, 0.0), |(s, c), (&e, _)| (s + e, c + 1.0))
    }
}

/// `[n, len - 1, vocab]` next-token log-probs of the packed rows under `model`, logits divided by
/// `temperature`, over the tokenizer's ids (`batch.vocab`: the distribution the policy samples
/// from).
fn next_token_log_softmax(model: &dyn CausalLm, batch: &PackedBatch, temperature: f32) -> Result<Tensor> {
    if temperature <= 0.0 {
        return Err(Error::Rl(format!("scoring temperature must be positive, got {temperature}")));
    }
    let cols = batch.len - 1;
    let mut logits = model.logits(&batch.ids.narrow(1, 0, cols)?)?;
    let rows = logits.dims()[2];
    if batch.vocab > rows {
        return Err(Error::Rl(format!("the tokenizer has {} ids, the model's logits only {rows}", batch.vocab)));
    }
    if batch.vocab < rows {
        logits = logits.narrow(2, 0, batch.vocab)?;
    }
    // Divided, as TRL's `logits / temperature` (a product with a rounded 1 / T is one ulp off
    // about a quarter of the time); the logits are f32.
    let t = Tensor::full(temperature, &[], logits.dtype(), &logits.device())?;
    Ok(logits.div(&t)?.log_softmax_last_dim()?)
}

/// The log-prob of each packed row's next token in `logp` (`[n, len - 1, vocab]`).
fn next_token_logprobs(batch: &PackedBatch, logp: &Tensor) -> Result<Tensor> {
    let next = batch.ids.narrow(1, 1, batch.len - 1)?.contiguous()?.unsqueeze(2)?;
    Ok(logp.gather(2, &next)?.squeeze(2)?)
}

/// `[n, len - 1]` log-probs of each packed token under `model` (logits divided by
/// `temperature`), without entropies: the frozen passes (old policy, reference).
pub fn logprobs(model: &dyn CausalLm, batch: &PackedBatch, temperature: f32) -> Result<Tensor> {
    next_token_logprobs(batch, &next_token_log_softmax(model, batch, temperature)?)
}

/// Per-token log-probs of the packed rollouts under `model` with logits divided by `temperature`,
/// and the entropy of each next-token distribution (computed where the logits are: only
/// `[n, len - 1]` values come to the host).
pub fn score(model: &dyn CausalLm, batch: &PackedBatch, temperature: f32) -> Result<Scored> {
    let logp = next_token_log_softmax(model, batch, temperature)?;
    let logprobs = next_token_logprobs(batch, &logp)?;
    let lp = logp.detach();
    let per_position = no_grad(|| lp.exp()?.mul(&lp)?.sum(2)?.neg()?.to_vec_f32())?;
    let entropies = batch.mask[..batch.n * (batch.len - 1)]
        .iter()
        .zip(per_position)
        .map(|(&m, e)| if m > 0.0 { e as f64 } else { 0.0 })
        .collect();
    Ok(Scored { logprobs, entropies })
}
