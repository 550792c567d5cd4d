//! Building blocks shared by the DeepSeek-V3 and dense models: linear layers, RMSNorm, SwiGLU MLP,
//! rotary tables, and the builder that creates (or loads) named parameters.

mod builder;
mod rope;

pub use builder::{ParamBuilder, WeightSource};
pub use rope::RotaryEmbedding;

use whale_tensor::fp8::{Fp8Recipe, BLOCK};
use whale_tensor::Tensor;

use crate::Result;

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
}

impl SwiGluMlp {
    pub fn new(b: &mut ParamBuilder<'_>, dim: usize, hidden: usize) -> Result<Self> {
        Ok(SwiGluMlp {
            gate_proj: Linear::new(b, "gate_proj", dim, hidden)?,
            up_proj: Linear::new(b, "up_proj", dim, hidden)?,
            down_proj: Linear::new(b, "down_proj", hidden, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = Tensor::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
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
}
