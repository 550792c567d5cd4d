//! A pre-norm decoder layer: `h += MLA(norm(h))`, then `h += FFN(norm(h))`, where the FFN is a
//! dense SwiGLU MLP in the first `first_k_dense_replace` layers and DeepSeekMoE after.

use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::Tensor;

use crate::config::DeepSeekV3Config;
use crate::mla::{CacheMode, LayerCache, MultiHeadLatentAttention};
use crate::moe::{DeepSeekMoE, RealTokens};
use crate::nn::{recomputed, ParamBuilder, Recompute, RmsNorm, SwiGluMlp};
use crate::Result;

#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(SwiGluMlp),
    Moe(DeepSeekMoE),
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: MultiHeadLatentAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: FeedForward,
    /// The sublayers a training forward recomputes in the backward ([`DecoderLayer::set_recompute`]).
    recompute: Recompute,
}

/// A layer's output and, for MoE layers, its routing statistics.
#[derive(Debug, Clone)]
pub struct LayerOutput {
    pub hidden: Tensor,
    pub load: Option<Vec<usize>>,
    pub aux_loss: Option<Tensor>,
}

impl DecoderLayer {
    /// FP8 GEMMs in the attention projections and the MLP or experts (not the router).
    pub fn set_fp8(&mut self, recipe: Option<Fp8Recipe>) {
        self.self_attn.set_fp8(recipe);
        match &mut self.mlp {
            FeedForward::Dense(mlp) => mlp.set_fp8(recipe),
            FeedForward::Moe(moe) => moe.set_fp8(recipe),
        }
    }

    /// Layer `index` (MTP layers continue the numbering after the main ones).
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config, index: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        let mlp = if cfg.is_moe_layer(index) {
            FeedForward::Moe(DeepSeekMoE::new(&mut b.sub("mlp"), cfg)?)
        } else {
            FeedForward::Dense(SwiGluMlp::new(&mut b.sub("mlp"), d, cfg.intermediate_size)?)
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::new(b, "input_layernorm", d, cfg.rms_norm_eps)?,
            self_attn: MultiHeadLatentAttention::new(&mut b.sub("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::new(b, "post_attention_layernorm", d, cfg.rms_norm_eps)?,
            mlp,
            recompute: Recompute::default(),
        })
    }

    /// `h`: `[batch, seq, hidden]` at `positions`; `real`: the tokens an MoE layer counts in its
    /// load and balance losses (`None`: all).
    pub fn forward(&self, h: &Tensor, positions: &[usize], real: Option<&RealTokens>) -> Result<LayerOutput> {
        let (norm, attn, at) = (self.input_layernorm.clone(), self.self_attn.clone(), positions.to_vec());
        let attention = move |h: &Tensor| attn.forward(&norm.forward(h)?, &at);
        let h = h.add(&recomputed(self.recompute.attention, "attention sublayer", h, attention)?)?;
        Ok(match &self.mlp {
            FeedForward::Dense(mlp) => {
                let (norm, mlp) = (self.post_attention_layernorm.clone(), mlp.clone());
                let ffn = move |h: &Tensor| mlp.forward(&norm.forward(h)?);
                LayerOutput {
                    hidden: h.add(&recomputed(self.recompute.mlp, "MLP sublayer", &h, ffn)?)?,
                    load: None,
                    aux_loss: None,
                }
            }
            FeedForward::Moe(moe) => {
                let out = moe.forward(&self.post_attention_layernorm.forward(&h)?, real)?;
                LayerOutput { hidden: h.add(&out.output)?, load: Some(out.load), aux_loss: out.aux_loss }
            }
        })
    }

    /// Recomputes these sublayers in the backward: the attention sublayer, and the dense MLP or
    /// the MoE layer's experts (its router stays outside, see [`DeepSeekMoE::recompute_experts`]).
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
        if let Some(moe) = self.moe_mut() {
            moe.recompute_experts = recompute.mlp;
        }
    }

    /// What [`DecoderLayer::set_recompute`] last set.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    pub fn moe(&self) -> Option<&DeepSeekMoE> {
        match &self.mlp {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }

    pub fn moe_mut(&mut self) -> Option<&mut DeepSeekMoE> {
        match &mut self.mlp {
            FeedForward::Moe(m) => Some(m),
            FeedForward::Dense(_) => None,
        }
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] over new positions, extending `cache` with their keys/values.
    pub fn forward_cached(
        &self,
        h: &Tensor,
        positions: &[usize],
        cache: &mut Option<LayerCache>,
        mode: CacheMode,
    ) -> Result<Tensor> {
        let a = self.self_attn.forward_cached(&self.input_layernorm.forward(h)?, positions, cache, mode)?;
        let h = h.add(&a)?;
        let x = self.post_attention_layernorm.forward(&h)?;
        let f = match &self.mlp {
            FeedForward::Dense(mlp) => mlp.forward(&x)?,
            FeedForward::Moe(moe) => moe.forward(&x, None)?.output,
        };
        Ok(h.add(&f)?)
    }
}
