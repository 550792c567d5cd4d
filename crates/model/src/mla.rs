//! Multi-head Latent Attention (spec section 1): low-rank query, a shared KV latent, and a
//! decoupled RoPE key shared by all heads. The training path attends over full per-head keys and
//! values; inference caches either those (`naive`) or only the latent and the rotated shared key
//! with W_UK absorbed into the query and W_UV into the output (`absorb`, spec 1.5).

use std::sync::Arc;
use whale_tensor::fp8::Fp8Recipe;

use whale_tensor::{RopeLayout, Tensor};

use crate::config::DeepSeekV3Config;
use crate::nn::{Linear, ParamBuilder, RmsNorm, RotaryEmbedding};
use crate::Result;

/// The epsilon of the latent RMSNorms (`q_a_layernorm`, `kv_a_layernorm`): fixed at 1e-6 in
/// DeepSeek's inference code and in HF's DeepseekV3Attention, whatever `rms_norm_eps` says.
const LATENT_NORM_EPS: f64 = 1e-6;

/// The query projection: `q_a_proj -> q_a_layernorm -> q_b_proj`, or one `q_proj` when
/// `q_lora_rank` is null.
#[derive(Debug, Clone)]
pub enum QueryProj {
    LowRank { q_a_proj: Linear, q_a_layernorm: RmsNorm, q_b_proj: Linear },
    Full { q_proj: Linear },
}

/// What an inference cache keeps per token (spec 1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Per-head keys `[.., heads, nope + rope]` and values `[.., heads, v]` (HF's cache).
    #[default]
    Naive,
    /// The normalised latent `c` and the rotated `k_pe`: `kv_lora_rank + rope` per token.
    Absorb,
}

impl CacheMode {
    pub fn parse(s: &str) -> Option<CacheMode> {
        match s {
            "naive" => Some(CacheMode::Naive),
            "absorb" => Some(CacheMode::Absorb),
            _ => None,
        }
    }

    /// Cached elements per token per layer for MLA with `cfg`'s dims.
    pub fn elements_per_token(self, cfg: &DeepSeekV3Config) -> usize {
        match self {
            CacheMode::Naive => cfg.num_attention_heads * (cfg.qk_head_dim() + cfg.v_head_dim),
            CacheMode::Absorb => cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        }
    }
}

/// Cached elements per token per layer of plain multi-head attention with `cfg`'s heads and a
/// head dim of `v_head_dim` for both K and V (spec 1.5's comparison row).
pub fn mha_cache_elements(cfg: &DeepSeekV3Config) -> usize {
    2 * cfg.num_attention_heads * cfg.v_head_dim
}

/// The cached positions of one tensor `[batch, heads, positions, dim]`: the first `len` of a
/// buffer with room for more. A decode step writes its token in place and attention reads the
/// positions where they lie, so a step costs what it adds, not what the cache holds (capacity
/// doubles when full: each position is copied about once on average). Clones share the buffer
/// until one of them appends, which then writes into a copy of its own.
#[derive(Debug, Clone)]
pub struct CacheBuffer {
    buffer: Tensor,
    len: usize,
    /// Held by every clone sharing `buffer`: an append writes in place only when it is alone.
    owners: Arc<()>,
}

impl CacheBuffer {
    /// A cache of `first` (`[batch, heads, s, dim]`, its positions so far); the tensor itself
    /// becomes the buffer (no copy: a training forward never appends).
    pub fn new(first: Tensor) -> Result<Self> {
        let buffer = first.contiguous()?;
        Ok(CacheBuffer { len: buffer.dims()[2], buffer, owners: Arc::new(()) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffer holds before it must grow.
    pub fn capacity(&self) -> usize {
        self.buffer.dims()[2]
    }

    /// The cached positions, a view of the buffer. Positions a [`CacheBuffer::truncate`] drops
    /// are rewritten by later appends, so a view is read before the cache moves on.
    pub fn view(&self) -> Result<Tensor> {
        Ok(self.buffer.narrow(2, 0, self.len)?)
    }

    /// Appends `new` (`[batch, heads, s, dim]`).
    pub fn append(&mut self, new: &Tensor) -> Result<()> {
        let need = self.len + new.dims()[2];
        let shared = Arc::strong_count(&self.owners) > 1;
        if need > self.capacity() || shared {
            let mut dims = self.buffer.dims().to_vec();
            dims[2] = if need > self.capacity() { need.max(2 * self.capacity()) } else { self.capacity() };
            let own = Tensor::zeros(&dims, self.buffer.dtype(), &self.buffer.device())?;
            own.write_window(2, 0, &self.view()?)?;
            (self.buffer, self.owners) = (own, Arc::new(()));
        }
        self.buffer.write_window(2, self.len, new)?;
        self.len = need;
        Ok(())
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// One layer's cached tokens.
#[derive(Debug, Clone)]
pub enum LayerCache {
    /// Keys `[batch, heads, t, nope + rope]` and values `[batch, heads, t, v]`.
    Naive { k: CacheBuffer, v: CacheBuffer },
    /// `[batch, 1, t, kv_lora_rank + rope]`: `[c ; k_pe]`, the one key all heads share (its
    /// first `kv_lora_rank` columns are the shared value).
    Absorb { latent: CacheBuffer },
}

impl LayerCache {
    /// Cached positions.
    pub fn len(&self) -> usize {
        match self {
            LayerCache::Naive { k, .. } => k.len(),
            LayerCache::Absorb { latent } => latent.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            LayerCache::Naive { k, v } => {
                k.truncate(len);
                v.truncate(len);
            }
            LayerCache::Absorb { latent } => latent.truncate(len),
        }
        Ok(())
    }

    /// Per-head keys and values extended by `k`, `v` (this step's, `[batch, heads, s, dim]`):
    /// the cache's views, or `k`, `v` themselves when the cache starts here (a training forward
    /// differentiates through them).
    pub(crate) fn extend_naive(cache: &mut Option<LayerCache>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(LayerCache::Naive { k: kc, v: vc }) = cache {
            kc.append(&k)?;
            vc.append(&v)?;
            return Ok((kc.view()?, vc.view()?));
        }
        *cache = Some(LayerCache::Naive { k: CacheBuffer::new(k.clone())?, v: CacheBuffer::new(v.clone())? });
        Ok((k, v))
    }
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
    /// Runs the projections' GEMMs in FP8 (the attention core stays in the compute dtype).
    pub fn set_fp8(&mut self, recipe: Option<Fp8Recipe>) {
        let q: Vec<&mut Linear> = match &mut self.q {
            QueryProj::LowRank { q_a_proj, q_b_proj, .. } => vec![q_a_proj, q_b_proj],
            QueryProj::Full { q_proj } => vec![q_proj],
        };
        for l in q.into_iter().chain([&mut self.kv_a_proj_with_mqa, &mut self.kv_b_proj, &mut self.o_proj]) {
            l.fp8 = recipe;
        }
    }

    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config) -> Result<Self> {
        let (d, h) = (cfg.hidden_size, cfg.num_attention_heads);
        let qk = cfg.qk_head_dim();
        let q = match cfg.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                q_a_proj: Linear::new(b, "q_a_proj", d, r)?,
                q_a_layernorm: RmsNorm::new(b, "q_a_layernorm", r, LATENT_NORM_EPS)?,
                q_b_proj: Linear::new(b, "q_b_proj", r, h * qk)?,
            },
            None => QueryProj::Full { q_proj: Linear::new(b, "q_proj", d, h * qk)? },
        };
        let layout = if cfg.rope_interleave { RopeLayout::Interleaved } else { RopeLayout::HalfRotated };
        Ok(MultiHeadLatentAttention {
            q,
            kv_a_proj_with_mqa: Linear::new(b, "kv_a_proj_with_mqa", d, cfg.kv_lora_rank + cfg.qk_rope_head_dim)?,
            kv_a_layernorm: RmsNorm::new(b, "kv_a_layernorm", cfg.kv_lora_rank, LATENT_NORM_EPS)?,
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
        self.forward_cached(x, positions, &mut None, CacheMode::Naive)
    }

    /// Queries with RoPE applied to their rope part: `[batch, seq, heads, nope + rope]`.
    fn rotated_queries(&self, x: &Tensor, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let q = self.queries(x)?;
        let q_parts = q.split(&[self.nope, self.rope], 3)?;
        let q_pe = self.rotary.apply(&q_parts[1].contiguous()?, positions)?;
        Ok((q_parts[0].clone(), q_pe))
    }

    /// Attention of the new tokens `x` (at `positions`) over the cached tokens plus their own,
    /// extending `cache`. An empty cache is filled in `mode`; a filled one keeps its own mode.
    /// With no cache this is the training forward.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        positions: &[usize],
        cache: &mut Option<LayerCache>,
        mode: CacheMode,
    ) -> Result<Tensor> {
        let absorb = match cache {
            Some(LayerCache::Absorb { .. }) => true,
            Some(LayerCache::Naive { .. }) => false,
            None => mode == CacheMode::Absorb,
        };
        if absorb {
            self.forward_absorbed(x, positions, cache)
        } else {
            self.forward_naive(x, positions, cache)
        }
    }

    fn forward_naive(&self, x: &Tensor, positions: &[usize], cache: &mut Option<LayerCache>) -> Result<Tensor> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let h = self.n_heads;
        let (q_nope, q_pe) = self.rotated_queries(x, positions)?;
        let q = Tensor::cat(&[q_nope, q_pe], 3)?;

        let (c, k_pe) = self.latent(x, positions)?;
        let kv = self.kv_b_proj.forward(&c)?.reshape(&[b, s, h, self.nope + self.v_dim])?;
        let kv_parts = kv.split(&[self.nope, self.v_dim], 3)?;
        let k = Tensor::cat(&[kv_parts[0].clone(), k_pe.broadcast_as(&[b, s, h, self.rope])?], 3)?;

        let to_heads = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (k, v) = LayerCache::extend_naive(cache, to_heads(&k)?, to_heads(&kv_parts[1])?)?;
        let o = Tensor::scaled_dot_product_attention(&to_heads(&q)?, &k, &v, self.softmax_scale, true)?;
        let o = o.transpose(1, 2)?.reshape(&[b, s, h * self.v_dim])?;
        self.o_proj.forward(&o)
    }

    /// `kv_b_proj` viewed per head: (W_UK `[heads, nope, r]`, W_UV `[heads, v, r]`).
    fn absorbed_weights(&self) -> Result<(Tensor, Tensor)> {
        let r = self.kv_lora_rank;
        let w = self.kv_b_proj.dense_weight()?.reshape(&[self.n_heads, self.nope + self.v_dim, r])?;
        Ok((w.narrow(1, 0, self.nope)?, w.narrow(1, self.nope, self.v_dim)?))
    }

    /// MQA over the latent (spec 1.5): one shared key `[c ; k_pe]` and value `c` for all heads;
    /// W_UK goes into the query, W_UV into the output.
    fn forward_absorbed(&self, x: &Tensor, positions: &[usize], cache: &mut Option<LayerCache>) -> Result<Tensor> {
        let (b, s) = (x.dims()[0], x.dims()[1]);
        let (h, r) = (self.n_heads, self.kv_lora_rank);
        let (w_uk, w_uv) = self.absorbed_weights()?;
        let dtype = x.dtype();
        let (q_nope, q_pe) = self.rotated_queries(x, positions)?;
        // q_lat[h] = q_nope[h] W_UK[h]: [heads, b*s, nope] x [heads, nope, r].
        let q_nope = q_nope.permute(&[2, 0, 1, 3])?.contiguous()?.reshape(&[h, b * s, self.nope])?;
        let q_lat = q_nope.matmul(&w_uk.to_dtype(dtype)?)?.reshape(&[h, b, s, r])?.permute(&[1, 0, 2, 3])?;
        let q = Tensor::cat(&[q_lat, q_pe.transpose(1, 2)?], 3)?.contiguous()?;

        let (c, k_pe) = self.latent(x, positions)?;
        let new = Tensor::cat(&[c.unsqueeze(1)?, k_pe.transpose(1, 2)?], 3)?.contiguous()?;
        let latent = match cache {
            Some(LayerCache::Absorb { latent: l }) => {
                l.append(&new)?;
                l.view()?
            }
            _ => {
                *cache = Some(LayerCache::Absorb { latent: CacheBuffer::new(new.clone())? });
                new
            }
        };
        // The value is the latent's first r columns, read where they lie.
        let value = latent.narrow(3, 0, r)?;
        let o_lat = Tensor::scaled_dot_product_attention(&q, &latent, &value, self.softmax_scale, true)?;
        // o[h] = o_lat[h] W_UV[h]^T: [heads, b*s, r] x [heads, r, v].
        let o_lat = o_lat.permute(&[1, 0, 2, 3])?.contiguous()?.reshape(&[h, b * s, r])?;
        let o = o_lat.matmul(&w_uv.to_dtype(dtype)?.transpose(1, 2)?)?;
        let o = o.reshape(&[h, b, s, self.v_dim])?.permute(&[1, 2, 0, 3])?.contiguous()?.reshape(&[
            b,
            s,
            h * self.v_dim,
        ])?;
        self.o_proj.forward(&o)
    }
}
