//! Pipeline parallelism with real model stages: a [`StagePlan`] splits the decoder layers into
//! stages (the embedding goes with the first, the final norm, output head and MTP modules with the
//! last), and [`run_step`] executes one rank's op list of a [`Schedule`] (1F1B, ZB1P, DualPipe,
//! DualPipeV) on the ranks of a [`Comm`]:
//!
//! - `F` runs the stage's layers on the activation received from the previous stage (or the
//!   embedding) and sends its output on; the last stage computes the losses.
//! - `B` receives the output's gradient, runs the stage's backward and sends the input gradient
//!   back; `b` does only the input half (ZeroBubble's B) and queues the weight half, which the
//!   next `W` runs.
//! - `[F&B]` runs its forward and its backward on two threads at once, so that while one waits for
//!   a message the other computes: DualPipe's overlap of a forward chunk with a backward chunk.
//!
//! Each rank holds a whole copy of the model and runs only the layers of its stages. After the
//! last op the gradients are summed over the ranks: a parameter's gradient is non-zero only where
//! its stage ran, so this adds up DualPipe's two copies of each stage (rank `r` and its mirror
//! `PP - 1 - r`) and the embedding used by the first stage and by the MTP modules on the last.
//! Each micro-batch's loss is divided by the number of micro-batches, so the step's gradients are
//! those of the mean loss, as on one device.
//!
//! Every stage of a path must take part in the same collectives in the same order; expert
//! parallelism inside stages keeps that under overlap by running forward and backward
//! all-to-alls on separate communicators (`expert_parallel::EpComms`).
//!
//! [`Pipeline::run_ops`] is the same step without the final sums, for data-parallel replicas of a pipeline
//! ([`crate::parallel_trainer`]): it leaves the gradients where they were computed and returns the
//! rank's losses and expert loads, to be summed over the whole world at once.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use whale_model::moe::RealTokens;
use whale_model::tensor::{DType, Device, Tensor, WeightGradWork};
use whale_model::{DeepSeekV3, IGNORE_INDEX};

use crate::comm::{Comm, ReduceOp};
use crate::schedule::{Op, Schedule, Work};
use crate::threads::COMPUTE_STACK;
use crate::trainer::Accumulated;
use crate::{Error, Result};

/// Which decoder layers each pipeline stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagePlan {
    pub layers: Vec<Range<usize>>,
}

impl StagePlan {
    /// `n_layers` layers in `stages` contiguous runs as even as possible; the earlier stages take
    /// the remainder, since the last one also carries the head and the MTP modules.
    pub fn even(n_layers: usize, stages: usize) -> Result<Self> {
        if stages == 0 || stages > n_layers {
            return Err(Error::Train(format!("cannot split {n_layers} decoder layers into {stages} pipeline stages")));
        }
        let (base, extra) = (n_layers / stages, n_layers % stages);
        let mut start = 0;
        let layers = (0..stages)
            .map(|s| {
                let len = base + usize::from(s < extra);
                start += len;
                start - len..start
            })
            .collect();
        Ok(StagePlan { layers })
    }
}

/// One micro-batch: `[batch, seq]` token ids and targets.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    pub input_ids: Tensor,
    pub targets: Tensor,
}

/// What one rank did in a step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// The step's loss (mean over micro-batches: main + weighted MTP + balance), summed over ranks.
    pub loss: f64,
    /// The mean next-token loss over micro-batches.
    pub main_loss: f64,
    /// Seconds this rank spent in its ops (compute and waiting for messages inside them).
    pub seconds: f64,
}

/// Options of the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execution {
    /// Run the two halves of an `[F&B]` pair on two threads at once.
    pub overlap: bool,
}

impl Default for Execution {
    fn default() -> Self {
        Execution { overlap: true }
    }
}

/// A forward whose backward is still to come.
struct Pending {
    /// The received activation (an input variable), absent on a path's first stage.
    input: Option<Tensor>,
    /// What the backward starts from: the output hidden state (or the loss on the last stage).
    output: Tensor,
    /// This stage's balance losses (already divided by the micro-batch count).
    aux: Option<Tensor>,
}

/// Where a piece of work sits: its path, its stage on the path, the micro-batch's global index.
#[derive(Debug, Clone, Copy)]
struct At {
    path: usize,
    stage: usize,
    global_micro: usize,
}

const ACTIVATION: u64 = 0;
const GRADIENT: u64 = 1;

/// Runs `schedule`'s op list for `comm.rank()` over `micro` (all micro-batches, paths in order:
/// DualPipe's first half enters at rank 0, its second half at the last rank), then sums the
/// gradients over the ranks. `model` is this rank's copy; its parameters' gradients hold the
/// step's gradients afterwards.
pub fn run_step(
    comm: &dyn Comm,
    schedule: &Schedule,
    plan: &StagePlan,
    model: &DeepSeekV3,
    micro: &[MicroBatch],
    exec: Execution,
) -> Result<StepReport> {
    let t0 = Instant::now();
    let local = Pipeline { schedule, plan, exec }.run_ops(comm, model, micro, 1.0 / micro.len().max(1) as f32)?;
    let seconds = t0.elapsed().as_secs_f64();
    sum_gradients(comm, model)?;
    let mut totals = [local.loss, local.main_loss];
    comm.all_reduce_f64(&mut totals)?;
    Ok(StepReport { loss: totals[0], main_loss: totals[1], seconds })
}

/// A pipeline as its ranks run it: the schedule, the layers of each stage, and how `[F&B]` pairs
/// execute.
#[derive(Debug, Clone, Copy)]
pub struct Pipeline<'a> {
    pub schedule: &'a Schedule,
    pub plan: &'a StagePlan,
    pub exec: Execution,
}

impl Pipeline<'_> {
    /// This rank's part of a step, without any reduction: [`run_step`]'s ops with every
    /// micro-batch's loss multiplied by `loss_scale` (`1 / micro.len()` there;
    /// `1 / (dp micro.len())` when data-parallel replicas add their pipelines up). The gradients
    /// stay where they were computed (this rank's stages); the result holds this rank's shares of
    /// the losses (the last stage's, and the balance losses of the others), the expert loads of
    /// the MoE layers it ran (every MoE layer of the model has an entry, zeros for the others', so
    /// they add up across ranks), and a non-finite loss with its micro-batch and stage.
    pub fn run_ops(
        &self,
        comm: &dyn Comm,
        model: &DeepSeekV3,
        micro: &[MicroBatch],
        loss_scale: f32,
    ) -> Result<Accumulated> {
        let Pipeline { schedule, plan, exec } = *self;
        let rank = comm.rank();
        if comm.world_size() != schedule.ranks.len() {
            return Err(Error::Train(format!(
                "{} schedule has {} ranks but the communicator {}",
                schedule.method,
                schedule.ranks.len(),
                comm.world_size()
            )));
        }
        if plan.layers.len() != schedule.stages {
            return Err(Error::Train(format!(
                "{} stages planned for a {}-stage schedule",
                plan.layers.len(),
                schedule.stages
            )));
        }
        if micro.len() != schedule.micro {
            return Err(Error::Train(format!("{} micro-batches for a schedule of {}", micro.len(), schedule.micro)));
        }
        let runner =
            Runner { comm, schedule, plan, model, micro, scale: loss_scale, local: Mutex::new(HashMap::new()) };
        let mut pending: HashMap<Work, Pending> = HashMap::new();
        let mut deferred: VecDeque<(Work, WeightGradWork)> = VecDeque::new();
        let mut total = nothing_measured(model);
        for op in &schedule.ranks[rank] {
            match *op {
                Op::F(w) => {
                    let (p, measured) = runner.forward(w)?;
                    add(&mut total, measured);
                    pending.insert(w, p);
                }
                Op::B(w) | Op::BInput(w) => {
                    let p = pending.remove(&w).ok_or_else(|| runner.order_error(op))?;
                    if let Some(work) = runner.backward(w, p, matches!(op, Op::BInput(_)))? {
                        deferred.push_back((w, work));
                    }
                }
                Op::W(w) => {
                    let (first, work) = deferred.pop_front().ok_or_else(|| runner.order_error(op))?;
                    if first != w {
                        return Err(Error::Train(format!("rank {rank}: {op} but the oldest deferred b is {first}")));
                    }
                    work.run()?;
                }
                Op::FB { f, b } => {
                    let p = pending.remove(&b).ok_or_else(|| runner.order_error(op))?;
                    let ((fp, measured), work) = if exec.overlap {
                        std::thread::scope(|s| {
                            let fwd = std::thread::Builder::new()
                                .name(format!("rank {rank} forward"))
                                .stack_size(COMPUTE_STACK)
                                .spawn_scoped(s, || {
                                    runner.comm.join_thread();
                                    runner.forward(f)
                                })
                                .map_err(|e| Error::Train(format!("rank {rank}: spawning {op}'s forward: {e}")))?;
                            let bwd = runner.backward(b, p, false);
                            let fwd = fwd
                                .join()
                                .map_err(|_| Error::Train(format!("rank {rank}: the forward of {op} panicked")))?;
                            Ok::<_, Error>((fwd?, bwd?))
                        })?
                    } else {
                        (runner.forward(f)?, runner.backward(b, p, false)?)
                    };
                    debug_assert!(work.is_none(), "a pair's backward is a full one");
                    add(&mut total, measured);
                    pending.insert(f, fp);
                }
            }
        }
        if !pending.is_empty() || !deferred.is_empty() {
            return Err(Error::Train(format!("rank {rank}: the schedule left forwards without their backward")));
        }
        Ok(total)
    }
}

/// No losses yet, and a zero load for every MoE layer of `model`.
fn nothing_measured(model: &DeepSeekV3) -> Accumulated {
    Accumulated { loads: model.moe_layers().iter().map(|m| vec![0; m.experts.len()]).collect(), ..Default::default() }
}

/// Adds one forward's measurements to the rank's; the first problem stays.
fn add(total: &mut Accumulated, part: Accumulated) {
    let opt_add = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (None, None) => None,
        _ => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    };
    total.loss += part.loss;
    total.main_loss += part.main_loss;
    total.mtp_loss = opt_add(total.mtp_loss, part.mtp_loss);
    total.aux_loss = opt_add(total.aux_loss, part.aux_loss);
    total.loads.iter_mut().flatten().zip(part.loads.iter().flatten()).for_each(|(t, x)| *t += x);
    if total.problem.is_none() {
        total.problem = part.problem;
    }
}

/// Every parameter's gradient summed over the ranks (missing ones count as zero), in one
/// all-reduce of the flattened gradients and a has-gradient flag per parameter. A parameter no
/// rank gave a gradient keeps none, as on one device (AdamW leaves it alone; a zero gradient
/// would still decay it and move it by its momentum).
fn sum_gradients(comm: &dyn Comm, model: &DeepSeekV3) -> Result<()> {
    let params: Vec<&Tensor> = model.params.iter().map(|(_, p)| p).collect();
    let mut flat = Vec::new();
    for p in &params {
        match p.grad() {
            Some(g) => flat.extend(g.to_vec_f32()?),
            None => flat.extend(std::iter::repeat_n(0.0, p.elem_count())),
        }
    }
    let values = flat.len();
    flat.extend(params.iter().map(|p| p.grad().is_some() as u8 as f32));
    comm.all_reduce(&mut flat, ReduceOp::Sum)?;
    let present = flat.split_off(values);
    let mut start = 0;
    for (p, present) in params.into_iter().zip(present) {
        let n = p.elem_count();
        let grad = (present > 0.0)
            .then(|| Tensor::from_vec(flat[start..start + n].to_vec(), p.dims(), &Device::Cpu))
            .transpose()?;
        p.set_grad(grad)?;
        start += n;
    }
    Ok(())
}

struct Runner<'a> {
    comm: &'a dyn Comm,
    schedule: &'a Schedule,
    plan: &'a StagePlan,
    model: &'a DeepSeekV3,
    micro: &'a [MicroBatch],
    scale: f32,
    /// Hand-offs between two stages of one rank (DualPipeV's turn): (micro-batch, stage, kind).
    local: Mutex<HashMap<(usize, usize, u64), Tensor>>,
}

impl Runner<'_> {
    fn locate(&self, w: Work) -> Result<At> {
        let rank = self.comm.rank();
        let (path, stage) = self
            .schedule
            .locate(rank, w.chunk)
            .ok_or_else(|| Error::Train(format!("rank {rank} holds no chunk {}", w.chunk)))?;
        let global_micro = self.schedule.paths[..path].iter().map(|p| p.micro).sum::<usize>() + w.micro;
        Ok(At { path, stage, global_micro })
    }

    fn order_error(&self, op: &Op) -> Error {
        Error::Train(format!("rank {}: {op} comes before the op it depends on", self.comm.rank()))
    }

    /// A message's tag: what it is (activation or gradient), for which path, stage and micro-batch.
    fn tag(at: At, stage: usize, kind: u64) -> u64 {
        (((at.path as u64 * 4096 + stage as u64) << 32) | at.global_micro as u64) * 2 + kind
    }

    /// Sends `t` to the rank holding `stage` of the path (or keeps it, when that is this rank).
    fn give(&self, at: At, stage: usize, kind: u64, t: &Tensor) -> Result<()> {
        let to = self.schedule.paths[at.path].stages[stage].rank;
        if to == self.comm.rank() {
            self.local.lock().expect("hand-off lock").insert((at.global_micro, stage, kind), t.detach());
        } else {
            self.comm.send(to, Self::tag(at, stage, kind), &t.to_vec_f32()?)?;
        }
        Ok(())
    }

    /// What the holder of `from` sent for `stage`, shaped like `shape`.
    fn take(&self, at: At, from: usize, stage: usize, kind: u64, shape: &[usize]) -> Result<Tensor> {
        let src = self.schedule.paths[at.path].stages[from].rank;
        if src == self.comm.rank() {
            return self.local.lock().expect("hand-off lock").remove(&(at.global_micro, stage, kind)).ok_or_else(
                || Error::Train(format!("rank {src}: stage {stage} has no hand-off from stage {from} yet")),
            );
        }
        let v = self.comm.recv(src, Self::tag(at, stage, kind))?;
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }

    fn hidden_shape(&self, mb: &MicroBatch) -> Vec<usize> {
        let d = mb.input_ids.dims();
        vec![d[0], d[1], self.model.config.hidden_size]
    }

    /// The forward of `w`: returns what its backward needs and what it measured: the expert loads
    /// of its MoE layers and, on the last stage, the losses (scaled by the loss scale), on the
    /// others their balance losses.
    fn forward(&self, w: Work) -> Result<(Pending, Accumulated)> {
        let at = self.locate(w)?;
        let mb = &self.micro[at.global_micro];
        let last = at.stage + 1 == self.plan.layers.len();
        let input = if at.stage == 0 {
            None
        } else {
            let h = self.take(at, at.stage - 1, at.stage, ACTIVATION, &self.hidden_shape(mb))?;
            Some(h.to_dtype(self.model.compute_dtype)?.input_variable())
        };
        let h = match &input {
            Some(h) => h.clone(),
            None => self.model.embed(&mb.input_ids)?,
        };
        let layers = self.plan.layers[at.stage].clone();
        // The MoE layers count the micro-batch's tokens, not its padding (as the trainer does).
        let real = RealTokens::from_targets(&mb.targets, IGNORE_INDEX)?;
        let out = self.model.run_layers(layers.clone(), &h, Some(&real))?;
        let mut measured = nothing_measured(self.model);
        // MoE layers report in model order: the trunk's, then the MTP modules'.
        let first_moe = self.model.layers[..layers.start].iter().filter(|l| l.moe().is_some()).count();
        let trunk_moe = self.model.layers.iter().filter(|l| l.moe().is_some()).count();
        let mut place = |first: usize, loads: &[Vec<usize>]| {
            measured.loads[first..first + loads.len()].clone_from_slice(loads);
        };
        place(first_moe, &out.expert_load);
        let scale = self.scale as f64;
        if last {
            let fo = self.model.head_and_losses(
                &mb.input_ids,
                Some(&mb.targets),
                Some(&real),
                &out.hidden,
                Vec::new(),
                out.aux_loss,
            )?;
            place(trunk_moe, &fo.expert_load);
            let loss = fo.loss.expect("targets were given").mul_scalar(self.scale)?;
            measured.loss = loss.to_scalar()? as f64;
            measured.main_loss = fo.main_loss.expect("targets were given").to_scalar()? as f64 * scale;
            measured.mtp_loss = fo.mtp_loss.map(|m| m.to_scalar()).transpose()?.map(|m| m as f64 * scale);
            measured.aux_loss = fo.aux_loss.map(|a| a.to_scalar()).transpose()?.map(|a| a as f64 * scale);
            if !measured.loss.is_finite() {
                let location = format!("micro-batch {} (pipeline stage {})", at.global_micro, at.stage);
                measured.problem = Some(("loss".into(), location));
            }
            Ok((Pending { input, output: loss, aux: None }, measured))
        } else {
            self.give(at, at.stage + 1, ACTIVATION, &out.hidden)?;
            let aux = out.aux_loss.map(|a| a.mul_scalar(self.scale)).transpose()?;
            if let Some(a) = &aux {
                measured.loss = a.to_scalar()? as f64;
                measured.aux_loss = Some(measured.loss);
            }
            Ok((Pending { input, output: out.hidden, aux }, measured))
        }
    }

    /// The backward of `w` (input half only when `split`, returning the weight half).
    fn backward(&self, w: Work, p: Pending, split: bool) -> Result<Option<WeightGradWork>> {
        let at = self.locate(w)?;
        let last = at.stage + 1 == self.plan.layers.len();
        // One scalar to differentiate: the loss, or <output, its gradient> plus the balance losses.
        let root = if last {
            p.output
        } else {
            let g = self.take(at, at.stage + 1, at.stage, GRADIENT, p.output.dims())?;
            let dot = p.output.to_dtype(DType::F32)?.mul(&g)?.sum_all()?;
            match p.aux {
                Some(a) => dot.add(&a)?,
                None => dot,
            }
        };
        let work = if split {
            Some(root.backward_split(None)?)
        } else {
            root.backward()?;
            None
        };
        if let Some(input) = &p.input {
            let g = input.grad().ok_or_else(|| Error::Train(format!("stage {} got no input gradient", at.stage)))?;
            self.give(at, at.stage - 1, GRADIENT, &g)?;
        }
        Ok(work)
    }
}
