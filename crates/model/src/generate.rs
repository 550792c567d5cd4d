//! Generation: prefill then token-by-token decode with a per-layer cache (MLA's `naive` per-head
//! K/V or `absorb` latent, spec 1.5), greedy or temperature / top-k / top-p sampling,
//! per-sequence stop tokens and a length limit.
//!
//! Prompts of different lengths are decoded in separate groups of equal length, so no sequence
//! ever sees padding and a prompt decodes the same alone or in any batch.

use std::collections::BTreeMap;

use std::path::Path;

use whale_tensor::{no_grad, Device, ParamStore, Rng, Tensor};

use crate::checkpoint::SaveDType;

use crate::deepseek_v3::DeepSeekV3;
pub use crate::mla::{CacheMode, LayerCache};
use crate::{Error, Result};

/// Refuses a cached forward while gradients are recorded: the cache holds past keys and values
/// as data, so a gradient would silently stop there. Decoding runs under `no_grad`.
pub(crate) fn decoding_only(op: &str) -> Result<()> {
    if whale_tensor::is_grad_enabled() {
        return Err(Error::Model(format!(
            "{op}: a decode cache is not differentiated through; run it under no_grad (train with the full forward)"
        )));
    }
    Ok(())
}

/// Every layer's cached tokens, in one [`CacheMode`].
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    pub mode: CacheMode,
    pub layers: Vec<Option<LayerCache>>,
}

impl KvCache {
    /// Drops every cached position from `len` on (a rejected speculative token).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for l in self.layers.iter_mut().flatten() {
            l.truncate(len)?;
        }
        Ok(())
    }

    /// Makes an empty cache (of any layer count, as `KvCache::default()`) one of `n_layers`; a
    /// cache holding positions of another model's layer count is an error, not silently reset.
    pub fn fit(&mut self, n_layers: usize) -> Result<()> {
        if self.layers.len() == n_layers {
            return Ok(());
        }
        if self.layers.iter().any(Option::is_some) {
            return Err(Error::Model(format!(
                "a cache of {} layers holding {} positions, given to a model of {n_layers} layers",
                self.layers.len(),
                self.len()
            )));
        }
        *self = KvCache::with_mode(n_layers, self.mode);
        Ok(())
    }

    /// An empty naive cache.
    pub fn new(n_layers: usize) -> Self {
        Self::with_mode(n_layers, CacheMode::Naive)
    }

    pub fn with_mode(n_layers: usize, mode: CacheMode) -> Self {
        KvCache { mode, layers: vec![None; n_layers] }
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, LayerCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the tokens scoring at least the k-th highest (ties kept, as HF does); 0 is off.
    pub top_k: Option<usize>,
    /// Keep the most probable tokens until their mass reaches p, measured on what top-k kept.
    pub top_p: Option<f32>,
    pub max_new_tokens: usize,
    /// Generation of a sequence stops after any of these tokens (which is kept).
    pub stop_tokens: Vec<u32>,
    /// What the decode cache keeps (the tokens do not depend on it beyond float rounding).
    pub cache: CacheMode,
    /// Only ids below this are generated (`None`: every row of the logits): the tokenizer's
    /// vocabulary, where the model's embedding table is padded past it. Padding ids decode to
    /// nothing a tokenizer reads back, so a completion holding one cannot be trained on.
    pub vocab_limit: Option<usize>,
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize, stop_tokens: Vec<u32>) -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            max_new_tokens,
            stop_tokens,
            cache: CacheMode::Naive,
            vocab_limit: None,
        }
    }

    pub fn sampled(temperature: f32, max_new_tokens: usize, stop_tokens: Vec<u32>) -> Self {
        SamplingConfig { temperature, ..SamplingConfig::greedy(max_new_tokens, stop_tokens) }
    }

    /// The same settings, generating only ids `tok` has (see [`SamplingConfig::vocab_limit`]).
    pub fn limited_to(self, tok: &dyn crate::tokenizer::Tokenizer) -> Self {
        SamplingConfig { vocab_limit: Some(tok.vocab_size()), ..self }
    }

    /// The logits of the ids that may be generated (the first `vocab_limit`).
    pub(crate) fn allowed<'a>(&self, logits: &'a [f32]) -> &'a [f32] {
        self.vocab_limit.map_or(logits, |n| &logits[..n.min(logits.len())])
    }
}

/// Keys of generation_config.json that change HF's tokens away from their defaults, and are not
/// applied here: each with the value that leaves the tokens alone (`None`: only null, absent or
/// an empty list does), and whether it acts only when sampling (HF's greedy search ignores it).
const UNAPPLIED_GENERATION_KEYS: [(&str, Option<f64>, bool); 22] = [
    ("repetition_penalty", Some(1.0), false),
    ("num_beams", Some(1.0), false),
    ("no_repeat_ngram_size", Some(0.0), false),
    ("min_new_tokens", Some(0.0), false),
    ("min_length", Some(0.0), false),
    ("min_p", Some(0.0), true),
    ("typical_p", Some(1.0), true),
    ("epsilon_cutoff", Some(0.0), true),
    ("eta_cutoff", Some(0.0), true),
    ("bad_words_ids", None, false),
    ("suppress_tokens", None, false),
    ("begin_suppress_tokens", None, false),
    ("forced_bos_token_id", None, false),
    ("forced_eos_token_id", None, false),
    ("forced_decoder_ids", None, false),
    ("penalty_alpha", Some(0.0), false),
    ("sequence_bias", None, false),
    ("guidance_scale", Some(1.0), false),
    ("encoder_repetition_penalty", Some(1.0), false),
    ("num_beam_groups", Some(1.0), false),
    ("diversity_penalty", Some(0.0), false),
    ("watermarking_config", None, false),
];

impl SamplingConfig {
    /// What HF's `generate` decodes with given no settings: the checkpoint's
    /// generation_config.json. With `do_sample` true it samples at its `temperature` with its
    /// `top_k` and `top_p` (HF's defaults 1.0, 50 and 1.0 for the keys it lacks; a null top_k is
    /// off); otherwise, without the file too, greedily. A `temperature` given turns sampling on
    /// at it, with the file's cuts (where HF would keep a `do_sample: false`). Also returns the
    /// keys the file sets that would change HF's tokens and are not applied here (a repetition
    /// penalty, say), as `key value`, so a caller can say so.
    pub fn from_generation_config(
        dir: &Path,
        max_new_tokens: usize,
        stop_tokens: Vec<u32>,
        temperature: Option<f32>,
    ) -> Result<(SamplingConfig, Vec<String>)> {
        const FILE: &str = "generation_config.json";
        let g = crate::tokenizer::json_of(dir, FILE)?;
        let bad = |key: &str, why: String| Error::file(dir.join(FILE), format!("{key}: {why}"));
        let number = |key: &str, default: f64| -> Result<f64> {
            match &g[key] {
                serde_json::Value::Null => Ok(default),
                v => v.as_f64().ok_or_else(|| bad(key, format!("{v} is not a number"))),
            }
        };
        let do_sample = match &g["do_sample"] {
            serde_json::Value::Null => false,
            v => v.as_bool().ok_or_else(|| bad("do_sample", format!("{v} is not true or false")))?,
        };
        let mut cfg = SamplingConfig::greedy(max_new_tokens, stop_tokens);
        if do_sample || temperature.is_some() {
            let temperature = match temperature {
                Some(t) => t as f64,
                None => number("temperature", 1.0)?,
            };
            if !(temperature > 0.0 && temperature.is_finite()) {
                return Err(bad("temperature", format!("{temperature} must be positive to sample")));
            }
            // A null top_k is off (HF adds the warper only for a set, non-zero one); a missing one
            // is HF's default, 50.
            let top_k =
                if g.get("top_k").is_some_and(serde_json::Value::is_null) { 0.0 } else { number("top_k", 50.0)? };
            if top_k < 0.0 || top_k.fract() != 0.0 {
                return Err(bad("top_k", format!("{top_k} is not a count")));
            }
            let top_p = number("top_p", 1.0)?;
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(bad("top_p", format!("{top_p} is not in (0, 1]")));
            }
            cfg.temperature = temperature as f32;
            cfg.top_k = Some(top_k as usize).filter(|&k| k > 0);
            cfg.top_p = Some(top_p as f32).filter(|&p| p < 1.0);
        }
        let sampling = cfg.temperature > 0.0;
        let unapplied = UNAPPLIED_GENERATION_KEYS
            .iter()
            .filter(|(key, neutral, sampling_only)| {
                let v = &g[*key];
                let empty = v.is_null() || v.as_array().is_some_and(Vec::is_empty);
                !empty && (neutral.is_none() || v.as_f64() != *neutral) && (sampling || !sampling_only)
            })
            .map(|(key, ..)| format!("{key} {}", g[*key]))
            .collect();
        Ok((cfg, unapplied))
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, up to and including the stop token.
    pub tokens: Vec<u32>,
    /// Log-probability of each new token under the sampling distribution (temperature, top-k and
    /// top-p applied); greedy decoding gives the log-softmax of the logits (temperature 1).
    pub logprobs: Vec<f32>,
    /// Hit `max_new_tokens` without a stop token.
    pub truncated: bool,
}

impl SamplingConfig {
    /// Refuses settings that would otherwise sample silently from something else: a temperature
    /// that is negative or not finite, a top-p outside (0, 1] (HF's warpers refuse both).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Model(format!(
                "sampling: temperature {} must be 0 (greedy) or positive",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            return Err(Error::Model(format!("sampling: top_p {p} must be in (0, 1]")));
        }
        if self.vocab_limit == Some(0) {
            return Err(Error::Model("sampling: a vocab_limit of 0 leaves no token".into()));
        }
        Ok(())
    }
}

/// The scaled logits of one row as f64, refused when a logit is NaN or +inf or none is finite
/// (an overflowed forward): sampling from them would pick an arbitrary token.
fn scaled_logits(logits: &[f32], temperature: f64) -> Result<Vec<f64>> {
    if let Some(i) = logits.iter().position(|l| l.is_nan() || *l == f32::INFINITY) {
        return Err(Error::Model(format!("sampling: the logit of token {i} is {}", logits[i])));
    }
    if !logits.iter().any(|l| l.is_finite()) {
        return Err(Error::Model("sampling: no token has a finite logit".into()));
    }
    Ok(logits.iter().map(|&l| l as f64 / temperature).collect())
}

/// log-sum-exp of finite-maximum `x`.
fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + x.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}

/// The argmax of one row of logits (the first of equal maxima, as `torch.argmax`) and its
/// log-probability; an error for NaN or +inf logits.
pub fn greedy_token(logits: &[f32]) -> Result<(u32, f32)> {
    let scaled = scaled_logits(logits, 1.0)?;
    let mut best = 0;
    for (i, &x) in scaled.iter().enumerate() {
        if x > scaled[best] {
            best = i;
        }
    }
    Ok((best as u32, (scaled[best] - log_sum_exp(&scaled)) as f32))
}

/// Picks a token from `logits` (one row), below `cfg.vocab_limit`. Returns (token, log-prob under
/// the sampling distribution, or for greedy the log-softmax, both over the ids allowed); an error
/// for NaN or +inf logits or settings [`SamplingConfig::validate`] refuses.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut Rng) -> Result<(u32, f32)> {
    cfg.validate()?;
    if cfg.temperature == 0.0 {
        return greedy_token(cfg.allowed(logits));
    }
    Ok(Warped::new(logits, cfg)?.draw(rng))
}

/// The distribution temperature sampling draws from for one row of logits: the ids below
/// `cfg.vocab_limit` that top-k and then top-p keep (HF's order of the warpers), in descending
/// probability, each with its softmax probability over all allowed ids; renormalised over the
/// kept ones by `total`.
pub(crate) struct Warped {
    ids: Vec<usize>,
    probs: Vec<f64>,
    total: f64,
    /// Each allowed id's renormalised probability (0 where dropped): a draft's check reads it
    /// per id, so over a 129K vocabulary a search would be quadratic.
    by_id: Vec<f64>,
}

impl Warped {
    /// `cfg` samples (temperature > 0) and has been validated.
    pub(crate) fn new(logits: &[f32], cfg: &SamplingConfig) -> Result<Warped> {
        let scaled = scaled_logits(cfg.allowed(logits), cfg.temperature as f64)?;
        let lse = log_sum_exp(&scaled);
        let mut order: Vec<usize> = (0..scaled.len()).collect();
        order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
        // The probability mass top-k leaves (1 without it): top-p measures against it.
        let mut kept_mass = 1.0;
        if let Some(k) = cfg.top_k.filter(|&k| k > 0 && k < order.len()) {
            // Every token scoring at least the k-th (HF's TopKLogitsWarper keeps ties); 0 is off.
            let kth = scaled[order[k - 1]];
            order.truncate(order.iter().take_while(|&&i| scaled[i] >= kth).count().max(1));
            kept_mass = order.iter().map(|&i| (scaled[i] - lse).exp()).sum();
        }
        if let Some(p) = cfg.top_p {
            let mut acc = 0.0;
            let mut keep = 0;
            for &i in &order {
                acc += (scaled[i] - lse).exp() / kept_mass;
                keep += 1;
                if acc >= p as f64 {
                    break;
                }
            }
            order.truncate(keep.max(1));
        }
        // Tokens whose probability underflows to 0 cannot be drawn (the first, the most
        // probable, never does); without them the fall-through of a draw is a token that can.
        let probs: Vec<f64> = order.iter().map(|&i| (scaled[i] - lse).exp()).take_while(|&p| p > 0.0).collect();
        order.truncate(probs.len());
        let total: f64 = probs.iter().sum();
        let mut by_id = vec![0.0; scaled.len()];
        for (&i, &p) in order.iter().zip(&probs) {
            by_id[i] = p / total;
        }
        Ok(Warped { ids: order, probs, total, by_id })
    }

    /// The probability of drawing `id` (0 for an id top-k or top-p dropped, or not allowed).
    pub(crate) fn prob(&self, id: u32) -> f64 {
        self.by_id.get(id as usize).copied().unwrap_or(0.0)
    }

    /// A token and its log-probability.
    pub(crate) fn draw(&self, rng: &mut Rng) -> (u32, f32) {
        let k = pick_weighted(&self.probs, self.total, rng);
        (self.ids[k] as u32, (self.probs[k] / self.total).ln() as f32)
    }
}

/// The index a uniform draw lands on among `weights` (non-negative, summing to `total` > 0, the
/// last positive): the last positive one where rounding runs past the end.
fn pick_weighted(weights: &[f64], total: f64, rng: &mut Rng) -> usize {
    let mut u = rng.uniform_f64() * total;
    for (k, &w) in weights.iter().enumerate() {
        if u < w {
            return k;
        }
        u -= w;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(weights.len() - 1)
}

/// Speculative sampling's check of a draft (Leviathan et al. 2023, Chen et al. 2023): `draft`,
/// drawn from `q`, is kept with probability min(1, p/q); otherwise a token is drawn from
/// max(0, p - q) renormalised. Either way the token returned is distributed exactly as `p`.
/// Returns (token, its log-probability under `p`, whether the draft was kept).
pub(crate) fn verify_draft(p: &Warped, q: &Warped, draft: u32, rng: &mut Rng) -> (u32, f32, bool) {
    let (p_draft, q_draft) = (p.prob(draft), q.prob(draft));
    if rng.uniform_f64() * q_draft < p_draft {
        return (draft, p_draft.ln() as f32, true);
    }
    let residual: Vec<f64> =
        p.ids.iter().zip(&p.probs).map(|(&i, &pi)| (pi / p.total - q.prob(i as u32)).max(0.0)).collect();
    let total: f64 = residual.iter().sum();
    // p == q to the last bit leaves nothing to correct (and a rejection only by rounding).
    let (tok, lp) = if total > 0.0 {
        let k = pick_weighted(&residual, total, rng);
        (p.ids[k] as u32, (p.probs[k] / p.total).ln() as f32)
    } else {
        p.draw(rng)
    };
    (tok, lp, false)
}

impl DeepSeekV3 {
    /// Logits `[batch, s, vocab]` for `ids` (`[batch, s]`) continuing the cached positions.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.forward_cached_hidden(ids, cache)?.1)
    }

    /// [`DeepSeekV3::forward_cached`] that also returns the last decoder layer's hidden states
    /// (before the final norm: what the first MTP module reads), `[batch, s, hidden]`.
    pub fn forward_cached_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<(Tensor, Tensor)> {
        let h = self.cached_trunk(ids, cache)?;
        let logits = self.head_logits(&h)?;
        Ok((h, logits))
    }

    /// [`DeepSeekV3::forward_cached`]'s logits of the last position only, `[batch, 1, vocab]`:
    /// a prompt's prefill (HF's `logits_to_keep = 1`), whose other positions' logits would be
    /// `len` times the memory for nothing.
    pub fn forward_cached_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.head_logits(&last_position(&self.cached_trunk(ids, cache)?)?)
    }

    /// The decoder layers over `ids` continuing `cache`: hidden states before the final norm.
    pub(crate) fn cached_trunk(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        decoding_only("DeepSeekV3::forward_cached")?;
        cache.fit(self.layers.len())?;
        let start = cache.len();
        let positions: Vec<usize> = (start..start + ids.dims()[1]).collect();
        let mut h = self.embed(ids)?;
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            h = layer.forward_cached(&h, &positions, slot, cache.mode)?;
        }
        Ok(h)
    }

    /// f32 logits of hidden states `h` (before the final norm).
    pub(crate) fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(&self.norm.forward(h)?)?.to_dtype(whale_tensor::DType::F32)?)
    }
}

/// The last position of a `[batch, seq, ...]` tensor, `[batch, 1, ...]`.
pub(crate) fn last_position(t: &Tensor) -> Result<Tensor> {
    Ok(t.narrow(1, t.dims()[1].saturating_sub(1), 1)?)
}

/// What generation, RL and fine-tuning need from a causal language model: DeepSeek-V3 and the
/// dense Llama / Qwen2 students both implement it.
pub trait CausalLm: Send + Sync + std::fmt::Debug {
    fn vocab_size(&self) -> usize;
    fn hidden_size(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Every trainable weight.
    fn params(&self) -> &ParamStore;
    /// Next-token logits `[batch, seq, vocab]` (f32) of a full sequence.
    fn logits(&self, ids: &Tensor) -> Result<Tensor>;
    /// Final-norm hidden states `[batch, seq, hidden]` of a full sequence.
    fn hidden_states(&self, ids: &Tensor) -> Result<Tensor>;
    /// Logits for `ids` continuing the cached positions (MLA models honour the cache's mode;
    /// others keep per-head K/V).
    fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// [`CausalLm::forward_cached`]'s logits of the last position only, `[batch, 1, vocab]` (a
    /// prompt's prefill: the models here never compute the other positions' logits).
    fn forward_cached_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        last_position(&self.forward_cached(ids, cache)?)
    }
    /// The training loss for `targets` (`IGNORE_INDEX` skipped) of rows whose first `lengths[b]`
    /// tokens are real and the rest padding: DeepSeek-V3 adds its MTP and balance terms (its MoE
    /// layers count the real tokens only, the prompt's included), a dense model is plain
    /// next-token cross-entropy.
    fn train_loss(&self, ids: &Tensor, targets: &Tensor, lengths: &[usize]) -> Result<Tensor>;
    /// config.json + safetensors in HF layout.
    fn save_pretrained(&self, dir: &Path, dtype: SaveDType) -> Result<()>;
    /// Recomputes these sublayers of every layer in the backward instead of keeping their
    /// activations (the same gradients; see [`crate::nn::Recompute`]). A model without decoder
    /// layers (a scripted test double) has nothing to recompute.
    fn set_recompute(&mut self, _recompute: crate::nn::Recompute) {}
    /// Computes in `dtype` from the next forward on: f32, or bf16 with the weights kept in f32
    /// and rounded where they are used (pretraining's `--precision bf16`); logits stay f32. A
    /// model without decoder layers (a scripted test double) computes in f32 alone.
    fn set_compute_dtype(&mut self, _dtype: whale_tensor::DType) {}
    /// What [`CausalLm::set_compute_dtype`] last set.
    fn compute_dtype(&self) -> whale_tensor::DType {
        whale_tensor::DType::F32
    }
    /// An independent copy (its recompute setting and compute dtype too).
    fn duplicate(&self) -> Result<Box<dyn CausalLm>>;
    /// A copy whose weights live on `device` (forward, backward and AdamW then run there).
    fn to_device(&self, device: &Device) -> Result<Box<dyn CausalLm>>;
    /// Positions the model is built for (config.json's `max_position_embeddings`): generation
    /// refuses longer prompts and stops a continuation there, as DeepSeek-V3's `generate.py` does.
    fn max_positions(&self) -> usize;
    /// Where the weights live: the device of every tensor this model computes.
    fn device(&self) -> Device {
        self.params().iter().next().map_or(Device::Cpu, |(_, p)| p.device())
    }
    /// Total parameters.
    fn param_count(&self) -> usize {
        self.params().num_elements()
    }
    /// The DeepSeek-V3 model, when this is one (MTP speculative decoding needs it).
    fn as_deepseek(&self) -> Option<&DeepSeekV3> {
        None
    }

    /// Continues each prompt (token ids) per `cfg`. Prompt `i` samples from the `i`-th stream
    /// forked from `rng`, so its tokens do not depend on the other prompts in the batch. A
    /// continuation that reaches [`CausalLm::max_positions`] stops there, truncated.
    fn generate(&self, prompts: &[Vec<u32>], cfg: &SamplingConfig, rng: &mut Rng) -> Result<Vec<Generation>> {
        let mut streams: Vec<Rng> = prompts.iter().map(|_| rng.fork()).collect();
        self.generate_with_streams(prompts, cfg, &mut streams)
    }

    /// [`CausalLm::generate`] with one explicit random stream per prompt.
    fn generate_with_streams(
        &self,
        prompts: &[Vec<u32>],
        cfg: &SamplingConfig,
        streams: &mut [Rng],
    ) -> Result<Vec<Generation>> {
        cfg.validate()?;
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::Model(format!("generate: prompt {i} is empty")));
        }
        let max = self.max_positions();
        for (i, p) in prompts.iter().enumerate() {
            new_tokens_allowed(|| format!("prompt {i}"), p.len(), max, 0)?;
        }
        if streams.len() != prompts.len() {
            return Err(Error::Model(format!(
                "generate: {} random streams for {} prompts",
                streams.len(),
                prompts.len()
            )));
        }
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in prompts.iter().enumerate() {
            groups.entry(p.len()).or_default().push(i);
        }
        let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
        no_grad(|| -> Result<()> {
            for (len, members) in groups {
                let budget = new_tokens_allowed(|| "a prompt".into(), len, max, cfg.max_new_tokens)?;
                let gens = generate_group(self, prompts, &members, len, budget, cfg, streams)?;
                for (i, g) in members.into_iter().zip(gens) {
                    out[i] = Some(g);
                }
            }
            Ok(())
        })?;
        Ok(out.into_iter().map(|g| g.expect("every prompt is in a group")).collect())
    }
}

/// How many of `max_new_tokens` a continuation of a `len`-token prompt may have on a model of
/// `max` positions: it stops at the last position, as DeepSeek-V3's `generate.py` does; a prompt
/// that does not fit is an error naming it (`what`).
pub(crate) fn new_tokens_allowed(
    what: impl FnOnce() -> String,
    len: usize,
    max: usize,
    max_new_tokens: usize,
) -> Result<usize> {
    if len > max {
        return Err(Error::Model(format!(
            "generate: {} has {len} tokens, more than the model's {max} positions (max_position_embeddings)",
            what()
        )));
    }
    Ok(max_new_tokens.min(max - len))
}

fn generate_group<M: CausalLm + ?Sized>(
    model: &M,
    prompts: &[Vec<u32>],
    members: &[usize],
    len: usize,
    max_new_tokens: usize,
    cfg: &SamplingConfig,
    streams: &mut [Rng],
) -> Result<Vec<Generation>> {
    let b = members.len();
    let vocab = model.vocab_size();
    let ids: Vec<i64> = members.iter().flat_map(|&i| prompts[i].iter().map(|&t| t as i64)).collect();
    let mut cache = KvCache::with_mode(model.num_layers(), cfg.cache);
    let mut logits = model.forward_cached_last(&Tensor::from_vec(ids, &[b, len], &Device::Cpu)?, &mut cache)?;
    let mut gens: Vec<Generation> = vec![Generation { tokens: vec![], logprobs: vec![], truncated: false }; b];
    let mut done = vec![false; b];
    for step in 0..max_new_tokens {
        let rows = logits.to_vec_f32()?;
        let mut next = Vec::with_capacity(b);
        for (j, &m) in members.iter().enumerate() {
            // A finished sequence samples nothing more (its logits may be anything, its stream
            // stays where it would alone); it feeds its stop token again, whose output is unused.
            if done[j] {
                next.push(*gens[j].tokens.last().expect("a finished sequence has its stop token") as i64);
                continue;
            }
            let (tok, lp) = sample_token(&rows[j * vocab..(j + 1) * vocab], cfg, &mut streams[m])?;
            gens[j].tokens.push(tok);
            gens[j].logprobs.push(lp);
            done[j] = cfg.stop_tokens.contains(&tok);
            next.push(tok as i64);
        }
        if done.iter().all(|&d| d) || step + 1 == max_new_tokens {
            break;
        }
        logits = model.forward_cached(&Tensor::from_vec(next, &[b, 1], &Device::Cpu)?, &mut cache)?;
    }
    for (g, d) in gens.iter_mut().zip(&done) {
        g.truncated = !d;
    }
    Ok(gens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verified_draft_is_distributed_as_the_target_whatever_the_draft_distribution() {
        let p_logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, -3.0];
        let q_logits = [-1.0f32, 0.5, 2.0, 0.0, 1.0, 0.0];
        // Without a cut, and with top-k cutting p and q to different supports (p keeps 0, 1, 2;
        // q keeps 2, 4, 1): the residual must bring back what q never drafts.
        for top_k in [None, Some(3)] {
            let cfg = SamplingConfig { top_k, ..SamplingConfig::sampled(1.0, 1, vec![]) };
            let (p, q) = (Warped::new(&p_logits, &cfg).unwrap(), Warped::new(&q_logits, &cfg).unwrap());
            let n = 200_000;
            let mut rng = Rng::new(5);
            let (mut counts, mut kept) = (vec![0usize; 6], 0);
            for _ in 0..n {
                let draft = q.draw(&mut rng).0;
                let (tok, lp, was_kept) = verify_draft(&p, &q, draft, &mut rng);
                assert_eq!(lp, (p.prob(tok).ln()) as f32);
                assert!(!was_kept || tok == draft);
                counts[tok as usize] += 1;
                kept += was_kept as usize;
            }
            let within = |got: usize, want: f64| {
                let sd = (want * (1.0 - want) / n as f64).sqrt();
                (got as f64 / n as f64 - want).abs() <= 5.0 * sd + 1e-12
            };
            for (t, &c) in counts.iter().enumerate() {
                assert!(within(c, p.prob(t as u32)), "{top_k:?}: token {t}: {c} of {n} vs p {}", p.prob(t as u32));
            }
            // A draft is kept with probability sum_x min(p(x), q(x)).
            let overlap: f64 = (0..6u32).map(|t| p.prob(t).min(q.prob(t))).sum();
            assert!(within(kept, overlap), "{top_k:?}: kept {kept} vs {overlap}");
            assert!(overlap < 0.8, "the test needs p and q apart: {overlap}");
        }
    }
}
