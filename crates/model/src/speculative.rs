//! Self-speculative decoding with the MTP module (spec 3.3): the first MTP module drafts the
//! token after next from the main model's hidden state, and the main model checks the next token
//! and the draft in one forward of two positions. A kept draft gives two tokens for one main
//! forward; a rejected one has its cache entry dropped.
//!
//! Greedy (temperature 0), a draft is kept when it is the main model's own argmax, so every kept
//! token is the main model's greedy choice given the kept prefix: the output is greedy decoding's,
//! up to float rounding (a forward of two positions may round a logit differently from one of a
//! single position, which could only matter where two logits tie to the last bits).
//!
//! Sampled (temperature > 0, with top-k / top-p), the draft is drawn from the MTP module's
//! distribution q under the same settings, kept with probability min(1, p/q) against the main
//! model's p, and replaced on rejection by a draw from max(0, p - q) renormalised (speculative
//! sampling, Leviathan et al. 2023 and Chen et al. 2023): each token is distributed exactly as
//! plain sampling's, though not the same tokens for a seed, as the draws differ.
//!
//! Invariant between steps (m tokens so far): the main cache holds positions `0..m`; the MTP
//! cache holds the pairs (main hidden at i, token i + 1) for the positions whose pair is known,
//! the rest wait in `pending`; `next` is the main model's pick for position m.

use whale_tensor::{no_grad, DType, Device, Rng, Tensor};

use crate::deepseek_v3::DeepSeekV3;
use crate::generate::{
    greedy_token, new_tokens_allowed, sample_token, verify_draft, Generation, KvCache, LayerCache, SamplingConfig,
    Warped,
};
use crate::{Error, Result};

/// What a speculative decode measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpeculativeStats {
    /// Tokens drafted by the MTP module.
    pub drafted: usize,
    /// Drafts the main model agreed with.
    pub accepted: usize,
    /// Main-model forwards (prefill included).
    pub main_forwards: usize,
    /// Tokens generated.
    pub tokens: usize,
}

impl SpeculativeStats {
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Generated tokens per main-model forward (plain decoding: 1).
    pub fn tokens_per_forward(&self) -> f64 {
        self.tokens as f64 / self.main_forwards.max(1) as f64
    }

    pub fn add(&mut self, o: &SpeculativeStats) {
        self.drafted += o.drafted;
        self.accepted += o.accepted;
        self.main_forwards += o.main_forwards;
        self.tokens += o.tokens;
    }
}

fn ids(tokens: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_vec(tokens.iter().map(|&t| t as i64).collect::<Vec<i64>>(), &[1, tokens.len()], &Device::Cpu)?)
}

impl DeepSeekV3 {
    /// Decodes one prompt, drafting with the first MTP module: greedy for temperature 0, else
    /// speculative sampling (each token distributed as [`CausalLm::generate`]'s, its draws from
    /// `rng`). `cfg`'s length limit, stop tokens, cache and vocabulary limit apply as there.
    ///
    /// [`CausalLm::generate`]: crate::CausalLm::generate
    pub fn generate_speculative(
        &self,
        prompt: &[u32],
        cfg: &SamplingConfig,
        rng: &mut Rng,
    ) -> Result<(Generation, SpeculativeStats)> {
        cfg.validate()?;
        let (max_new_tokens, stop_tokens, mode) = (cfg.max_new_tokens, &cfg.stop_tokens[..], cfg.cache);
        let greedy = cfg.temperature == 0.0;
        let mtp = self.mtp.first().ok_or_else(|| {
            Error::Model("speculative decoding drafts with the MTP module, and this model has none".into())
        })?;
        if prompt.is_empty() {
            return Err(Error::Model("generate: empty prompt".into()));
        }
        // As plain generation: the continuation stops at the last position. A draft is only
        // verified when a token after it may still be kept, so it never sits past that either.
        let max = self.config.max_position_embeddings;
        let max_new_tokens = new_tokens_allowed(|| "the prompt".into(), prompt.len(), max, max_new_tokens)?;
        no_grad(|| {
            let vocab = self.config.vocab_size;
            let n = prompt.len();
            let mut stats = SpeculativeStats::default();
            let mut cache = KvCache::with_mode(self.layers.len(), mode);
            let mut mtp_cache: Option<LayerCache> = None;
            // The prompt's hidden states all feed the MTP module; only the last position's logits
            // are needed.
            let h = self.cached_trunk(&ids(prompt)?, &mut cache)?;
            stats.main_forwards += 1;
            let row = |l: &Tensor, i: usize| -> Result<Vec<f32>> { Ok(l.narrow(1, i, 1)?.to_vec_f32()?) };
            let mut next = sample_token(&row(&self.head_logits(&h.narrow(1, n - 1, 1)?)?, 0)?, cfg, rng)?;
            let mut last_h = h.narrow(1, n - 1, 1)?;
            let mut pending_h = if n > 1 { Some(h.narrow(1, 0, n - 1)?) } else { None };
            let mut pending_tokens = prompt[1..].to_vec();
            let mut gen = Generation { tokens: vec![], logprobs: vec![], truncated: false };
            let emit = |gen: &mut Generation, (tok, lp): (u32, f32)| -> bool {
                gen.tokens.push(tok);
                gen.logprobs.push(lp);
                stop_tokens.contains(&tok) || gen.tokens.len() >= max_new_tokens
            };
            if max_new_tokens == 0 {
                return Ok((Generation { truncated: true, ..gen }, stats));
            }
            loop {
                if emit(&mut gen, next) {
                    break;
                }
                // Draft: the MTP module over the pending pairs and (hidden at m - 1, next).
                pending_tokens.push(next.0);
                let hs = match pending_h.take() {
                    Some(p) => Tensor::cat(&[p, last_h.clone()], 1)?,
                    None => last_h.clone(),
                };
                let emb = self.embed(&ids(&pending_tokens)?)?;
                let (_, normed) = mtp.forward_cached(&hs, &emb, &mut mtp_cache, mode)?;
                pending_tokens.clear();
                let last = normed.narrow(1, normed.dims()[1] - 1, 1)?;
                let draft_logits = self.lm_head.forward(&last)?.to_dtype(DType::F32)?.to_vec_f32()?;
                let q = if greedy { None } else { Some(Warped::new(&draft_logits[..vocab], cfg)?) };
                let draft = match &q {
                    None => greedy_token(cfg.allowed(&draft_logits[..vocab]))?.0,
                    Some(q) => q.draw(rng).0,
                };
                stats.drafted += 1;
                // Verify the next token and the draft in one forward: row 0 is the main model's
                // distribution where the draft stands, row 1 the one after it.
                let (hv, lv) = self.forward_cached_hidden(&ids(&[next.0, draft])?, &mut cache)?;
                stats.main_forwards += 1;
                let (tok, lp, kept) = match &q {
                    None => {
                        let (t, lp) = greedy_token(cfg.allowed(&row(&lv, 0)?))?;
                        (t, lp, t == draft)
                    }
                    Some(q) => verify_draft(&Warped::new(&row(&lv, 0)?, cfg)?, q, draft, rng),
                };
                if kept {
                    stats.accepted += 1;
                    if emit(&mut gen, (tok, lp)) {
                        break;
                    }
                    pending_h = Some(hv.narrow(1, 0, 1)?);
                    pending_tokens.push(draft);
                    last_h = hv.narrow(1, 1, 1)?;
                    next = sample_token(&row(&lv, 1)?, cfg, rng)?;
                } else {
                    cache.truncate(cache.len() - 1)?;
                    last_h = hv.narrow(1, 0, 1)?;
                    next = (tok, lp);
                }
            }
            gen.truncated = !gen.tokens.last().is_some_and(|t| stop_tokens.contains(t));
            stats.tokens = gen.tokens.len();
            Ok((gen, stats))
        })
    }
}
