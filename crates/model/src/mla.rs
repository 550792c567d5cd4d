//! Multi-head Latent Attention (spec section 1): low-rank query, a shared KV latent, and a
//! decoupled RoPE key shared by all heads. This is the training path (full causal sequence).

use whale_tensor::{RopeLayout, Tensor};

use crate::config::DeepSeekV3Config;
use crate::nn::{Linear, ParamBuilder, RmsNorm, RotaryEmbedding};
use crate::Result;

/// The query projection: `q_a_proj -> q_a_layernorm -> q_b_proj`, or one `q_proj` when
/// `q_lora_rank` is null.
#[derive(Debug, Clone)]
pub enum QueryProj {
    LowRank { q_a_proj: Linear, q_a_layernorm: RmsNorm, q_b_proj: Linear },
    Full { q_proj: Linear },
}

#[derive(Debug, Clone)]
pub struct MultiHeadLatentAttention {
    pub q: QueryProj,
    /// `[kv_lora_rank + qk_rope_head_dim, hidden]`: the latent c and the shared k_pe.
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    /// `[heads * (nope + v), kv_lora_rank]`, head-major: per head `[k_nope | v]`.
    pub kv_b_proj: Linear,
    /// `[hidden, heads * v]`.
    pub o_proj: Linear,
    pub rotary: RotaryEmbedding,
    pub n_heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v_dim: usize,
    pub kv_lora_rank: usize,
    pub softmax_scale: f32,
}

impl MultiHeadLatentAttention {
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config) -> Result<Self> {
        let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
        let qk = cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                q_a_proj: Linear::new(b, "q_a_proj", d, r)?,
                q_a_layernorm: RmsNorm::new(b, "q_a_layernorm", r, cfg.rms_norm_eps)?,
                q_b_proj: Linear::new(b, "q_b_proj", r, h * qk)?,
            },
            None => QueryProj::Full { q_proj: Linear::new(b, "q_proj", d, h * qk)? },
        };
        let layout = if cfg.rope_interleave { RopeLayout::Interleaved } else { RopeLayout::HalfRotated };
        Ok(MultiHeadLatentAttention {
            q,
            kv_a_proj_with_mqa: Linear::new(b, "kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)?,
            kv_a_layernorm: RmsNorm::new(b, "kv_a_layernorm", cfg.kv_lora_rank, cfg.rms_norm_eps)?,
            kv_b_proj: Linear::new(b, "kv_b_proj", cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))?,
            o_proj: Linear::new(b, "o_proj", h * cfg.v_head_dim, d)?,
            rotary: RotaryEmbedding::new(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref(), layout),
            n_heads: h,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            v_dim: cfg.v_head_dim,
            kv_lora_rank: cfg.kv_lora_rank,
            softmax_scale: cfg.softmax_scale() as f32,
        })
    }

    /// Per-head queries `[batch, seq, heads, nope + rope]` before RoPE.
    pub fn queries(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let q = match &self.q {
            QueryProj::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)?
            }
            QueryProj::Full { q_proj } => q_proj.forward(x)?,
        };
        Ok(q.reshape(&[b, s, self.n_heads, self.nope + self.rope])?)
    }

    /// The normalised latent `c` `[batch, seq, kv_lora_rank]` and the rotated shared key
    /// `k_pe` `[batch, seq, 1, rope]`: exactly what the absorbed cache stores per token.
    pub fn latent(&self, x: &Tensor, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let kv = self.kv_a_proj_with_mqa.forward(x)?;
        let parts = kv.split(&[self.kv_lora_rank, self.rope], 2)?;
        let c = self.kv_a_layernorm.forward(&parts[0])?;
        let k_pe = self.rotary.apply(&parts[1].reshape(&[b, s, 1, self.rope])?, positions)?;
        Ok((c, k_pe))
    }

    /// Causal self-attention over `x`: `[batch, seq, hidden]`, tokens at `positions`.
    pub fn forward(&self, x: &Tensor, positions: &[usize]) -> Result<Tensor> {
        self.forward_cached(x, positions, &mut None)
    }

    /// Attention of the new tokens `x` (at `positions`) over the cached keys/values plus their
    /// own; the cache (`[batch, heads, t, qk]` keys and `[batch, heads, t, v]` values) is
    /// extended with the new ones. With an empty cache this is the training forward.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        positions: &[usize],
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let h = self.n_heads;
        let q = self.queries(x)?;
        let q_parts = q.split(&[self.nope, self.rope], 3)?;
        let q_pe = self.rotary.apply(&q_parts[1].contiguous()?, positions)?;
        let q = Tensor::cat(&[q_parts[0].clone(), q_pe], 3)?;

        let (c, k_pe) = self.latent(x, positions)?;
        let kv = self.kv_b_proj.forward(&c)?.reshape(&[b, s, h, self.nope + self.v_dim])?;
        let kv_parts = kv.split(&[self.nope, self.v_dim], 3)?;
        let k = Tensor::cat(&[kv_parts[0].clone(), k_pe.broadcast_as(&[b, s, h, self.rope])?], 3)?;

        let to_heads = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (mut k, mut v) = (to_heads(&k)?, to_heads(&kv_parts[1])?);
        if let Some((k0, v0)) = cache.as_ref() {
            k = Tensor::cat(&[k0.clone(), k], 2)?;
            v = Tensor::cat(&[v0.clone(), v], 2)?;
        }
        let o = Tensor::scaled_dot_product_attention(&to_heads(&q)?, &k, &v, self.softmax_scale, true)?;
        *cache = Some((k, v));
        let o = o.transpose(1, 2)?.reshape(&[b, s, h * self.v_dim])?;
        self.o_proj.forward(&o)
    }
}
