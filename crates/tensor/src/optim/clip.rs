//! Global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_` numerics).

use crate::{ParamStore, Result};

/// The L2 norm of all gradients together, accumulated in f64 in name order. Parameters without a
/// gradient count as zero.
pub fn grad_norm(params: &ParamStore) -> Result<f64> {
    let mut sq = 0.0f64;
    for (_, p) in params.iter() {
        if let Some(g) = p.grad() {
            sq += g.to_vec_f32()?.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        }
    }
    Ok(sq.sqrt())
}

/// Scales all gradients by `max_norm / (norm + 1e-6)` when that is below 1, and returns the norm
/// before clipping. A non-finite norm is returned as is and nothing is scaled: the caller decides
/// whether to skip the step or stop.
pub fn clip_grad_norm(params: &ParamStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, p) in params.iter() {
            if let Some(g) = p.grad() {
                p.set_grad(Some(crate::no_grad(|| g.mul_scalar(coef as f32))?))?;
            }
        }
    }
    Ok(norm)
}
