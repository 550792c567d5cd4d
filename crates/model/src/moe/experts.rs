//! The DeepSeekMoE layer: route, dispatch tokens to experts as contiguous blocks (sorted by
//! expert, a grouped matmul), run each expert once on its block, combine with the routing
//! weights, add the shared experts.

use std::sync::Arc;

use whale_tensor::fp8::{Fp8Recipe, ScaleFormat};
use whale_tensor::{Device, Tensor, TokenDispatch};

use super::balance::RealTokens;
use super::router::{Router, Routing};
use crate::config::DeepSeekV3Config;
use crate::nn::{in_dtype_of, ParamBuilder, SwiGluMlp};
use crate::Result;

/// Where the routed experts run: the hook expert parallelism plugs into (whale-parallel shards
/// the experts over ranks and sends each token to the ranks of its experts). Without one, a
/// [`DeepSeekMoE`] runs all its experts here.
pub trait ExpertDispatch: Send + Sync + std::fmt::Debug {
    /// `[T, hidden]`: the routed experts' weighted outputs for `tokens` (`[T, hidden]`), as
    /// `routing` chose them.
    fn dispatch_and_combine(&self, moe: &DeepSeekMoE, tokens: &Tensor, routing: &Routing) -> Result<Tensor>;
}

#[derive(Debug, Clone)]
pub struct DeepSeekMoE {
    pub gate: Router,
    pub experts: Vec<SwiGluMlp>,
    /// One fused MLP of width `n_shared_experts * moe_intermediate_size`, always applied.
    pub shared_experts: Option<SwiGluMlp>,
    pub seq_aux_alpha: f32,
    pub aux_loss_alpha: f32,
    /// Expert parallelism: where the routed experts run (`None`: all here).
    pub dispatch: Option<Arc<dyn ExpertDispatch>>,
    /// The routed and shared experts' SwiGLU MLPs keep no activations for the backward and run
    /// again there (DeepSeek-V3 recomputes its MoE SwiGLU outputs, TR 3.3.2; the router stays
    /// outside, so its loads and balance loss are taken once). The decoder layer's
    /// [`crate::nn::Recompute::mlp`].
    pub recompute_experts: bool,
    /// Low-precision communication (DeepSeek-V3, TR 3.3.2): the routed experts' inputs are
    /// rounded as an FP8 dispatch sends them, and in the backward so are the gradients of their
    /// combined output (before the down-projections); the combine stays high precision. The same
    /// numbers on one rank as under expert parallelism, whose all-to-alls then carry the codes.
    /// FP8 experts read those inputs with power-of-two tile scales, i.e. as the codes that
    /// arrived (V3's expert GEMMs consume the dispatched FP8; f32 scales would round again).
    pub fp8_dispatch: bool,
}

/// How [`run_experts`] runs the experts: the layer's [`DeepSeekMoE::recompute_experts`] and
/// [`DeepSeekMoE::fp8_dispatch`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertRun {
    /// Keep no activations of the experts' MLPs; run them again in the backward.
    pub recompute: bool,
    /// The rows were rounded by an FP8 dispatch: FP8 experts read them with UE8M0 tile scales.
    pub fp8_dispatched: bool,
}

/// What one MoE layer returns besides its output.
#[derive(Debug, Clone)]
pub struct MoeOutput {
    pub output: Tensor,
    /// Real tokens (all without a [`RealTokens`]) routed to each expert in this call.
    pub load: Vec<usize>,
    /// The balance losses that are enabled (sequence-wise and/or batch-level), already weighted.
    pub aux_loss: Option<Tensor>,
}

impl DeepSeekMoE {
    pub fn new(b: &mut ParamBuilder<'_>, cfg: &DeepSeekV3Config) -> Result<Self> {
        let (d, w) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let gate = Router::new(&mut b.sub("gate"), cfg)?;
        let experts = (0..cfg.n_routed_experts)
            .map(|i| SwiGluMlp::new(&mut b.sub(&format!("experts.{i}")), d, w))
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = if cfg.n_shared_experts > 0 {
            Some(SwiGluMlp::new(&mut b.sub("shared_experts"), d, w * cfg.n_shared_experts)?)
        } else {
            None
        };
        Ok(DeepSeekMoE {
            gate,
            experts,
            shared_experts,
            seq_aux_alpha: cfg.seq_aux_alpha as f32,
            aux_loss_alpha: cfg.aux_loss_alpha as f32,
            dispatch: None,
            recompute_experts: false,
            fp8_dispatch: false,
        })
    }

    /// FP8 GEMMs in every routed and shared expert (the router stays f32).
    pub fn set_fp8(&mut self, recipe: Option<Fp8Recipe>) {
        self.experts.iter_mut().chain(self.shared_experts.as_mut()).for_each(|e| e.set_fp8(recipe));
    }

    /// Every routed and shared expert keeps its SwiGLU's inputs in FP8 when it trains in FP8
    /// ([`SwiGluMlp::fp8_swiglu_cache`]).
    pub fn set_fp8_swiglu_cache(&mut self, on: bool) {
        self.experts.iter_mut().chain(self.shared_experts.as_mut()).for_each(|e| e.fp8_swiglu_cache = on);
    }

    /// `x`: `[batch, seq, hidden]`; `real`: which of its tokens count in the load and the balance
    /// losses (`None`: all). Padding is still routed and computed (rows are independent: no real
    /// token reads it).
    pub fn forward(&self, x: &Tensor, real: Option<&RealTokens>) -> Result<MoeOutput> {
        let dims = x.dims().to_vec();
        let (batch, seq, d) = (dims[0], dims[1], dims[2]);
        if let Some(r) = real.filter(|r| r.dims() != (batch, seq)) {
            return Err(crate::Error::Model(format!(
                "MoE: real tokens {:?} for a batch of {:?}",
                r.dims(),
                (batch, seq)
            )));
        }
        let tokens = x.reshape(&[batch * seq, d])?;
        let routing = self.gate.route(&tokens)?;
        let routed = self.dispatch_and_combine(&tokens, &routing)?;
        let out = match &self.shared_experts {
            Some(shared) => {
                // `tokens` has other readers (the router, the routed experts): given twice (see
                // `SwiGluMlp::forward_pair`), a recomputed MLP keeps the gradients' bits. That
                // rests on the backward's order (`backprop::topo_order`) taking the gate's and the
                // up projection's gradients one after the other, as the node's two inputs are;
                // tests/recompute.rs holds it to the bit.
                let out = if self.recompute_experts {
                    let shared = shared.clone();
                    let mlp = move |x: &[Tensor]| shared.forward_pair(&x[0], &x[1]);
                    whale_tensor::checkpoint("shared experts", &[&tokens, &tokens], mlp)?
                } else {
                    shared.forward(&tokens)?
                };
                routed.add(&out)?
            }
            None => routed,
        };
        let Some(real) = real else {
            let aux_loss = self.balance_losses(&routing, batch, seq)?;
            return Ok(MoeOutput { output: out.reshape(&dims)?, load: routing.load, aux_loss });
        };
        let k = self.gate.top_k;
        let mut load = vec![0usize; routing.load.len()];
        routing.experts.iter().enumerate().filter(|(slot, _)| real.is_real(slot / k)).for_each(|(_, &e)| load[e] += 1);
        let aux_loss = self.balance_losses_of_real(&routing, real, &load)?;
        Ok(MoeOutput { output: out.reshape(&dims)?, load, aux_loss })
    }

    /// The routed experts' weighted outputs for every token, here or through `self.dispatch`,
    /// in FP8 with [`Self::fp8_dispatch`].
    fn dispatch_and_combine(&self, tokens: &Tensor, routing: &Routing) -> Result<Tensor> {
        if self.fp8_dispatch {
            return Ok(self.run_routed(&tokens.fp8_comm_round()?, routing)?.fp8_comm_round_grad()?);
        }
        self.run_routed(tokens, routing)
    }

    fn run_routed(&self, tokens: &Tensor, routing: &Routing) -> Result<Tensor> {
        if let Some(d) = &self.dispatch {
            return d.dispatch_and_combine(self, tokens, routing);
        }
        let k = self.gate.top_k;
        let assignments: Vec<(usize, usize)> =
            routing.experts.iter().enumerate().map(|(slot, &e)| (slot / k, e)).collect();
        run_experts(&self.experts, tokens, &assignments, &routing.weights.flatten_all()?, self.expert_run())
    }

    /// How this layer's routed experts run ([`run_experts`]).
    pub fn expert_run(&self) -> ExpertRun {
        ExpertRun { recompute: self.recompute_experts, fp8_dispatched: self.fp8_dispatch }
    }

    /// Spec section 2.4: `alpha * sum_i f_i P_i` with `f_i = E/(K T) * count_i` (from the actual
    /// routing, no gradient) and `P_i` the mean of the affinities normalised over all experts.
    /// Sequence-wise: per sequence, averaged over the batch. Batch-level: over all tokens.
    fn balance_losses(&self, routing: &Routing, batch: usize, seq: usize) -> Result<Option<Tensor>> {
        let (e, k) = (self.gate.n_experts(), self.gate.top_k);
        let mut total: Option<Tensor> = None;
        let normalised = || -> Result<Tensor> { Ok(routing.scores.div(&routing.scores.sum_keepdim(1)?)?) };
        let mut add = |t: Tensor| -> Result<()> {
            total = Some(match total.take() {
                Some(prev) => prev.add(&t)?,
                None => t,
            });
            Ok(())
        };
        if self.seq_aux_alpha > 0.0 {
            let mut f = vec![0.0f32; batch * e];
            for (slot, &ex) in routing.experts.iter().enumerate() {
                f[(slot / k / seq) * e + ex] += e as f32 / (k * seq) as f32;
            }
            let f = Tensor::from_vec(f, &[batch, e], &routing.scores.device())?;
            let p = normalised()?.reshape(&[batch, seq, e])?.mean(1)?;
            add(f.mul(&p)?.sum(1)?.mean_all()?.mul_scalar(self.seq_aux_alpha)?)?;
        }
        if self.aux_loss_alpha > 0.0 {
            let t = batch * seq;
            let f: Vec<f32> = routing.load.iter().map(|&c| c as f32 * e as f32 / (k * t) as f32).collect();
            let f = Tensor::from_vec(f, &[e], &routing.scores.device())?;
            let p = normalised()?.mean(0)?;
            add(f.mul(&p)?.sum_all()?.mul_scalar(self.aux_loss_alpha)?)?;
        }
        Ok(total)
    }

    /// [`Self::balance_losses`] over the `real` tokens only (`load`: theirs): each sequence's T
    /// is its real tokens, and `P_i` their mean affinity; a sequence without one adds nothing and
    /// is not counted in the batch mean.
    fn balance_losses_of_real(&self, routing: &Routing, real: &RealTokens, load: &[usize]) -> Result<Option<Tensor>> {
        let (e, k) = (self.gate.n_experts(), self.gate.top_k);
        let (batch, seq) = real.dims();
        let device = routing.scores.device();
        let counts: Vec<usize> = (0..batch).map(|b| real.in_row(b)).collect();
        let (rows, total) = (counts.iter().filter(|&&c| c > 0).count(), counts.iter().sum::<usize>());
        if total == 0 || (self.seq_aux_alpha <= 0.0 && self.aux_loss_alpha <= 0.0) {
            return Ok(None);
        }
        // Affinities normalised over all experts, zero on padding.
        let masked = routing.scores.div(&routing.scores.sum_keepdim(1)?)?.mul(&real.column(&device)?)?;
        let mut total_loss: Option<Tensor> = None;
        if self.seq_aux_alpha > 0.0 {
            let mut f = vec![0.0f32; batch * e];
            for (slot, &ex) in routing.experts.iter().enumerate().filter(|(slot, _)| real.is_real(slot / k)) {
                let b = slot / k / seq;
                f[b * e + ex] += e as f32 / (k * counts[b]) as f32;
            }
            let f = Tensor::from_vec(f, &[batch, e], &device)?;
            let inv: Vec<f32> = counts.iter().map(|&c| if c == 0 { 0.0 } else { 1.0 / c as f32 }).collect();
            let p = masked.reshape(&[batch, seq, e])?.sum(1)?.mul(&Tensor::from_vec(inv, &[batch, 1], &device)?)?;
            let per_row = f.mul(&p)?.sum(1)?;
            total_loss = Some(per_row.sum_all()?.mul_scalar(self.seq_aux_alpha / rows as f32)?);
        }
        if self.aux_loss_alpha > 0.0 {
            let f: Vec<f32> = load.iter().map(|&c| c as f32 * e as f32 / (k * total) as f32).collect();
            let f = Tensor::from_vec(f, &[e], &device)?;
            let p = masked.sum(0)?.mul_scalar(1.0 / total as f32)?;
            let batch_loss = f.mul(&p)?.sum_all()?.mul_scalar(self.aux_loss_alpha)?;
            total_loss = Some(match total_loss {
                Some(prev) => prev.add(&batch_loss)?,
                None => batch_loss,
            });
        }
        Ok(total_loss)
    }
}

/// Runs `experts` on the rows of `x` (`[rows, hidden]`) assigned to them and sums each row's
/// weighted outputs: `out[r] = sum over (r, e) in assignments of w * E_e(x[r])`, with `weights`
/// (`[assignments.len()]`, differentiable) in the order of `assignments`. The rows are permuted
/// into expert order (stably, so each expert's block keeps row order) and every expert runs once
/// on its contiguous block: a grouped GEMM, or one FP8 linear per expert. The combine gathers
/// each row's outputs back in a fixed order (deterministic on every device). `how` says whether
/// the experts' MLPs keep their activations and how FP8 experts read their input.
pub fn run_experts(
    experts: &[SwiGluMlp],
    x: &Tensor,
    assignments: &[(usize, usize)],
    weights: &Tensor,
    how: ExpertRun,
) -> Result<Tensor> {
    let dispatch = TokenDispatch::new(assignments, x.dims()[0], experts.len())?;
    let dispatched = x.moe_permute(&dispatch)?;
    let expert_out = if how.recompute {
        // The region owns the experts it reruns (a copy of every handle: only when recomputing).
        let (owned, sizes) = (experts.to_vec(), dispatch.plan.sizes.clone());
        let mlps = move |x: &[Tensor]| expert_mlps(&owned, &x[0], &sizes, how.fp8_dispatched);
        whale_tensor::checkpoint("routed experts", &[&dispatched], mlps)?
    } else {
        expert_mlps(experts, &dispatched, &dispatch.plan.sizes, how.fp8_dispatched)?
    };
    // The gate weights in dispatch order. Indices are host data on every device (the CUDA ops
    // copy them in).
    let slots: Vec<i64> = dispatch.plan.slots.iter().map(|&s| i64::from(s)).collect();
    let slots = Tensor::from_vec(slots, &[dispatch.plan.len()], &Device::Cpu)?;
    let w = in_dtype_of(&weights.index_select(0, &slots)?, x)?;
    Ok(expert_out.moe_unpermute(&w, &dispatch)?)
}

/// Each expert's SwiGLU MLP on its block of `dispatched` (`[rows, hidden]`, expert after expert,
/// `sizes[e]` rows each); FP8 experts read rows an FP8 dispatch delivered with UE8M0 tile scales.
fn expert_mlps(experts: &[SwiGluMlp], dispatched: &Tensor, sizes: &[usize], fp8_dispatched: bool) -> Result<Tensor> {
    Ok(if experts.iter().any(SwiGluMlp::is_fp8) {
        // FP8 experts quantize their own block (its 1x128 tiles are per token anyway). An
        // expert without tokens runs on its empty block too, so its weights get zero gradients
        // (as the grouped GEMM's empty groups do) and AdamW still decays them.
        let mut start = 0;
        let mut blocks = Vec::with_capacity(experts.len());
        for (e, &size) in experts.iter().zip(sizes) {
            let block = dispatched.narrow(0, start, size)?;
            blocks.push(if fp8_dispatched {
                e.with_input_scales(ScaleFormat::Ue8m0).forward(&block)?
            } else {
                e.forward(&block)?
            });
            start += size;
        }
        Tensor::cat(&blocks, 0)?
    } else {
        let weights = |f: fn(&SwiGluMlp) -> &Tensor| -> Result<Vec<Tensor>> {
            experts.iter().map(|e| in_dtype_of(f(e), dispatched)).collect()
        };
        let gate = Tensor::grouped_matmul(dispatched, sizes, &weights(|e| &e.gate_proj.weight)?)?;
        let up = Tensor::grouped_matmul(dispatched, sizes, &weights(|e| &e.up_proj.weight)?)?;
        let hidden = Tensor::swiglu(&gate, &up)?;
        Tensor::grouped_matmul(&hidden, sizes, &weights(|e| &e.down_proj.weight)?)?
    })
}
