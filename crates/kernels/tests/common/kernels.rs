//! The kernels a test body calls, on a GPU ([`Gpu`]'s host-slice launchers) or in host
//! emulation ([`Emulator`], launching the same kernels with the launch shapes of those
//! launchers): one body checks both against the CPU twins.

use half::bf16;

use whale_kernels::cpu::adamw::{AdamWScalars, AdamWStep};
use whale_kernels::cpu::attention::AttnShape;
use whale_kernels::cpu::dispatch::DispatchPlan;
use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format};
use whale_kernels::cpu::router::{Routed, RouterConfig};
use whale_kernels::cuda::{Fp8GemmKernel, Gpu, WGMMA_SHARED_BYTES};

use super::emulator::{Arg, Emulator, Launch};

pub type Result<T> = std::result::Result<T, String>;

/// `(outer, seq, heads, d)`: RoPE's operand `[outer, seq, heads, d]`.
pub type RopeShape = (usize, usize, usize, usize);

/// Each method is the [`Gpu`] launcher of the same name.
pub trait Kernels {
    fn add(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>>;
    fn mul(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>>;
    fn swiglu_forward(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>>;
    fn swiglu_backward(&self, gate: &[f32], up: &[f32], dout: &[f32]) -> Result<(Vec<f32>, Vec<f32>)>;
    fn rmsnorm_forward(&self, x: &[f32], w: &[f32], dim: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)>;
    fn rmsnorm_backward(&self, x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)>;
    fn softmax_forward(&self, x: &[f32], dim: usize) -> Result<Vec<f32>>;
    fn softmax_backward(&self, y: &[f32], dy: &[f32], dim: usize) -> Result<Vec<f32>>;
    fn cross_entropy_forward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
    ) -> Result<(Vec<f32>, Vec<f32>)>;
    fn cross_entropy_backward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
        lse: &[f32],
        dloss: &[f32],
    ) -> Result<Vec<f32>>;
    fn rope(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        shape: RopeShape,
        interleaved: bool,
        inverse: bool,
    ) -> Result<Vec<f32>>;
    fn embedding_forward(&self, table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>>;
    fn embedding_backward(&self, dout: &[f32], dim: usize, ids: &[u32], table_len: usize) -> Result<Vec<f32>>;
    fn adamw_step(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) -> Result<()>;
    fn adamw_step_bf16(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [bf16],
        v: &mut [bf16],
        hp: &AdamWStep,
    ) -> Result<()>;
    fn moe_route(&self, logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Result<Routed>;
    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>>;
    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>>;
    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>>;
    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)>;
    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks>;
    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>>;
    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks>;
    fn fp8_gemm_with(&self, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel) -> Result<Vec<f32>>;
}

fn text<T>(r: std::result::Result<T, whale_kernels::cuda::GpuError>) -> Result<T> {
    r.map_err(|e| e.to_string())
}

impl Kernels for Gpu {
    fn add(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        text(Gpu::add(self, a, b))
    }
    fn mul(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        text(Gpu::mul(self, a, b))
    }
    fn swiglu_forward(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        text(Gpu::swiglu_forward(self, gate, up))
    }
    fn swiglu_backward(&self, gate: &[f32], up: &[f32], dout: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        text(Gpu::swiglu_backward(self, gate, up, dout))
    }
    fn rmsnorm_forward(&self, x: &[f32], w: &[f32], dim: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        text(Gpu::rmsnorm_forward(self, x, w, dim, eps))
    }
    fn rmsnorm_backward(&self, x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        text(Gpu::rmsnorm_backward(self, x, w, rstd, dy))
    }
    fn softmax_forward(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        text(Gpu::softmax_forward(self, x, dim))
    }
    fn softmax_backward(&self, y: &[f32], dy: &[f32], dim: usize) -> Result<Vec<f32>> {
        text(Gpu::softmax_backward(self, y, dy, dim))
    }
    fn cross_entropy_forward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        text(Gpu::cross_entropy_forward(self, logits, vocab, targets, ignore))
    }
    fn cross_entropy_backward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
        lse: &[f32],
        dloss: &[f32],
    ) -> Result<Vec<f32>> {
        text(Gpu::cross_entropy_backward(self, logits, vocab, targets, ignore, lse, dloss))
    }
    fn rope(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        shape: RopeShape,
        interleaved: bool,
        inverse: bool,
    ) -> Result<Vec<f32>> {
        text(Gpu::rope(self, x, cos, sin, shape, interleaved, inverse))
    }
    fn embedding_forward(&self, table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
        text(Gpu::embedding_forward(self, table, dim, ids))
    }
    fn embedding_backward(&self, dout: &[f32], dim: usize, ids: &[u32], table_len: usize) -> Result<Vec<f32>> {
        text(Gpu::embedding_backward(self, dout, dim, ids, table_len))
    }
    fn adamw_step(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) -> Result<()> {
        text(Gpu::adamw_step(self, param, grad, m, v, hp))
    }
    fn adamw_step_bf16(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [bf16],
        v: &mut [bf16],
        hp: &AdamWStep,
    ) -> Result<()> {
        text(Gpu::adamw_step_bf16(self, param, grad, m, v, hp))
    }
    fn moe_route(&self, logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Result<Routed> {
        text(Gpu::moe_route(self, logits, bias, cfg))
    }
    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>> {
        text(Gpu::moe_permute(self, x, dim, plan, scale))
    }
    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>> {
        text(Gpu::moe_unpermute(self, y, dim, plan, weight))
    }
    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>> {
        text(Gpu::moe_unpermute_weight_grad(self, dout, y, dim, plan))
    }
    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)> {
        text(Gpu::round_trip_bf16(self, x))
    }
    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_1x128(self, x, rows, cols))
    }
    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_128x128(self, x, rows, cols))
    }
    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        text(Gpu::fp8_quantize_transposed(self, x, rows, cols))
    }
    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        text(Gpu::fp8_dequantize(self, q))
    }
    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks> {
        text(Gpu::fp8_transpose(self, w))
    }
    fn fp8_gemm_with(&self, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel) -> Result<Vec<f32>> {
        text(Gpu::fp8_gemm_with(self, a, b, kernel))
    }
}

/// The launchers' `THREADS` and `grid_for` (crates/kernels/src/cuda/mod.rs): grid-stride loops
/// over `n` elements.
const THREADS: u32 = 256;

pub fn grid_for(n: usize) -> Launch {
    Launch::new(((n as u32).div_ceil(THREADS).clamp(1, 65_535), 1, 1), (THREADS, 1, 1), 0)
}

/// The launchers' `rows_config`: one block of `THREADS` per row, reducing in shared memory.
fn rows_config(rows: usize) -> Launch {
    Launch::new((rows as u32, 1, 1), (THREADS, 1, 1), 4 * THREADS)
}

fn u32_of(n: usize) -> Arg<'static> {
    Arg::value(u32::try_from(n).expect("a size that fits the kernels' u32"))
}

impl Emulator {
    /// `out[..n] = kernel(a, b)` for the two-input elementwise kernels (add, mul, swiglu).
    fn map2(&self, kernel: &str, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; a.len()];
        self.launch(
            kernel,
            grid_for(a.len()),
            &mut [Arg::input(a), Arg::input(b), Arg::output(&mut out), u32_of(a.len())],
        )?;
        Ok(out)
    }

    /// A row kernel `kernel(inputs.., out, dim)` over rows of `dim` (softmax and its kin).
    fn rows(&self, kernel: &str, inputs: &[&[f32]], dim: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; inputs[0].len()];
        let mut args: Vec<Arg<'_>> = inputs.iter().map(|x| Arg::input(x)).collect();
        args.extend([Arg::output(&mut out), u32_of(dim)]);
        self.launch(kernel, rows_config(inputs[0].len() / dim), &mut args)?;
        Ok(out)
    }

    /// log-softmax over rows of `dim` (no host-slice launcher on the GPU: whale-tensor's backend
    /// calls `log_softmax_forward_dev`).
    pub fn log_softmax_forward(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        self.rows("log_softmax_forward_f32", &[x], dim)
    }

    pub fn log_softmax_backward(&self, y: &[f32], dy: &[f32], dim: usize) -> Result<Vec<f32>> {
        self.rows("log_softmax_backward_f32", &[y, dy], dim)
    }

    /// The simple attention forward (one block per query row): `(o, lse)`. The tiled kernels
    /// are kernels/emulate/attention.cpp's.
    pub fn attention_forward_simple(
        &self,
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let q_rows = s.batch * s.q_heads * s.q_len;
        let (mut o, mut lse) = (vec![0.0f32; q_rows * s.v_dim], vec![0.0f32; q_rows]);
        let mut args = vec![Arg::input(q), Arg::input(k), Arg::input(v), Arg::output(&mut o), Arg::output(&mut lse)];
        args.extend(attention_dims(s));
        self.launch("attention_forward_f32", rows_config(q_rows), &mut args)?;
        Ok((o, lse))
    }

    /// The simple attention backward's two passes (a block per query row, then per key row):
    /// `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_simple(
        &self,
        s: &AttnShape,
        (q, k, v): (&[f32], &[f32], &[f32]),
        (o, lse, d_o): (&[f32], &[f32], &[f32]),
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (q_rows, kv_rows) = (s.batch * s.q_heads * s.q_len, s.batch * s.kv_heads * s.kv_len);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
        let mut delta = vec![0.0f32; q_rows];
        if q_rows == 0 || kv_rows == 0 {
            // As the launcher: no queries, no key gradients; no keys, every row fully masked.
            return Ok((dq, dk, dv));
        }
        let (inputs, outputs) = ([q, k, v, o, lse, d_o], (&mut dq, &mut delta));
        let mut args: Vec<Arg<'_>> = inputs.iter().map(|x| Arg::input(x)).collect();
        args.extend([Arg::output(outputs.0), Arg::output(outputs.1)]);
        args.extend(attention_dims(s));
        self.launch("attention_backward_dq_f32", rows_config(q_rows), &mut args)?;
        let mut args: Vec<Arg<'_>> = [q, k, v, d_o, lse, &delta].iter().map(|x| Arg::input(x)).collect();
        args.extend([Arg::output(&mut dk), Arg::output(&mut dv)]);
        args.extend(attention_dims(s));
        self.launch("attention_backward_dkv_f32", rows_config(kv_rows), &mut args)?;
        Ok((dq, dk, dv))
    }
}

/// The attention kernels' trailing arguments: heads, lengths, widths, scale, causal.
fn attention_dims(s: &AttnShape) -> Vec<Arg<'static>> {
    let mut args: Vec<Arg<'static>> =
        [s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk_dim, s.v_dim].into_iter().map(u32_of).collect();
    args.extend([Arg::value(s.scale), Arg::value(i32::from(s.causal))]);
    args
}

/// The kernels in emulation, launched as the launchers of crates/kernels/src/cuda launch them
/// (dispatch.rs, tensor_ops.rs, fp8.rs); the launchers' argument checks are theirs, not
/// repeated here.
impl Kernels for Emulator {
    fn add(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.map2("add_f32", a, b)
    }

    fn mul(&self, a: &[f32], b: &[f32]) -> Result<Vec<f32>> {
        self.map2("mul_f32", a, b)
    }

    fn swiglu_forward(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        self.map2("swiglu_forward_f32", gate, up)
    }

    fn swiglu_backward(&self, gate: &[f32], up: &[f32], dout: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = gate.len();
        let (mut dgate, mut dup) = (vec![0.0f32; n], vec![0.0f32; n]);
        let args = &mut [
            Arg::input(gate),
            Arg::input(up),
            Arg::input(dout),
            Arg::output(&mut dgate),
            Arg::output(&mut dup),
            u32_of(n),
        ];
        self.launch("swiglu_backward_f32", grid_for(n), args)?;
        Ok((dgate, dup))
    }

    fn rmsnorm_forward(&self, x: &[f32], w: &[f32], dim: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = x.len() / dim;
        let (mut y, mut rstd) = (vec![0.0f32; x.len()], vec![0.0f32; rows]);
        let args = &mut [
            Arg::input(x),
            Arg::input(w),
            Arg::output(&mut y),
            Arg::output(&mut rstd),
            u32_of(dim),
            Arg::value(eps),
        ];
        self.launch("rmsnorm_forward_f32", rows_config(rows), args)?;
        Ok((y, rstd))
    }

    fn rmsnorm_backward(&self, x: &[f32], w: &[f32], rstd: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (dim, rows) = (w.len(), rstd.len());
        let (mut dx, mut dw) = (vec![0.0f32; x.len()], vec![0.0f32; dim]);
        let args =
            &mut [Arg::input(x), Arg::input(w), Arg::input(rstd), Arg::input(dy), Arg::output(&mut dx), u32_of(dim)];
        self.launch("rmsnorm_backward_input_f32", rows_config(rows), args)?;
        let args =
            &mut [Arg::input(x), Arg::input(rstd), Arg::input(dy), Arg::output(&mut dw), u32_of(rows), u32_of(dim)];
        self.launch("rmsnorm_backward_weight_f32", grid_for(dim), args)?;
        Ok((dx, dw))
    }

    fn softmax_forward(&self, x: &[f32], dim: usize) -> Result<Vec<f32>> {
        self.rows("softmax_forward_f32", &[x], dim)
    }

    fn softmax_backward(&self, y: &[f32], dy: &[f32], dim: usize) -> Result<Vec<f32>> {
        self.rows("softmax_backward_f32", &[y, dy], dim)
    }

    fn cross_entropy_forward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rows = targets.len();
        let (mut loss, mut lse) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        let args = &mut [
            Arg::input(logits),
            Arg::input(targets),
            Arg::value(ignore),
            Arg::output(&mut loss),
            Arg::output(&mut lse),
            u32_of(vocab),
        ];
        self.launch("cross_entropy_forward_f32", rows_config(rows), args)?;
        Ok((loss, lse))
    }

    fn cross_entropy_backward(
        &self,
        logits: &[f32],
        vocab: usize,
        targets: &[i64],
        ignore: i64,
        lse: &[f32],
        dloss: &[f32],
    ) -> Result<Vec<f32>> {
        let mut dx = vec![0.0f32; logits.len()];
        let args = &mut [
            Arg::input(logits),
            Arg::input(targets),
            Arg::value(ignore),
            Arg::input(lse),
            Arg::input(dloss),
            Arg::output(&mut dx),
            u32_of(vocab),
        ];
        self.launch("cross_entropy_backward_f32", rows_config(targets.len()), args)?;
        Ok(dx)
    }

    fn rope(
        &self,
        x: &[f32],
        cos: &[f32],
        sin: &[f32],
        (outer, seq, heads, d): RopeShape,
        interleaved: bool,
        inverse: bool,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0.0f32; x.len()];
        let args = &mut [
            Arg::input(x),
            Arg::input(cos),
            Arg::input(sin),
            Arg::output(&mut y),
            u32_of(outer),
            u32_of(seq),
            u32_of(heads),
            u32_of(d),
            Arg::value(i32::from(interleaved)),
            Arg::value(if inverse { -1.0f32 } else { 1.0 }),
        ];
        self.launch("rope_f32", grid_for(x.len() / 2), args)?;
        Ok(y)
    }

    fn embedding_forward(&self, table: &[f32], dim: usize, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; ids.len() * dim];
        let args = &mut [Arg::input(table), Arg::input(ids), Arg::output(&mut out), u32_of(ids.len()), u32_of(dim)];
        self.launch("embedding_forward_f32", grid_for(ids.len() * dim), args)?;
        Ok(out)
    }

    fn embedding_backward(&self, dout: &[f32], dim: usize, ids: &[u32], table_len: usize) -> Result<Vec<f32>> {
        let mut dtable = vec![0.0f32; table_len];
        let args = &mut [Arg::input(dout), Arg::input(ids), Arg::output(&mut dtable), u32_of(ids.len()), u32_of(dim)];
        self.launch("embedding_backward_f32", grid_for(ids.len() * dim), args)?;
        Ok(dtable)
    }

    fn adamw_step(&self, param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) -> Result<()> {
        adamw(self, "adamw_step_f32", param, grad, (m, v), hp)
    }

    fn adamw_step_bf16(
        &self,
        param: &mut [f32],
        grad: &[f32],
        m: &mut [bf16],
        v: &mut [bf16],
        hp: &AdamWStep,
    ) -> Result<()> {
        // bf16 is its 16 bits: the kernel's unsigned short.
        adamw(self, "adamw_step_bf16_moments", param, grad, (m, v), hp)
    }

    fn moe_route(&self, logits: &[f32], bias: Option<&[f32]>, cfg: &RouterConfig) -> Result<Routed> {
        let (e, k, groups) = (cfg.n_experts, cfg.top_k, cfg.n_group);
        let t = logits.len() / e;
        let shared = 4 * (3 * e + 2 * THREADS as usize + 2 * groups);
        let (mut ids, mut weights, mut scores) = (vec![0u32; t * k], vec![0.0f32; t * k], vec![0.0f32; t * e]);
        let args = &mut [
            Arg::input(logits),
            Arg::input(bias.unwrap_or(&[0.0])),
            Arg::value(i32::from(bias.is_some())),
            Arg::output(&mut ids),
            Arg::output(&mut weights),
            Arg::output(&mut scores),
            u32_of(e),
            u32_of(groups),
            u32_of(cfg.topk_group),
            u32_of(k),
            Arg::value(i32::from(cfg.sigmoid)),
            Arg::value(i32::from(cfg.norm_topk_prob)),
            Arg::value(cfg.routed_scaling_factor),
        ];
        self.launch("moe_route_f32", Launch::new((t as u32, 1, 1), (THREADS, 1, 1), shared as u32), args)?;
        Ok(Routed { ids: ids.into_iter().map(|i| i as usize).collect(), weights, scores })
    }

    fn moe_permute(&self, x: &[f32], dim: usize, plan: &DispatchPlan, scale: Option<&[f32]>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; plan.len() * dim];
        let has_scale = i32::from(scale.is_some());
        let args = &mut [
            Arg::input(x),
            Arg::input(&plan.rows),
            Arg::input(scale.unwrap_or(x)),
            Arg::value(has_scale),
            Arg::output(&mut out),
            u32_of(plan.len()),
            u32_of(dim),
        ];
        self.launch("moe_permute_f32", grid_for(plan.len() * dim), args)?;
        Ok(out)
    }

    fn moe_unpermute(&self, y: &[f32], dim: usize, plan: &DispatchPlan, weight: Option<&[f32]>) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; plan.n_tokens() * dim];
        let has_weight = i32::from(weight.is_some());
        let threads = (dim as u32).next_power_of_two().clamp(32, THREADS);
        let cfg = Launch::new((plan.n_tokens() as u32, 1, 1), (threads, 1, 1), 0);
        let args = &mut [
            Arg::input(y),
            Arg::input(weight.unwrap_or(y)),
            Arg::value(has_weight),
            Arg::input(&plan.token_offsets),
            Arg::input(&plan.token_rows),
            Arg::output(&mut out),
            u32_of(dim),
        ];
        self.launch("moe_unpermute_f32", cfg, args)?;
        Ok(out)
    }

    fn moe_unpermute_weight_grad(&self, dout: &[f32], y: &[f32], dim: usize, plan: &DispatchPlan) -> Result<Vec<f32>> {
        let mut dweight = vec![0.0f32; plan.len()];
        let cfg = Launch::new((plan.len() as u32, 1, 1), (THREADS, 1, 1), 8 * THREADS);
        let args =
            &mut [Arg::input(dout), Arg::input(y), Arg::input(&plan.rows), Arg::output(&mut dweight), u32_of(dim)];
        self.launch("moe_unpermute_weight_grad_f32", cfg, args)?;
        Ok(dweight)
    }

    fn round_trip_bf16(&self, x: &[f32]) -> Result<(Vec<bf16>, Vec<f32>)> {
        let n = x.len();
        let (mut bits, mut back) = (vec![0u16; n], vec![0.0f32; n]);
        self.launch("f32_to_bf16", grid_for(n), &mut [Arg::input(x), Arg::output(&mut bits), u32_of(n)])?;
        self.launch("bf16_to_f32", grid_for(n), &mut [Arg::input(&bits), Arg::output(&mut back), u32_of(n)])?;
        Ok((bits.into_iter().map(bf16::from_bits).collect(), back))
    }

    fn fp8_quantize_1x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let blocks = rows * cols.div_ceil(128);
        quantize(self, "fp8_quantize_1x128", x, (rows, cols), Launch::new((blocks as u32, 1, 1), (128, 1, 1), 0), 1)
    }

    fn fp8_quantize_128x128(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let blocks = rows.div_ceil(128) * cols.div_ceil(128);
        quantize(self, "fp8_quantize_128x128", x, (rows, cols), Launch::new((blocks as u32, 1, 1), (256, 1, 1), 0), 128)
    }

    fn fp8_quantize_transposed(&self, x: &[f32], rows: usize, cols: usize) -> Result<Fp8Blocks> {
        let tiles = rows.div_ceil(128);
        let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0.0f32; cols * tiles]);
        let cfg = Launch::new((tiles as u32, cols.div_ceil(32) as u32, 1), (256, 1, 1), 0);
        let args = &mut [Arg::input(x), Arg::output(&mut codes), Arg::output(&mut scales), u32_of(rows), u32_of(cols)];
        self.launch("fp8_quantize_1x128_transposed", cfg, args)?;
        Fp8Blocks::from_parts(codes, scales, (cols, rows), (1, 128), Fp8Format::E4M3)
    }

    fn fp8_dequantize(&self, q: &Fp8Blocks) -> Result<Vec<f32>> {
        let n = q.rows * q.cols;
        let mut out = vec![0.0f32; n];
        let args = &mut [
            Arg::input(&q.codes),
            Arg::input(&q.scales),
            Arg::output(&mut out),
            u32_of(q.rows),
            u32_of(q.cols),
            u32_of(q.block.0),
            u32_of(q.block.1),
            Arg::value(i32::from(q.format == Fp8Format::E5M2)),
        ];
        self.launch("fp8_dequantize", grid_for(n), args)?;
        Ok(out)
    }

    fn fp8_gemm_with(&self, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel) -> Result<Vec<f32>> {
        let (m, n, k) = (a.rows, b.rows, a.cols);
        // The emulation is an H200 (sm_90): the kernels it runs are those one runs.
        if b.cols != k || !kernel.runs_on((9, 0), k) {
            return Err(format!("fp8 gemm: {kernel:?} over [{m}, {k}] x [{n}, {}]ᵀ", b.cols));
        }
        let mut y = vec![0.0f32; m * n];
        let tiles = ((n as u32).div_ceil(128), (m as u32).div_ceil(128), 1);
        let cfg = match kernel {
            Fp8GemmKernel::Wgmma => Launch::new(tiles, (256, 1, 1), WGMMA_SHARED_BYTES as u32),
            Fp8GemmKernel::TensorCore => Launch::new(tiles, (256, 1, 1), 0),
            Fp8GemmKernel::Simple => Launch::new(((n as u32).div_ceil(16), (m as u32).div_ceil(16), 1), (16, 16, 1), 0),
        };
        let args = &mut [
            Arg::input(&a.codes),
            Arg::input(&a.scales),
            u32_of(a.block.0),
            Arg::input(&b.codes),
            Arg::input(&b.scales),
            u32_of(b.block.0),
            Arg::output(&mut y),
            u32_of(m),
            u32_of(n),
            u32_of(k),
        ];
        self.launch(kernel.entry(), cfg, args)?;
        Ok(y)
    }

    fn fp8_transpose(&self, w: &Fp8Blocks) -> Result<Fp8Blocks> {
        let (rows, cols) = (w.rows, w.cols);
        let grid = (rows.div_ceil(128), cols.div_ceil(128));
        let (codes, scales) = (
            transpose(self, "fp8_transpose_codes", &w.codes, (rows, cols))?,
            transpose(self, "fp8_transpose_scales", &w.scales, grid)?,
        );
        Fp8Blocks::from_parts(codes, scales, (cols, rows), (128, 128), w.format)
    }
}

/// An AdamW `kernel` with moments stored as `T`, launched as the launcher launches it.
fn adamw<T>(
    e: &Emulator,
    kernel: &str,
    param: &mut [f32],
    grad: &[f32],
    (m, v): (&mut [T], &mut [T]),
    hp: &AdamWStep,
) -> Result<()> {
    let (n, s) = (param.len(), AdamWScalars::new(hp));
    let args = &mut [
        Arg::output(param),
        Arg::input(grad),
        Arg::output(m),
        Arg::output(v),
        u32_of(n),
        Arg::value(s.decay),
        Arg::value(s.lerp_coeff),
        Arg::value(i32::from(s.lerp_from_m)),
        Arg::value(s.beta2),
        Arg::value(s.one_minus_beta2),
        Arg::value(s.bias_correction2_sqrt),
        Arg::value(s.eps),
        Arg::value(s.neg_step_size),
    ];
    e.launch(kernel, grid_for(n), args)
}

/// fp8_quantize_1x128 or fp8_quantize_128x128 (`block_rows` 1 or 128) of `x` `[rows, cols]`.
fn quantize(
    e: &Emulator,
    kernel: &str,
    x: &[f32],
    (rows, cols): (usize, usize),
    cfg: Launch,
    block_rows: usize,
) -> Result<Fp8Blocks> {
    let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0.0f32; cfg.grid.0 as usize]);
    let args = &mut [Arg::input(x), Arg::output(&mut codes), Arg::output(&mut scales), u32_of(rows), u32_of(cols)];
    e.launch(kernel, cfg, args)?;
    Fp8Blocks::from_parts(codes, scales, (rows, cols), (block_rows, 128), Fp8Format::E4M3)
}

/// `x` `[rows, cols]` transposed by `kernel` (32 x 32 tiles, 32 x 8 threads).
fn transpose<T: Copy + Default>(e: &Emulator, kernel: &str, x: &[T], (rows, cols): (usize, usize)) -> Result<Vec<T>> {
    let mut y = vec![T::default(); rows * cols];
    let cfg = Launch::new((cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1), (32, 8, 1), 0);
    e.launch(kernel, cfg, &mut [Arg::input(x), Arg::output(&mut y), u32_of(rows), u32_of(cols)])?;
    Ok(y)
}
