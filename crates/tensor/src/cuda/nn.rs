//! The fused neural-network ops and the slice indexing of the CUDA backend: softmax, RMSNorm,
//! cross-entropy, RoPE, SwiGLU, attention, and index_select / index_add along a leading
//! dimension (embedding lookups, MoE dispatch and combine). Each forward keeps what its backward
//! needs on the GPU; index tensors and RoPE tables are host data, copied in per call.

use std::sync::Arc;

use whale_kernels::cuda::cudarc::driver::CudaSlice;
use whale_kernels::cuda::{AttnGrads, Gpu};

use super::{alloc, check_gpu_float, gpu_error, packed, tensor, upload, with_buffer, with_buffers};
use crate::backprop::{backward_fn, NoBackward};
use crate::ops::nn::{AttnShape, RopeLayout};
use crate::{Result, Tensor};

/// Softmax (or, with `log`, log-softmax) over the last dim of `input` (`rows` rows of `dim`).
pub(crate) fn softmax_last_dim(input: &Tensor, dim: usize, log: bool) -> Result<Tensor> {
    let name = if log { "log_softmax" } else { "softmax" };
    check_gpu_float(name, input)?;
    let x = packed(input)?;
    let (n, dev) = (x.elem_count(), x.device());
    let rows = n / dim.max(1);
    let (g, y) = with_buffer(&x, |g, xb| {
        let mut y = alloc(g, dev, n)?;
        if log {
            g.log_softmax_forward_dev(&xb.slice(..), &mut y, (rows, dim))
        } else {
            g.softmax_forward_dev(&xb.slice(..), &mut y, (rows, dim))
        }
        .map_err(gpu_error(dev))?;
        Ok((g.clone(), y))
    })?;
    let back = backward_fn(name, move |inputs: &[Tensor], out: &Tensor, grad: &Tensor, _: &[bool]| {
        let gr = packed(grad)?;
        let dx = with_buffers([out, &gr], |g, [yb, gb]| {
            let mut dx = alloc(g, dev, n)?;
            let ins = (&yb.slice(..), &gb.slice(..));
            if log {
                g.log_softmax_backward_dev(ins, &mut dx, (rows, dim))
            } else {
                g.softmax_backward_dev(ins, &mut dx, (rows, dim))
            }
            .map_err(gpu_error(dev))?;
            tensor(g.clone(), dx, inputs[0].dims(), inputs[0].dtype(), &[], NoBackward)
        })?;
        Ok(vec![Some(dx)])
    });
    tensor(g, y, x.dims(), input.dtype(), &[input], back)
}

/// RMSNorm over the last dim (`weight`: `[dim]`).
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, dim: usize, eps: f32) -> Result<Tensor> {
    check_gpu_float("rms_norm", x)?;
    let (xp, wp) = (packed(x)?, packed(weight)?);
    let (n, dev) = (x.elem_count(), x.device());
    let rows = n / dim.max(1);
    let (g, y, rstd) = with_buffers([&xp, &wp], |g, [xb, wb]| {
        let (mut y, mut rstd) = (alloc(g, dev, n)?, alloc(g, dev, rows)?);
        g.rmsnorm_forward_dev((&xb.slice(..), &wb.slice(..)), (&mut y, &mut rstd), (rows, dim, eps))
            .map_err(gpu_error(dev))?;
        Ok((g.clone(), y, Arc::new(rstd)))
    })?;
    let back = backward_fn("rms_norm", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, needs: &[bool]| {
        let (x, w, gr) = (packed(&inputs[0])?, packed(&inputs[1])?, packed(grad)?);
        let (dx, dw) = with_buffers([&x, &w, &gr], |g, [xb, wb, gb]| {
            let (mut dx, mut dw) = (alloc(g, dev, n)?, alloc(g, dev, dim)?);
            let ins = (&xb.slice(..), &wb.slice(..), &rstd.slice(..), &gb.slice(..));
            g.rmsnorm_backward_dev(ins, (&mut dx, &mut dw), (rows, dim)).map_err(gpu_error(dev))?;
            Ok((
                tensor(g.clone(), dx, x.dims(), x.dtype(), &[], NoBackward)?,
                tensor(g.clone(), dw, w.dims(), w.dtype(), &[], NoBackward)?,
            ))
        })?;
        Ok(vec![needs[0].then_some(dx), needs[1].then_some(dw)])
    });
    tensor(g, y, x.dims(), x.dtype(), &[x, weight], back)
}

/// Mean cross-entropy of logits `[rows, vocab]` against host targets `t` (checked), skipping
/// `ignore`; the per-row losses are summed on the host in f64, as on the CPU.
pub(crate) fn cross_entropy(logits: &Tensor, t: Vec<i64>, ignore: i64, vocab: usize) -> Result<Tensor> {
    check_gpu_float("cross_entropy", logits)?;
    let x = packed(logits)?;
    let (rows, dev) = (t.len(), logits.device());
    let count = t.iter().filter(|&&v| v != ignore).count();
    let scale = if count == 0 { 0.0 } else { 1.0 / count as f64 };
    let (g, targets, lse, loss) = with_buffer(&x, |g, xb| {
        let targets = Arc::new(upload(g, dev, &t)?);
        let (mut loss, mut lse) = (alloc(g, dev, rows)?, alloc(g, dev, rows)?);
        g.cross_entropy_forward_dev((&xb.slice(..), &targets, ignore), (&mut loss, &mut lse), (rows, vocab))
            .map_err(gpu_error(dev))?;
        let loss = g.stream.clone_dtoh(&loss).map_err(super::driver_error(dev, "copying losses to the host"))?;
        Ok((g.clone(), targets, Arc::new(lse), loss))
    })?;
    let mean = (loss[..rows].iter().map(|&l| l as f64).sum::<f64>() * scale) as f32;
    let back = backward_fn("cross_entropy", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, _: &[bool]| {
        let x = packed(&inputs[0])?;
        let dl = vec![(grad.to_scalar()? as f64 * scale) as f32; rows];
        let dx = with_buffer(&x, |g, xb| {
            let dl = upload(g, dev, &dl)?;
            let mut dx = alloc(g, dev, rows * vocab)?;
            let row_in = (&lse.slice(..), &dl.slice(..));
            g.cross_entropy_backward_dev((&xb.slice(..), &targets, ignore), row_in, &mut dx, (rows, vocab))
                .map_err(gpu_error(dev))?;
            tensor(g.clone(), dx, x.dims(), x.dtype(), &[], NoBackward)
        })?;
        Ok(vec![Some(dx)])
    });
    let out = upload(&g, dev, &[mean])?;
    tensor(g, out, &[], logits.dtype(), &[logits], back)
}

/// RoPE of `x` `[b, s, h, d]` with host tables `[s, d/2]`.
pub(crate) fn rope(x: &Tensor, cos: Vec<f32>, sin: Vec<f32>, layout: RopeLayout) -> Result<Tensor> {
    check_gpu_float("rope", x)?;
    let xp = packed(x)?;
    let dims = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
    let (n, dev) = (x.elem_count(), x.device());
    let interleaved = layout == RopeLayout::Interleaved;
    let g = super::gpu_of("rope", dev)?;
    let (cos, sin) = (Arc::new(upload(&g, dev, &cos)?), Arc::new(upload(&g, dev, &sin)?));
    let run = move |t: &Tensor, inverse: bool| -> Result<(Arc<Gpu>, CudaSlice<f32>)> {
        with_buffer(t, |g, tb| {
            let mut y = alloc(g, dev, n)?;
            g.rope_dev((&tb.slice(..), &cos.slice(..), &sin.slice(..)), &mut y, dims, (interleaved, inverse))
                .map_err(gpu_error(dev))?;
            Ok((g.clone(), y))
        })
    };
    let (g, y) = run(&xp, false)?;
    let back = backward_fn("rope", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, _: &[bool]| {
        // A rotation's transpose is the rotation by the opposite angle.
        let (g, dx) = run(&packed(grad)?, true)?;
        Ok(vec![Some(tensor(g, dx, inputs[0].dims(), inputs[0].dtype(), &[], NoBackward)?)])
    });
    tensor(g, y, x.dims(), x.dtype(), &[x], back)
}

/// SwiGLU `silu(gate) * up`.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_gpu_float("swiglu", gate)?;
    let (gp, up_p) = (packed(gate)?, packed(up)?);
    let (n, dev) = (gate.elem_count(), gate.device());
    let (g, out) = with_buffers([&gp, &up_p], |g, [gb, ub]| {
        let mut out = alloc(g, dev, n)?;
        g.swiglu_forward_dev(&gb.slice(..), &ub.slice(..), &mut out, n).map_err(gpu_error(dev))?;
        Ok((g.clone(), out))
    })?;
    let back = backward_fn("swiglu", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, needs: &[bool]| {
        let (gt, ut, gr) = (packed(&inputs[0])?, packed(&inputs[1])?, packed(grad)?);
        let (dg, du) = with_buffers([&gt, &ut, &gr], |g, [gb, ub, db]| {
            let (mut dg, mut du) = (alloc(g, dev, n)?, alloc(g, dev, n)?);
            g.swiglu_backward_dev((&gb.slice(..), &ub.slice(..), &db.slice(..)), &mut dg, &mut du, n)
                .map_err(gpu_error(dev))?;
            Ok((
                tensor(g.clone(), dg, gt.dims(), gt.dtype(), &[], NoBackward)?,
                tensor(g.clone(), du, ut.dims(), ut.dtype(), &[], NoBackward)?,
            ))
        })?;
        Ok(vec![needs[0].then_some(dg), needs[1].then_some(du)])
    });
    tensor(g, out, gate.dims(), gate.dtype(), &[gate, up], back)
}

/// Scaled dot-product attention on the GPU's attention kernels (`shape` checked by the caller).
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, shape: AttnShape) -> Result<Tensor> {
    for t in [q, k, v] {
        check_gpu_float("attention", t)?;
    }
    let (qp, kp, vp) = (packed(q)?, packed(k)?, packed(v)?);
    let dev = q.device();
    let s = shape;
    let q_rows = s.batch * s.q_heads * s.q_len;
    let (g, o, lse) = with_buffers([&qp, &kp, &vp], |g, [qb, kb, vb]| {
        let (mut o, mut lse) = (alloc(g, dev, q_rows * s.v_dim)?, alloc(g, dev, q_rows)?);
        g.attention_forward_dev(&s, (qb, kb, vb), &mut o, &mut lse).map_err(gpu_error(dev))?;
        Ok((g.clone(), o, Arc::new(lse)))
    })?;
    let back = backward_fn("attention", move |inputs: &[Tensor], out: &Tensor, grad: &Tensor, needs: &[bool]| {
        let (q, k, v, gr) = (packed(&inputs[0])?, packed(&inputs[1])?, packed(&inputs[2])?, packed(grad)?);
        let grads = with_buffers([&q, &k, &v, out, &gr], |g, [qb, kb, vb, ob, gb]| {
            let mut grads: AttnGrads = g.attention_grads(&s).map_err(gpu_error(dev))?;
            g.attention_backward_dev(&s, (qb, kb, vb), (ob, &lse, gb), &mut grads).map_err(gpu_error(dev))?;
            Ok((g.clone(), grads))
        })?;
        let (g, AttnGrads { dq, dk, dv, .. }) = grads;
        Ok(vec![
            needs[0].then(|| tensor(g.clone(), dq, q.dims(), q.dtype(), &[], NoBackward)).transpose()?,
            needs[1].then(|| tensor(g.clone(), dk, k.dims(), k.dtype(), &[], NoBackward)).transpose()?,
            needs[2].then(|| tensor(g.clone(), dv, v.dims(), v.dtype(), &[], NoBackward)).transpose()?,
        ])
    });
    tensor(g, o, &[s.batch, s.q_heads, s.q_len, s.v_dim], q.dtype(), &[q, k, v], back)
}

/// Rows `idx` (checked) of `x` seen as `[n, inner]`: `index_select` along a leading dimension.
pub(crate) fn index_select_rows(x: &Tensor, idx: &[usize], inner: usize, out_shape: &[usize]) -> Result<Tensor> {
    check_gpu_float("index_select", x)?;
    let xp = packed(x)?;
    let dev = x.device();
    let ids32 = super::ids_u32("index_select", idx)?;
    let (g, out, ids_dev) = with_buffer(&xp, |g, xb| {
        let ids_dev = Arc::new(upload(g, dev, &ids32)?);
        let mut out = alloc(g, dev, idx.len() * inner)?;
        g.embedding_forward_dev((&xb.slice(..), &ids_dev), &mut out, (idx.len(), inner)).map_err(gpu_error(dev))?;
        Ok((g.clone(), out, ids_dev))
    })?;
    let (rows, m) = (x.elem_count() / inner.max(1), idx.len());
    let back = backward_fn("index_select", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, _: &[bool]| {
        let gr = packed(grad)?;
        let dx = with_buffer(&gr, |g, gb| {
            let mut dx = alloc(g, dev, rows * inner)?;
            g.embedding_backward_dev((&gb.slice(..), &ids_dev), &mut dx, (m, inner)).map_err(gpu_error(dev))?;
            tensor(g.clone(), dx, inputs[0].dims(), inputs[0].dtype(), &[], NoBackward)
        })?;
        Ok(vec![Some(dx)])
    });
    tensor(g, out, out_shape, x.dtype(), &[x], back)
}
