//! Multi-Token Prediction (spec section 3): module k combines the previous depth's hidden state
//! at position i with the embedding of token i+k, runs one decoder block over the shortened
//! sequence, and predicts token i+k+1 through the shared head.

use whale_tensor::Tensor;

use crate::block::{DecoderLayer, LayerOutput};
use crate::config::DeepSeekV3Config;
use crate::mla::{CacheMode, LayerCache};
use crate::moe::RealTokens;
use crate::nn::{Linear, ParamBuilder, RmsNorm};
use crate::Result;

#[derive(Debug, Clone)]
pub struct MtpModule {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    /// `[hidden, 2 * hidden]` over `[enorm(embedding) ; hnorm(hidden)]` (embedding first, the
    /// order the released checkpoint's `eh_proj` expects; spec 3.1).
    pub eh_proj: Linear,
    pub block: DecoderLayer,
    /// `shared_head.norm`, applied before the shared output head.
    pub head_norm: RmsNorm,
}

impl MtpModule {
    /// The module stored as decoder layer `index` (= num_hidden_layers + k - 1).
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config, index: usize) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(MtpModule {
            enorm: RmsNorm::new(b, "enorm", d, cfg.rms_norm_eps)?,
            hnorm: RmsNorm::new(b, "hnorm", d, cfg.rms_norm_eps)?,
            eh_proj: Linear::new(b, "eh_proj", 2 * d, d)?,
            block: DecoderLayer::new(b, cfg, index)?,
            head_norm: RmsNorm::new(&mut b.sub("shared_head"), "norm", d, cfg.rms_norm_eps)?,
        })
    }

    /// `prev`: `[batch, s, hidden]` (depth k-1's hidden at positions 0..s), `emb`: `[batch, s,
    /// hidden]` (embeddings of tokens k..k+s). Returns the block output (depth k's hidden) and
    /// the normalised state for the head.
    pub fn forward(&self, prev: &Tensor, emb: &Tensor, real: Option<&RealTokens>) -> Result<(LayerOutput, Tensor)> {
        let x = Tensor::cat(&[self.enorm.forward(emb)?, self.hnorm.forward(prev)?], 2)?;
        let x = self.eh_proj.forward(&x)?;
        let positions: Vec<usize> = (0..x.dims()[1]).collect();
        let out = self.block.forward(&x, &positions, real)?;
        let normed = self.head_norm.forward(&out.hidden)?;
        Ok((out, normed))
    }

    /// [`MtpModule::forward`] for new positions continuing `cache` (speculative drafting):
    /// returns the block output and the normalised state for the head.
    pub fn forward_cached(
        &self,
        prev: &Tensor,
        emb: &Tensor,
        cache: &mut Option<LayerCache>,
        mode: CacheMode,
    ) -> Result<(Tensor, Tensor)> {
        let x = Tensor::cat(&[self.enorm.forward(emb)?, self.hnorm.forward(prev)?], 2)?;
        let x = self.eh_proj.forward(&x)?;
        let start = cache.as_ref().map_or(0, LayerCache::len);
        let positions: Vec<usize> = (start..start + x.dims()[1]).collect();
        let hidden = self.block.forward_cached(&x, &positions, cache, mode)?;
        let normed = self.head_norm.forward(&hidden)?;
        Ok((hidden, normed))
    }
}
