//! Building blocks shared by the DeepSeek-V3 and dense models: linear layers, RMSNorm, SwiGLU MLP,
//! rotary tables, and the builder that creates (or loads) named parameters.

mod builder;
mod rope;

pub use builder::{ParamBuilder, WeightSource};
pub use rope::RotaryEmbedding;

use whale_tensor::fp8::{Fp8Recipe, ScaleFormat, BLOCK};
use whale_tensor::Tensor;

use crate::Result;

/// Which sublayers of a decoder layer keep no activations for the backward and compute them again
/// there ([`whale_tensor::checkpoint()`]): memory traded for a second forward of the sublayer, the
/// gradients the same bits. DeepSeek-V3 recomputes its RMSNorms and MLA up-projections (TR
/// 3.2.3); `attention` recomputes the whole attention sublayer, which holds them, and
/// `attention` + `mlp` on a dense layer is HF's gradient checkpointing of the layer. Only
/// training forwards recompute; decoding with a cache never records a graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recompute {
    /// The attention sublayer: its RMSNorm, projections (MLA's down- and up-projections and
    /// latent norms), RoPE and the attention itself; only its input and output are kept.
    pub attention: bool,
    /// The SwiGLU MLPs: a dense layer's whole feed-forward sublayer (its RMSNorm with it); in an
    /// MoE layer every routed and shared expert (DeepSeek-V3 recomputes its MoE SwiGLU outputs),
    /// while the RMSNorm, the router (its expert loads and balance loss are taken once) and
    /// expert parallelism's all-to-alls keep theirs.
    pub mlp: bool,
}

/// `none`, or a comma-separated list of `attention` and `mlp` (the text of a flag or a settings
/// key); anything else is an error naming the text.
impl std::str::FromStr for Recompute {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Recompute, String> {
        let mut r = Recompute::default();
        if text.trim() == "none" {
            return Ok(r);
        }
        for part in text.split(',') {
            match part.trim() {
                "attention" => r.attention = true,
                "mlp" => r.mlp = true,
                _ => {
                    return Err(format!("recompute `{text}`: expected none, or attention and/or mlp (comma-separated)"))
                }
            }
        }
        Ok(r)
    }
}

/// As its text (`"attention,mlp"`), the form the CLI's settings and a trainer's config take.
impl serde::Serialize for Recompute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Recompute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match (self.attention, self.mlp) {
            (false, false) => "none",
            (true, false) => "attention",
            (false, true) => "mlp",
            (true, true) => "attention,mlp",
        })
    }
}

/// `sublayer(x)`, through a [`whale_tensor::checkpoint()`] named `what` when `recompute` is set.
pub(crate) fn recomputed<F>(recompute: bool, what: &'static str, x: &Tensor, sublayer: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if recompute {
        whale_tensor::checkpoint(what, &[x], move |x: &[Tensor]| sublayer(&x[0]))
    } else {
        sublayer(x)
    }
}

/// `w` in the compute dtype of `x` (a differentiable cast; a no-op when they agree).
pub fn in_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(if w.dtype() == x.dtype() { w.clone() } else { w.to_dtype(x.dtype())? })
}

/// `y = x @ W^T` with `W`: `[out, in]` (HF layout, no bias).
///
/// Three ways to run: the plain GEMM in `x`'s dtype; FP8 training (`fp8` set: the three GEMMs on
/// online-quantized operands, the f32 master weight updated as usual); or FP8 inference on a
/// weight stored in FP8 (`weight` holds E4M3 codes and `weight_scale_inv` their 128x128-block
/// scales, as loaded from a DeepSeek-V3 FP8 checkpoint; not trained).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    /// `[ceil(out / 128), ceil(in / 128)]`: the dequantisation multipliers of an FP8 `weight`.
    pub weight_scale_inv: Option<Tensor>,
    /// Run the GEMMs in FP8 with this recipe.
    pub fp8: Option<Fp8Recipe>,
}

impl Linear {
    pub fn new(b: &mut ParamBuilder<'_>, name: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        let (weight, weight_scale_inv) = b.linear_weight(&format!("{name}.weight"), &[out_dim, in_dim])?;
        Ok(Linear { weight, weight_scale_inv, fp8: None })
    }

    /// A layer over an existing weight (a head tied to the embedding).
    pub fn tied(weight: Tensor) -> Self {
        Linear { weight, weight_scale_inv: None, fp8: None }
    }

    /// `x`: `[..., in]` -> `[..., out]`, computed in `x`'s dtype (the f32 master weight is cast,
    /// and its gradient flows back to it in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(scale_inv) = &self.weight_scale_inv {
            return Ok(x.fp8_linear_quantized(&self.weight, scale_inv, &self.fp8.unwrap_or_default())?);
        }
        if let Some(recipe) = &self.fp8 {
            return Ok(x.fp8_linear(&self.weight, recipe)?);
        }
        Ok(x.matmul(&in_dtype_of(&self.weight, x)?.t()?)?)
    }

    /// The weight as floats (`[out, in]`): dequantised when stored in FP8.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight_scale_inv {
            Some(s) => Ok(Tensor::dequantize_fp8(&self.weight, s, (BLOCK, BLOCK))?),
            None => Ok(self.weight.clone()),
        }
    }

    /// Whether this layer runs its GEMMs in FP8 (trained in FP8, or stored in FP8).
    pub fn is_fp8(&self) -> bool {
        self.fp8.is_some() || self.weight_scale_inv.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(b: &mut ParamBuilder<'_>, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: b.ones(&format!("{name}.weight"), &[dim])?, eps: eps as f32 })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.rms_norm(&in_dtype_of(&self.weight, x)?, self.eps)?)
    }
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (dense MLP, each expert, shared experts).
#[derive(Debug, Clone)]
pub struct SwiGluMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// When every projection trains in FP8: keep the SwiGLU's inputs in FP8 and recompute its
    /// output in the backward, as DeepSeek-V3's MoE experts do ([`Tensor::fp8_swiglu_mlp`]).
    pub fp8_swiglu_cache: bool,
}

impl SwiGluMlp {
    pub fn new(b: &mut ParamBuilder<'_>, dim: usize, hidden: usize) -> Result<Self> {
        Ok(SwiGluMlp {
            gate_proj: Linear::new(b, "gate_proj", dim, hidden)?,
            up_proj: Linear::new(b, "up_proj", dim, hidden)?,
            down_proj: Linear::new(b, "down_proj", hidden, dim)?,
            fp8_swiglu_cache: false,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_pair(x, x)
    }

    /// `down(silu(gate(x_gate)) * up(x_up))`: [`SwiGluMlp::forward`] given its input once for
    /// each projection. A recomputed MLP whose input has other readers takes it twice, so that
    /// its two input gradients join theirs one at a time, as when the MLP is kept: summed first
    /// inside the region, they would round differently.
    pub fn forward_pair(&self, x_gate: &Tensor, x_up: &Tensor) -> Result<Tensor> {
        let trained = |l: &Linear| l.fp8.filter(|_| l.weight_scale_inv.is_none());
        if let (true, Some(g), Some(u), Some(d)) =
            (self.fp8_swiglu_cache, trained(&self.gate_proj), trained(&self.up_proj), trained(&self.down_proj))
        {
            let weights = [&self.gate_proj.weight, &self.up_proj.weight, &self.down_proj.weight];
            return Ok(Tensor::fp8_swiglu_mlp((x_gate, x_up), weights, [g, u, d])?);
        }
        let h = Tensor::swiglu(&self.gate_proj.forward(x_gate)?, &self.up_proj.forward(x_up)?)?;
        self.down_proj.forward(&h)
    }

    pub fn set_fp8(&mut self, recipe: Option<Fp8Recipe>) {
        for l in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            l.fp8 = recipe;
        }
    }

    pub fn is_fp8(&self) -> bool {
        self.gate_proj.is_fp8() || self.up_proj.is_fp8() || self.down_proj.is_fp8()
    }

    /// A copy (the same weights) whose gate and up projections, if FP8 (trained, or stored),
    /// read their input in tiles with `scales`: UE8M0 for the input an FP8 dispatch delivered,
    /// whose codes their Fprop then takes exactly as they arrived (DeepSeek-V3's expert GEMMs
    /// consume the dispatched FP8; Wgrad re-tiles the input along the tokens, with those scales).
    pub fn with_input_scales(&self, scales: ScaleFormat) -> SwiGluMlp {
        let mut copy = self.clone();
        for l in [&mut copy.gate_proj, &mut copy.up_proj] {
            if l.is_fp8() {
                l.fp8 = Some(Fp8Recipe { input_scales: scales, ..l.fp8.unwrap_or_default() });
            }
        }
        copy
    }
}
