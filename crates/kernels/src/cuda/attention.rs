//! Attention launchers (kernels/attention.cu): training attention and MLA decode over the latent
//! cache.

use cudarc::driver::PushKernelArg;

use super::{cuda, rows_config, Gpu, GpuError, Result, THREADS};
use crate::cpu::attention::AttnShape;

impl Gpu {
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
        let s = shape;
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        let fits = s.kv_heads > 0
            && s.q_heads % s.kv_heads == 0
            && q.len() == q_rows * s.qk_dim
            && k.len() == kv_rows * s.qk_dim
            && v.len() == kv_rows * s.v_dim
            && s.v_dim <= 8 * THREADS as usize;
        if !fits {
            return Err(GpuError::Shape(format!(
                "attention: buffers do not match {s:?} (v_dim at most {})",
                8 * THREADS
            )));
        }
        let (dq, dk, dv) = (self.upload(q)?, self.upload(k)?, self.upload(v)?);
        let (mut o, mut lse) = (self.zeros::<f32>(q_rows * s.v_dim)?, self.zeros::<f32>(q_rows)?);
        let dims = [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].map(|x| x as u32);
        let causal = i32::from(s.causal);
        let mut l = self.stream.launch_builder(self.function("attention_forward_f32"));
        l.arg(&dq).arg(&dk).arg(&dv).arg(&mut o).arg(&mut lse);
        for d in &dims {
            l.arg(d);
        }
        l.arg(&s.scale).arg(&causal);
        // SAFETY: one block per query row reads its q row and its KV head's rows (shapes checked
        // above), writes its o row and lse; v_dim fits the per-thread slices.
        unsafe { l.launch(rows_config(q_rows)) }.map_err(cuda("attention_forward_f32"))?;
        Ok((self.download(&o, q_rows * s.v_dim)?, self.download(&lse, q_rows)?))
    }
}
