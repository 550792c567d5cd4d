//! Token permutation launchers (kernels/dispatch.cu): the dispatch of a batch's rows into expert
//! order and the per-token weighted combine, on device buffers (what the tensor backend calls)
//! and on host slices (what the tests call).

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::{count32, cuda, grid_for, need, Gpu, GpuError, Result, THREADS};
use crate::cpu::dispatch::DispatchPlan;

type View<'a> = CudaView<'a, f32>;

/// A [`DispatchPlan`]'s indices on the GPU.
#[derive(Debug)]
pub struct DispatchIndices {
    /// `[P]`: the token each dispatched row copies.
    pub rows: CudaSlice<u32>,
    /// `[T + 1]` and `[P]`: each token's dispatched rows (CSR).
    pub token_offsets: CudaSlice<u32>,
    pub token_rows: CudaSlice<u32>,
    pub n_rows: usize,
    pub n_tokens: usize,
}

impl Gpu {
    /// Copies a plan's indices to the GPU (once per layer call; the backward reuses them).
    pub fn upload_dispatch(&self, plan: &DispatchPlan) -> Result<DispatchIndices> {
        Ok(DispatchIndices {
            rows: self.upload_nonempty(&plan.rows)?,
            token_offsets: self.upload(&plan.token_offsets)?,
            token_rows: self.upload_nonempty(&plan.token_rows)?,
            n_rows: plan.len(),
            n_tokens: plan.n_tokens(),
        })
    }

    /// `out[p] = scale[p] * x[rows[p]]` (no scale: a copy) over rows of `dim`; `x` holds the
    /// plan's tokens.
    pub fn moe_permute_dev(
        &self,
        (x, scale): (&View<'_>, Option<&View<'_>>),
        ix: &DispatchIndices,
        out: &mut CudaSlice<f32>,
        dim: usize,
    ) -> Result<()> {
        need("moe permute", x.len(), ix.n_tokens * dim)?;
        need("moe permute", out.len(), ix.n_rows * dim)?;
        if let Some(s) = scale {
            need("moe permute scale", s.len(), ix.n_rows)?;
        }
        if ix.n_rows * dim == 0 {
            return Ok(());
        }
        let (has_scale, n32, dim32) = (i32::from(scale.is_some()), ix.n_rows as u32, dim as u32);
        let mut l = self.stream.launch_builder(self.function("moe_permute_f32"));
        // Without a scale the kernel never reads the argument: `x` stands in for it.
        l.arg(x).arg(&ix.rows).arg(scale.unwrap_or(x)).arg(&has_scale).arg(out).arg(&n32).arg(&dim32);
        // SAFETY: the plan's rows address tokens of `x` (checked when it was built); one thread
        // per output element of a buffer holding at least n_rows * dim.
        unsafe { l.launch(grid_for(ix.n_rows * dim)?) }.map_err(cuda("moe_permute_f32"))?;
        Ok(())
    }

    /// `out[t] = sum of weight[p] * y[p]` over token `t`'s dispatched rows (no weight: a plain
    /// sum), into `out` (`[T, dim]`).
    pub fn moe_unpermute_dev(
        &self,
        (y, weight): (&View<'_>, Option<&View<'_>>),
        ix: &DispatchIndices,
        out: &mut CudaSlice<f32>,
        dim: usize,
    ) -> Result<()> {
        need("moe unpermute", y.len(), ix.n_rows * dim)?;
        need("moe unpermute", out.len(), ix.n_tokens * dim)?;
        if let Some(w) = weight {
            need("moe unpermute weight", w.len(), ix.n_rows)?;
        }
        if ix.n_tokens * dim == 0 {
            return Ok(());
        }
        let (has_weight, dim32) = (i32::from(weight.is_some()), count32("row width", dim)?);
        let mut l = self.stream.launch_builder(self.function("moe_unpermute_f32"));
        l.arg(y).arg(weight.unwrap_or(y)).arg(&has_weight).arg(&ix.token_offsets).arg(&ix.token_rows);
        l.arg(out).arg(&dim32);
        let threads = (dim as u32).next_power_of_two().clamp(32, THREADS);
        let cfg = LaunchConfig {
            grid_dim: (count32("tokens", ix.n_tokens)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per token reads the CSR range of its rows (offsets [T + 1], rows < P)
        // and writes its own output row.
        unsafe { l.launch(cfg) }.map_err(cuda("moe_unpermute_f32"))?;
        Ok(())
    }

    /// `dweight[p] = dout[rows[p]] · y[p]`, the combine's weight gradient, into `dweight` (`[P]`).
    pub fn moe_unpermute_weight_grad_dev(
        &self,
        (dout, y): (&View<'_>, &View<'_>),
        ix: &DispatchIndices,
        dweight: &mut CudaSlice<f32>,
        dim: usize,
    ) -> Result<()> {
        need("moe weight grad", dout.len(), ix.n_tokens * dim)?;
        need("moe weight grad", y.len(), ix.n_rows * dim)?;
        need("moe weight grad", dweight.len(), ix.n_rows)?;
        if ix.n_rows == 0 {
            return Ok(());
        }
        let dim32 = count32("row width", dim)?;
        let mut l = self.stream.launch_builder(self.function("moe_unpermute_weight_grad_f32"));
        l.arg(dout).arg(y).arg(&ix.rows).arg(dweight).arg(&dim32);
        let cfg = LaunchConfig {
            grid_dim: (count32("rows", ix.n_rows)?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 8 * THREADS,
        };
        // SAFETY: one block per dispatched row reads its token's gradient row and its own row of
        // y, reduces in THREADS doubles of shared memory, and writes one value.
        unsafe { l.launch(cfg) }.map_err(cuda("moe_unpermute_weight_grad_f32"))?;
        Ok(())
    }

    /// The permute from host slices (twin: `cpu::dispatch::permute` with the plan's rows).
    pub fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>> {
        self.check_dispatch("moe permute", x.len(), dim, plan)?;
        let ix = self.upload_dispatch(plan)?;
        let (dx, ds) = (self.upload_nonempty(x)?, self.upload_nonempty(scale.unwrap_or(&[]))?);
        let mut out = self.zeros::<f32>(plan.len() * dim)?;
        self.moe_permute_dev((&dx.slice(..), scale.map(|_| ds.slice(..)).as_ref()), &ix, &mut out, dim)?;
        self.download(&out, plan.len() * dim)
    }

    /// The combine from host slices (twin: `cpu::dispatch::unpermute` with the plan's lists).
    pub fn moe_unpermute(
        &self,
        y: &[f32],
        dim: usize,
        plan: &DispatchPlan,
        weight: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        if y.len() != plan.len() * dim || weight.is_some_and(|w| w.len() != plan.len()) {
            return Err(GpuError::Shape(format!(
                "moe unpermute: {} values and {:?} weights for {} rows of {dim}",
                y.len(),
                weight.map(<[f32]>::len),
                plan.len()
            )));
        }
        let ix = self.upload_dispatch(plan)?;
        let (dy, dw) = (self.upload_nonempty(y)?, self.upload_nonempty(weight.unwrap_or(&[]))?);
        let mut out = self.zeros::<f32>(plan.n_tokens() * dim)?;
        self.moe_unpermute_dev((&dy.slice(..), weight.map(|_| dw.slice(..)).as_ref()), &ix, &mut out, dim)?;
        self.download(&out, plan.n_tokens() * dim)
    }

    /// The combine's weight gradient from host slices (twin: `cpu::dispatch::unpermute_weight_grad`).
    pub fn moe_unpermute_weight_grad(
        &self,
        dout: &[f32],
        y: &[f32],
        dim: usize,
        plan: &DispatchPlan,
    ) -> Result<Vec<f32>> {
        self.check_dispatch("moe weight grad", dout.len(), dim, plan)?;
        if y.len() != plan.len() * dim {
            return Err(GpuError::Shape(format!(
                "moe weight grad: {} values for {} rows of {dim}",
                y.len(),
                plan.len()
            )));
        }
        let ix = self.upload_dispatch(plan)?;
        let (dd, dy, mut dw) = (self.upload_nonempty(dout)?, self.upload_nonempty(y)?, self.zeros::<f32>(plan.len())?);
        self.moe_unpermute_weight_grad_dev((&dd.slice(..), &dy.slice(..)), &ix, &mut dw, dim)?;
        self.download(&dw, plan.len())
    }

    fn check_dispatch(&self, what: &str, token_values: usize, dim: usize, plan: &DispatchPlan) -> Result<()> {
        if token_values != plan.n_tokens() * dim {
            return Err(GpuError::Shape(format!(
                "{what}: {token_values} values for {} tokens of {dim}",
                plan.n_tokens()
            )));
        }
        Ok(())
    }
}
