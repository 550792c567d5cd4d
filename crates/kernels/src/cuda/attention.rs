//! Attention launchers (kernels/attention.cu): training attention (forward and backward) and MLA
//! decode over the latent cache. The `_dev` calls work on buffers already on the GPU (benchmarks,
//! a device tensor); the others copy host slices in and out (tests).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{cuda, rows_config, Gpu, GpuError, Result, THREADS};
use crate::cpu::attention::AttnShape;

/// Widest head (qk_dim or v_dim) the kernels' per-thread slices hold.
const MAX_WIDTH: usize = 8 * THREADS as usize;

/// Lengths of one call's buffers: q, k, v, then o (or dO) and lse when the call has them.
struct Lens {
    q: usize,
    k: usize,
    v: usize,
    o_lse: Option<(usize, usize)>,
}

/// Errors unless buffers of `lens` hold `s`'s tensors: exactly (host slices) or at least (device
/// buffers, which are never empty).
fn check(s: &AttnShape, what: &str, lens: Lens, exact: bool) -> Result<()> {
    let ok = |have: usize, need: usize| if exact { have == need } else { have >= need };
    let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
    let fits = s.kv_heads > 0
        && s.q_heads % s.kv_heads == 0
        && ok(lens.q, q_rows * s.qk_dim)
        && ok(lens.k, kv_rows * s.qk_dim)
        && ok(lens.v, kv_rows * s.v_dim)
        && lens.o_lse.is_none_or(|(o, lse)| ok(o, q_rows * s.v_dim) && ok(lse, q_rows))
        && s.qk_dim <= MAX_WIDTH
        && s.v_dim <= MAX_WIDTH;
    if fits {
        Ok(())
    } else {
        Err(GpuError::Shape(format!("{what}: buffers do not match {s:?} (qk_dim and v_dim at most {MAX_WIDTH})")))
    }
}

/// The scratch and outputs of [`Gpu::attention_backward_dev`]: `dq`, `dk`, `dv` shaped like q,
/// k, v, and `delta` (`[batch, q_heads, q_len]`, `D = dot(dO, O)` per query row).
#[derive(Debug)]
pub struct AttnGrads {
    pub dq: CudaSlice<f32>,
    pub dk: CudaSlice<f32>,
    pub dv: CudaSlice<f32>,
    pub delta: CudaSlice<f32>,
}

impl Gpu {
    /// Attention forward on device buffers into `o` and `lse` (see [`Gpu::attention_forward`]).
    pub fn attention_forward_dev(
        &self,
        s: &AttnShape,
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        o: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let lens = Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) };
        check(s, "attention", lens, false)?;
        let q_rows = s.batch * s.q_heads * s.q_len;
        if q_rows == 0 {
            return Ok(());
        }
        let dims = [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].map(|x| x as u32);
        let causal = i32::from(s.causal);
        let mut l = self.stream.launch_builder(self.function("attention_forward_f32"));
        l.arg(q).arg(k).arg(v).arg(o).arg(lse);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: one block per query row reads its q row and its KV head's rows (shapes checked
        // above), writes its o row and lse; v_dim fits the per-thread slices.
        unsafe { l.launch(rows_config(q_rows)) }.map_err(cuda("attention_forward_f32"))?;
        Ok(())
    }

    /// Attention forward with an online softmax: `(o, lse)` (twin:
    /// `cpu::attention::attention_forward`). Grouped-query heads and bottom-right causal masking;
    /// with one KV head whose value is the latent this is MLA's decode over its latent cache.
    pub fn attention_forward(
        &self,
        shape: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check(shape, "attention", Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: None }, true)?;
        let q_rows = shape.batch * shape.q_heads * shape.q_len;
        let (dq, dk, dv) = (self.upload_nonempty(q)?, self.upload_nonempty(k)?, self.upload_nonempty(v)?);
        let (mut o, mut lse) = (self.zeros::<f32>(q_rows * shape.v_dim)?, self.zeros::<f32>(q_rows)?);
        self.attention_forward_dev(shape, (&dq, &dk, &dv), &mut o, &mut lse)?;
        Ok((self.download(&o, q_rows * shape.v_dim)?, self.download(&lse, q_rows)?))
    }

    /// Attention backward on device buffers (see [`Gpu::attention_backward`]); every buffer of
    /// `grads` is overwritten.
    pub fn attention_backward_dev(
        &self,
        s: &AttnShape,
        (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        (o, lse, d_o): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        grads: &mut AttnGrads,
    ) -> Result<()> {
        let what = "attention backward";
        check(s, what, Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) }, false)?;
        let g = Lens {
            q: grads.dq.len(),
            k: grads.dk.len(),
            v: grads.dv.len(),
            o_lse: Some((d_o.len(), grads.delta.len())),
        };
        check(s, what, g, false)?;
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        if q_rows == 0 || kv_rows == 0 {
            // No queries: keys get no gradient. No keys: every row is fully masked.
            self.stream.memset_zeros(&mut grads.dq).map_err(cuda(what))?;
            self.stream.memset_zeros(&mut grads.dk).map_err(cuda(what))?;
            return self.stream.memset_zeros(&mut grads.dv).map_err(cuda(what));
        }
        let dims = [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].map(|x| x as u32);
        let causal = i32::from(s.causal);

        let mut l = self.stream.launch_builder(self.function("attention_backward_dq_f32"));
        l.arg(q).arg(k).arg(v).arg(o).arg(lse).arg(d_o).arg(&mut grads.dq).arg(&mut grads.delta);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: one block per query row reads its q, o, dO rows and lse and its KV head's rows
        // (shapes checked above), writes its dq row and delta; qk_dim fits the per-thread slices.
        unsafe { l.launch(rows_config(q_rows)) }.map_err(cuda("attention_backward_dq_f32"))?;

        let mut l = self.stream.launch_builder(self.function("attention_backward_dkv_f32"));
        l.arg(q).arg(k).arg(v).arg(d_o).arg(lse).arg(&grads.delta).arg(&mut grads.dk).arg(&mut grads.dv);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: one block per key row reads its k and v rows and the q, dO, lse and delta rows of
        // its group's query heads, writes its dk and dv rows; both widths fit the slices.
        unsafe { l.launch(rows_config(kv_rows)) }.map_err(cuda("attention_backward_dkv_f32"))?;
        Ok(())
    }

    /// Zeroed gradient buffers for [`Gpu::attention_backward_dev`] on `s`.
    pub fn attention_grads(&self, s: &AttnShape) -> Result<AttnGrads> {
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        Ok(AttnGrads {
            dq: self.zeros(q_rows * s.qk_dim)?,
            dk: self.zeros(kv_rows * s.qk_dim)?,
            dv: self.zeros(kv_rows * s.v_dim)?,
            delta: self.zeros(q_rows)?,
        })
    }

    /// Attention backward from the forward's `o` and `lse`: `(dq, dk, dv)` shaped like `q`, `k`,
    /// `v` (twin: `cpu::attention::attention_backward`). Two passes, no atomics: one block per
    /// query row writes its `dq` and `D = dot(dO, O)`, then one block per key row sums over every
    /// query of its group's heads for its `dk` and `dv`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        shape: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        lse: &[f32],
        d_o: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let what = "attention backward";
        check(shape, what, Lens { q: q.len(), k: k.len(), v: v.len(), o_lse: Some((o.len(), lse.len())) }, true)?;
        if d_o.len() != o.len() {
            return Err(GpuError::Shape(format!("{what}: dO has {} values, o {}", d_o.len(), o.len())));
        }
        let up = |x: &[f32]| self.upload_nonempty(x);
        let (dq, dk, dv) = (up(q)?, up(k)?, up(v)?);
        let (d_o_dev, o_dev, lse_dev) = (up(d_o)?, up(o)?, up(lse)?);
        let mut grads = self.attention_grads(shape)?;
        self.attention_backward_dev(shape, (&dq, &dk, &dv), (&o_dev, &lse_dev, &d_o_dev), &mut grads)?;
        Ok((self.download(&grads.dq, q.len())?, self.download(&grads.dk, k.len())?, self.download(&grads.dv, v.len())?))
    }
}
