//! Global gradient-norm clipping (`torch.nn.utils.clip_grad_norm_` numerics).

use crate::{Device, ParamStore, Result, Tensor};

/// The L2 norm of all gradients together, accumulated in f64 in name order. Parameters without a
/// gradient count as zero. A gradient on a GPU is squared and summed there (in f32), and each
/// GPU's per-tensor sums come back in one read, instead of every gradient crossing to the host.
pub fn grad_norm(params: &ParamStore) -> Result<f64> {
    let mut sq = 0.0f64;
    let mut on_gpus: Vec<(Device, Vec<Tensor>)> = Vec::new();
    for (_, p) in params.iter() {
        let Some(g) = p.grad() else { continue };
        let device = g.device();
        if device.is_cpu() {
            sq += g.to_vec_f32()?.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            continue;
        }
        // In f32 whatever the gradient's dtype (a bf16 square would lose the norm's precision).
        let partial = crate::no_grad(|| g.to_dtype(crate::DType::F32)?.sqr()?.sum_all())?;
        match on_gpus.iter_mut().find(|(d, _)| *d == device) {
            Some((_, sums)) => sums.push(partial),
            None => on_gpus.push((device, vec![partial])),
        }
    }
    for (_, sums) in on_gpus {
        sq += Tensor::stack(&sums, 0)?.to_vec_f32()?.iter().map(|&x| x as f64).sum::<f64>();
    }
    Ok(sq.sqrt())
}

/// Scales all gradients by `max_norm / (norm + 1e-6)` when that is below 1, and returns the norm
/// before clipping. A non-finite norm is returned as is and nothing is scaled: the caller decides
/// whether to skip the step or stop (torch would scale by 0 or NaN). `max_norm` is not NaN and
/// not negative (infinity: no clipping); torch would turn every gradient into NaN.
pub fn clip_grad_norm(params: &ParamStore, max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(crate::Error::invalid("clip_grad_norm", format!("max_norm {max_norm}")));
    }
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
