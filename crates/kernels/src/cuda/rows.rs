//! Device-buffer launchers of the row and elementwise kernels (kernels/norm.cu, rope.cu,
//! embedding.cu, elementwise.cu): what the tensor backend calls. Inputs are views (a tensor's
//! offset into its storage), outputs fresh buffers; lengths are checked before every launch (a
//! buffer may be longer than the call needs, never shorter). The host-slice launchers in
//! `cuda/mod.rs` copy in, call these, and copy out.

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{cuda, grid_for, need, rows_config, Gpu, GpuError, Result, MAX_BLOCKS};

type View<'a> = CudaView<'a, f32>;

impl Gpu {
    /// `out = silu(gate) * up` over `n` values.
    pub fn swiglu_forward_dev(&self, gate: &View<'_>, up: &View<'_>, out: &mut CudaSlice<f32>, n: usize) -> Result<()> {
        for len in [gate.len(), up.len(), out.len()] {
            need("swiglu", len, n)?;
        }
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("swiglu_forward_f32"));
        l.arg(gate).arg(up).arg(out).arg(&n32);
        // SAFETY: one thread per element of three buffers holding at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("swiglu_forward_f32"))?;
        Ok(())
    }

    /// SwiGLU's `(dgate, dup)` from `dout`.
    pub fn swiglu_backward_dev(
        &self,
        (gate, up, dout): (&View<'_>, &View<'_>, &View<'_>),
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        for len in [gate.len(), up.len(), dout.len(), dgate.len(), dup.len()] {
            need("swiglu backward", len, n)?;
        }
        let n32 = n as u32;
        let mut l = self.stream.launch_builder(self.function("swiglu_backward_f32"));
        l.arg(gate).arg(up).arg(dout).arg(dgate).arg(dup).arg(&n32);
        // SAFETY: one thread per element of five buffers holding at least n.
        unsafe { l.launch(grid_for(n)?) }.map_err(cuda("swiglu_backward_f32"))?;
        Ok(())
    }

    /// RMSNorm of `rows` rows of `dim`: `y` and the per-row `rstd` the backward needs.
    pub fn rmsnorm_forward_dev(
        &self,
        (x, w): (&View<'_>, &View<'_>),
        (y, rstd): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        (rows, dim, eps): (usize, usize, f32),
    ) -> Result<()> {
        need("rmsnorm", x.len().min(y.len()), rows * dim)?;
        need("rmsnorm", w.len(), dim)?;
        need("rmsnorm", rstd.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let dim32 = dim as u32;
        let mut l = self.stream.launch_builder(self.function("rmsnorm_forward_f32"));
        l.arg(x).arg(w).arg(y).arg(rstd).arg(&dim32).arg(&eps);
        // SAFETY: one block per row reads its `dim` inputs and writes its outputs; shared memory
        // holds one float per thread.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("rmsnorm_forward_f32"))?;
        Ok(())
    }

    /// RMSNorm backward: `dx` and `dw` from the forward's `rstd`.
    pub fn rmsnorm_backward_dev(
        &self,
        (x, w, rstd, dy): (&View<'_>, &View<'_>, &View<'_>, &View<'_>),
        (dx, dw): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        need("rmsnorm backward", x.len().min(dy.len()).min(dx.len()), rows * dim)?;
        need("rmsnorm backward", w.len().min(dw.len()), dim)?;
        need("rmsnorm backward", rstd.len(), rows)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let (dim32, rows32) = (dim as u32, rows as u32);
        let mut l = self.stream.launch_builder(self.function("rmsnorm_backward_input_f32"));
        l.arg(x).arg(w).arg(rstd).arg(dy).arg(dx).arg(&dim32);
        // SAFETY: one block per row, as the forward.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("rmsnorm_backward_input_f32"))?;
        let mut l = self.stream.launch_builder(self.function("rmsnorm_backward_weight_f32"));
        l.arg(x).arg(rstd).arg(dy).arg(dw).arg(&rows32).arg(&dim32);
        // 32 channels x 32 row groups a block; the row groups' sums in shared memory, a row of 33
        // floats each.
        let groups = 32u32;
        let cfg = LaunchConfig {
            grid_dim: ((dim as u32).div_ceil(32).min(MAX_BLOCKS), 1, 1),
            block_dim: (32, groups, 1),
            shared_mem_bytes: 4 * 33 * groups,
        };
        // SAFETY: each block's channels (grid-stride tiles of 32, those past dim idle) read their
        // columns of `rows` rows; shared memory holds 33 floats per row group.
        unsafe { l.launch(cfg) }.map_err(cuda("rmsnorm_backward_weight_f32"))?;
        Ok(())
    }

    /// Softmax of `rows` rows of `dim`.
    pub fn softmax_forward_dev(&self, x: &View<'_>, y: &mut CudaSlice<f32>, (rows, dim): (usize, usize)) -> Result<()> {
        need("softmax", x.len().min(y.len()), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let dim32 = dim as u32;
        let mut l = self.stream.launch_builder(self.function("softmax_forward_f32"));
        l.arg(x).arg(y).arg(&dim32);
        // SAFETY: one block per row of `dim`, as RMSNorm.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("softmax_forward_f32"))?;
        Ok(())
    }

    /// Log-softmax of `rows` rows of `dim`.
    pub fn log_softmax_forward_dev(
        &self,
        x: &View<'_>,
        y: &mut CudaSlice<f32>,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        need("log_softmax", x.len().min(y.len()), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let dim32 = dim as u32;
        let mut l = self.stream.launch_builder(self.function("log_softmax_forward_f32"));
        l.arg(x).arg(y).arg(&dim32);
        // SAFETY: one block per row of `dim`, as RMSNorm.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("log_softmax_forward_f32"))?;
        Ok(())
    }

    /// Log-softmax backward from the forward's output `y`.
    pub fn log_softmax_backward_dev(
        &self,
        (y, dy): (&View<'_>, &View<'_>),
        dx: &mut CudaSlice<f32>,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        need("log_softmax backward", y.len().min(dy.len()).min(dx.len()), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let dim32 = dim as u32;
        let mut l = self.stream.launch_builder(self.function("log_softmax_backward_f32"));
        l.arg(y).arg(dy).arg(dx).arg(&dim32);
        // SAFETY: as the forward.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("log_softmax_backward_f32"))?;
        Ok(())
    }

    /// Softmax backward from the forward's output `y`.
    pub fn softmax_backward_dev(
        &self,
        (y, dy): (&View<'_>, &View<'_>),
        dx: &mut CudaSlice<f32>,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        need("softmax backward", y.len().min(dy.len()).min(dx.len()), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let dim32 = dim as u32;
        let mut l = self.stream.launch_builder(self.function("softmax_backward_f32"));
        l.arg(y).arg(dy).arg(dx).arg(&dim32);
        // SAFETY: as the forward.
        unsafe { l.launch(rows_config(rows, dim)?) }.map_err(cuda("softmax_backward_f32"))?;
        Ok(())
    }

    /// Fused cross-entropy per row: `loss` and `lse`. Targets must lie in the vocabulary or
    /// equal `ignore` (the caller checks them on the host).
    pub fn cross_entropy_forward_dev(
        &self,
        (logits, targets, ignore): (&View<'_>, &CudaSlice<i64>, i64),
        (loss, lse): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        (rows, vocab): (usize, usize),
    ) -> Result<()> {
        need("cross entropy", logits.len(), rows * vocab)?;
        need("cross entropy", targets.len().min(loss.len()).min(lse.len()), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let vocab32 = vocab as u32;
        let mut l = self.stream.launch_builder(self.function("cross_entropy_forward_f32"));
        l.arg(logits).arg(targets).arg(&ignore).arg(loss).arg(lse).arg(&vocab32);
        // SAFETY: one block per row; targets lie in the vocabulary or are ignored.
        unsafe { l.launch(rows_config(rows, vocab)?) }.map_err(cuda("cross_entropy_forward_f32"))?;
        Ok(())
    }

    /// `dlogits` of the fused cross-entropy, each row scaled by its `dloss`.
    pub fn cross_entropy_backward_dev(
        &self,
        (logits, targets, ignore): (&View<'_>, &CudaSlice<i64>, i64),
        (lse, dloss): (&View<'_>, &View<'_>),
        dx: &mut CudaSlice<f32>,
        (rows, vocab): (usize, usize),
    ) -> Result<()> {
        need("cross entropy backward", logits.len().min(dx.len()), rows * vocab)?;
        need("cross entropy backward", targets.len().min(lse.len()).min(dloss.len()), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let vocab32 = vocab as u32;
        let mut l = self.stream.launch_builder(self.function("cross_entropy_backward_f32"));
        l.arg(logits).arg(targets).arg(&ignore).arg(lse).arg(dloss).arg(dx).arg(&vocab32);
        // SAFETY: as the forward.
        unsafe { l.launch(rows_config(rows, vocab)?) }.map_err(cuda("cross_entropy_backward_f32"))?;
        Ok(())
    }

    /// RoPE of `x` `[outer, seq, heads, d]` with tables `[seq, d/2]`; `inverse` rotates back.
    pub fn rope_dev(
        &self,
        (x, cos, sin): (&View<'_>, &View<'_>, &View<'_>),
        y: &mut CudaSlice<f32>,
        (outer, seq, heads, d): (usize, usize, usize, usize),
        (interleaved, inverse): (bool, bool),
    ) -> Result<()> {
        let n = outer * seq * heads * d;
        need("rope", x.len().min(y.len()), n)?;
        need("rope", cos.len().min(sin.len()), seq * d / 2)?;
        if d % 2 != 0 {
            return Err(GpuError::Shape(format!("rope: head dim {d} is odd")));
        }
        if n == 0 {
            return Ok(());
        }
        let dims = [outer as u32, seq as u32, heads as u32, d as u32];
        let (inter, sign) = (i32::from(interleaved), if inverse { -1.0f32 } else { 1.0 });
        let mut l = self.stream.launch_builder(self.function("rope_f32"));
        l.arg(x).arg(cos).arg(sin).arg(y).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]);
        l.arg(&inter).arg(&sign);
        // SAFETY: one thread per pair of an [outer, seq, heads, d] buffer and its [seq, d/2] tables.
        unsafe { l.launch(grid_for(n / 2)?) }.map_err(cuda("rope_f32"))?;
        Ok(())
    }

    /// Rows `ids` of `table` (`[rows, dim]`) into `out`. Ids must address rows of the table (the
    /// caller checks them on the host).
    pub fn embedding_forward_dev(
        &self,
        (table, ids): (&View<'_>, &CudaSlice<u32>),
        out: &mut CudaSlice<f32>,
        (n_ids, dim): (usize, usize),
    ) -> Result<()> {
        need("embedding", ids.len(), n_ids)?;
        need("embedding", out.len(), n_ids * dim)?;
        if n_ids * dim == 0 {
            return Ok(());
        }
        let (n32, dim32) = (n_ids as u32, dim as u32);
        let mut l = self.stream.launch_builder(self.function("embedding_forward_f32"));
        l.arg(table).arg(ids).arg(out).arg(&n32).arg(&dim32);
        // SAFETY: ids address rows of the table; one thread per output element.
        unsafe { l.launch(grid_for(n_ids * dim)?) }.map_err(cuda("embedding_forward_f32"))?;
        Ok(())
    }

    /// `dout` rows added into rows `ids` of `dtable` (which the caller zeroes or accumulates).
    pub fn embedding_backward_dev(
        &self,
        (dout, ids): (&View<'_>, &CudaSlice<u32>),
        dtable: &mut CudaSlice<f32>,
        (n_ids, dim): (usize, usize),
    ) -> Result<()> {
        need("embedding backward", ids.len(), n_ids)?;
        need("embedding backward", dout.len(), n_ids * dim)?;
        if n_ids * dim == 0 {
            return Ok(());
        }
        let (n32, dim32) = (n_ids as u32, dim as u32);
        let mut l = self.stream.launch_builder(self.function("embedding_backward_f32"));
        l.arg(dout).arg(ids).arg(dtable).arg(&n32).arg(&dim32);
        // SAFETY: as the forward; atomic adds into rows the ids address.
        unsafe { l.launch(grid_for(n_ids * dim)?) }.map_err(cuda("embedding_backward_f32"))?;
        Ok(())
    }
}
