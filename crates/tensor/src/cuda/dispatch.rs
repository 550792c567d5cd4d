//! MoE token permutation on the GPU (`ops/dispatch.rs` holds the ops and their backward): each
//! function returns a fresh CUDA tensor without history. The plan's indices go to the GPU once
//! per MoE call and stay cached in its `TokenDispatch`.

use std::sync::Arc;

use whale_kernels::cuda::cudarc::driver::CudaSlice;
use whale_kernels::cuda::{DispatchIndices, Gpu};

use super::{alloc, check_gpu_float, gpu_error, packed, tensor, with_buffers};
use crate::backprop::NoBackward;
use crate::ops::dispatch::TokenDispatch;
use crate::{Result, Tensor};

fn indices(g: &Gpu, t: &Tensor, d: &TokenDispatch) -> Result<Arc<DispatchIndices>> {
    d.indices_on(g.ordinal, |plan| g.upload_dispatch(plan).map_err(gpu_error(t.device())))
}

/// Runs `f` on the buffers of `x` and of `extra` when there is one.
fn with_optional<R>(
    x: &Tensor,
    extra: Option<&Tensor>,
    f: impl FnOnce(&Arc<Gpu>, &CudaSlice<f32>, Option<&CudaSlice<f32>>) -> Result<R>,
) -> Result<R> {
    match extra {
        Some(e) => with_buffers([x, e], |g, [xb, eb]| f(g, xb, Some(eb))),
        None => with_buffers([x], |g, [xb]| f(g, xb, None)),
    }
}

/// `[P, dim]`: `scale[p] * x[rows[p]]` (no scale: a copy).
pub(crate) fn permute(x: &Tensor, d: &TokenDispatch, scale: Option<&Tensor>, dim: usize) -> Result<Tensor> {
    check_gpu_float("moe_permute", x)?;
    let (xp, dev) = (packed(x)?, x.device());
    let sp = scale.map(packed).transpose()?;
    let n = d.plan.len() * dim;
    let (g, out) = with_optional(&xp, sp.as_ref(), |g, xb, sb| {
        let ix = indices(g, x, d)?;
        let mut out = alloc(g, dev, n)?;
        let s = sb.map(|b| b.slice(..));
        g.moe_permute_dev((&xb.slice(..), s.as_ref()), &ix, &mut out, dim).map_err(gpu_error(dev))?;
        Ok((g.clone(), out))
    })?;
    tensor(g, out, &[d.plan.len(), dim], x.dtype(), &[], NoBackward)
}

/// `[T, dim]`: every token's sum of `weight[p] * y[p]` over its rows (no weight: a plain sum).
pub(crate) fn combine(y: &Tensor, d: &TokenDispatch, weight: Option<&Tensor>, dim: usize) -> Result<Tensor> {
    check_gpu_float("moe_unpermute", y)?;
    let (yp, dev) = (packed(y)?, y.device());
    let wp = weight.map(packed).transpose()?;
    let n = d.plan.n_tokens() * dim;
    let (g, out) = with_optional(&yp, wp.as_ref(), |g, yb, wb| {
        let ix = indices(g, y, d)?;
        let mut out = alloc(g, dev, n)?;
        let w = wb.map(|b| b.slice(..));
        g.moe_unpermute_dev((&yb.slice(..), w.as_ref()), &ix, &mut out, dim).map_err(gpu_error(dev))?;
        Ok((g.clone(), out))
    })?;
    tensor(g, out, &[d.plan.n_tokens(), dim], y.dtype(), &[], NoBackward)
}

/// `[P]`: `dout[rows[p]] · y[p]`.
pub(crate) fn weight_grad(dout: &Tensor, y: &Tensor, d: &TokenDispatch, dim: usize) -> Result<Tensor> {
    check_gpu_float("moe_unpermute", y)?;
    let (gp, yp, dev) = (packed(dout)?, packed(y)?, y.device());
    let (g, out) = with_buffers([&gp, &yp], |g, [gb, yb]| {
        let ix = indices(g, y, d)?;
        let mut out = alloc(g, dev, d.plan.len())?;
        g.moe_unpermute_weight_grad_dev((&gb.slice(..), &yb.slice(..)), &ix, &mut out, dim).map_err(gpu_error(dev))?;
        Ok((g.clone(), out))
    })?;
    tensor(g, out, &[d.plan.len()], y.dtype(), &[], NoBackward)
}
