//! Building blocks shared by the DeepSeek-V3 and dense models: linear layers, RMSNorm, SwiGLU MLP,
//! rotary tables, and the builder that creates (or loads) named parameters.

mod builder;
mod rope;

pub use builder::{ParamBuilder, WeightSource};
pub use rope::RotaryEmbedding;

use whale_tensor::Tensor;

use crate::Result;

/// `w` in the compute dtype of `x` (a differentiable cast; a no-op when they agree).
pub fn in_dtype_of(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(if w.dtype() == x.dtype() { w.clone() } else { w.to_dtype(x.dtype())? })
}

/// `y = x @ W^T` with `W`: `[out, in]` (HF layout, no bias).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
}

impl Linear {
    pub fn new(b: &mut ParamBuilder<'_>, name: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Linear { weight: b.weight(&format!("{name}.weight"), &[out_dim, in_dim])? })
    }

    /// `x`: `[..., in]` -> `[..., out]`, computed in `x`'s dtype (the f32 master weight is cast,
    /// and its gradient flows back to it in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&in_dtype_of(&self.weight, x)?.t()?)?)
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
}
