//! Data, expert and pipeline parallelism together: a [`Mesh`] of `dp x pipeline ranks` ranks
//! (pipeline ranks = PP stages, or PP/2 for DualPipeV) trains as one rank would on the whole
//! global batch, and [`ParallelTrainer`] is one rank of it over any [`Comm`] (LocalComm threads
//! for CPU runs; a communicator built elsewhere plugs in the same way).
//!
//! **Layout.** Rank `p * dp + d` is data-parallel replica `d` at pipeline rank `p`, so the `dp`
//! replicas of a stage are consecutive ranks (Megatron's order: the expert all-to-alls, the
//! heaviest traffic, stay on the closest links). Sub-communicators come from [`Comm::split`]: the
//! pipeline group of a rank is its replica's pipeline ranks; its expert-parallel group is the `ep`
//! consecutive replicas of its block at the same pipeline rank (so `ep` divides `dp`).
//!
//! **A step.** Each rank keeps a whole model copy (a CPU simulation: it runs only its own
//! stages, and of the routed experts only those its expert-parallel rank owns). Replica `d` draws
//! its `n` micro-batches ([`Mesh::shard`]; `grad_accum`, or a batch ramp's count) and runs them
//! through the schedule's op list for `n` ([`Pipeline::run_ops`]) with every micro-batch's loss
//! scaled by `1 / (dp n)`, the factor of one rank accumulating all `dp n` micro-batches. A parameter's gradient is
//! then non-zero only on the ranks where it ran (its stage, DualPipe's two copies of a stage, the
//! embedding used by the first stage and the MTP modules, a routed expert's owners), so one sum
//! over all ranks gives every parameter its whole-batch gradient. That sum, the global clipping
//! norm, AdamW (the same update on every rank, so the copies stay equal) and the MoE bias update
//! from the expert loads summed over every rank and stage are [`DataParallelTrainer`]'s, with the
//! whole world as its communicator. A mesh with neither expert nor pipeline parallelism is plain
//! data parallelism, with its gradient reduction overlapped with the backward; a world of one is
//! the plain [`Trainer`].
//!
//! DualPipe's overlapped `[F&B]` pairs run their halves on two threads with expert parallelism
//! too: forward all-to-alls go on one communicator of the expert group and backward ones on
//! another ([`EpComms`]), so each keeps its call order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use whale_model::moe::ExpertDispatch;
use whale_model::DeepSeekV3Config;

use crate::comm::Comm;
use crate::data_parallel::{DataParallelConfig, DataParallelTrainer, ShardedData, StepShape};
use crate::expert_parallel::{EpComms, ExpertParallel};
use crate::pipeline::{Execution, MicroBatch, Pipeline, StagePlan};
use crate::schedule::{Method, Schedule};
use crate::trainer::{DataSource, StepMetrics, TrainConfig, Trainer};
use crate::{Error, Result};

/// How a world of ranks is laid out: data-parallel replicas, expert-parallel groups among them,
/// pipeline stages and their schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    /// Data-parallel replicas, each on its own share of the global batch.
    pub dp: usize,
    /// Ranks the routed experts of every MoE layer are split over (replicas at the same pipeline
    /// rank); divides `dp`.
    pub ep: usize,
    /// Pipeline stages (the schedule's PP).
    pub pp: usize,
    pub schedule: Method,
    /// Nodes an expert-parallel group spans (`ep / ep_nodes` ranks each; divides `ep`). With more
    /// than one, the router's groups are the nodes (`n_group` = `ep_nodes`, experts laid out node
    /// by node), so a token reaches at most `topk_group` of them: DeepSeek-V3's node-limited
    /// routing (M = 4 nodes of 8 in V3), which bounds the slow cross-node traffic of the dispatch.
    pub ep_nodes: usize,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh { dp: 1, ep: 1, pp: 1, schedule: Method::OneFOneB, ep_nodes: 1 }
    }
}

impl std::fmt::Display for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (dp, ep, pp, method) = (self.dp, self.ep, self.pp, self.schedule.cli_name());
        let nodes = if self.ep_nodes == 1 { String::new() } else { format!(" over {} nodes", self.ep_nodes) };
        write!(f, "dp {dp} x ep {ep}{nodes} x pp {pp} ({method})")
    }
}

impl Mesh {
    /// Ranks per pipeline (DualPipeV puts two stages on each).
    pub fn pipeline_ranks(&self) -> usize {
        self.schedule.ranks(self.pp)
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.pipeline_ranks()
    }

    /// `(replica, pipeline rank)` of `rank`.
    pub fn coordinates(&self, rank: usize) -> (usize, usize) {
        let dp = self.dp.max(1);
        (rank % dp, rank / dp)
    }

    /// Whether ranks run pipeline stages or hold a share of the experts (not plain data
    /// parallelism).
    pub fn is_sharded(&self) -> bool {
        self.pp > 1 || self.ep > 1
    }

    /// Rank `rank`'s data: of every `dp` consecutive micro-batches of `stream` (the same stream,
    /// same seed, on every rank), its replica's.
    pub fn shard(&self, rank: usize, stream: Box<dyn DataSource>) -> ShardedData {
        ShardedData { inner: stream, rank: self.coordinates(rank).0, world: self.dp }
    }

    /// Checks the mesh against a model and `micro` micro-batches per replica and step, and builds
    /// its schedule and stage plan.
    pub fn plan(&self, model: &DeepSeekV3Config, micro: usize) -> Result<(Schedule, StagePlan)> {
        let bad = |msg: String| Error::Train(format!("parallel layout {self}: {msg}"));
        if self.dp == 0 || self.ep == 0 || self.pp == 0 || self.ep_nodes == 0 {
            return Err(bad("dp, ep, pp and ep_nodes must be at least 1".into()));
        }
        if self.dp % self.ep != 0 {
            return Err(bad(format!(
                "expert parallelism runs inside data parallelism, so ep ({}) must divide dp ({})",
                self.ep, self.dp
            )));
        }
        let experts = model.n_routed_experts;
        if self.ep > 1 && experts % self.ep != 0 {
            let msg = format!("{experts} routed experts do not split evenly over {} expert-parallel ranks", self.ep);
            return Err(bad(msg));
        }
        if self.ep % self.ep_nodes != 0 {
            return Err(bad(format!("ep_nodes ({}) must divide ep ({})", self.ep_nodes, self.ep)));
        }
        if self.ep_nodes > 1 && model.n_group != self.ep_nodes {
            return Err(bad(format!(
                "node-limited routing takes one router group per node: n_group is {} for {} nodes",
                model.n_group, self.ep_nodes
            )));
        }
        let plan = StagePlan::even(model.num_hidden_layers, self.pp).map_err(|e| bad(e.to_string()))?;
        let schedule = Schedule::new(self.schedule, self.pp, micro).map_err(|e| bad(e.to_string()))?;
        Ok((schedule, plan))
    }

    /// [`Mesh::plan`] for every count of micro-batches a step of `train` may take (its
    /// `grad_accum`, or a batch ramp's counts): a schedule per count, and the stage plan. An error
    /// names the ramp's step the schedule cannot run.
    pub fn plan_steps(
        &self,
        model: &DeepSeekV3Config,
        train: &TrainConfig,
    ) -> Result<(BTreeMap<usize, Schedule>, StagePlan)> {
        let mut schedules = BTreeMap::new();
        let mut plan = None;
        for micro in train.micro_batch_counts() {
            let (schedule, stages) = self.plan(model, micro).map_err(|e| match &train.batch_ramp {
                Some(ramp) => Error::Train(format!("{e} (a step of the batch ramp {ramp:?} takes {micro})")),
                None => e,
            })?;
            schedules.insert(micro, schedule);
            plan = Some(stages);
        }
        Ok((schedules, plan.expect("a run takes at least grad_accum micro-batches")))
    }
}

/// What a sharded mesh adds to data parallelism on one rank.
struct Stages {
    /// This rank's replica's pipeline ranks.
    pipeline: Box<dyn Comm>,
    /// The schedule of each count of micro-batches a step may take (one without a batch ramp).
    schedules: BTreeMap<usize, Schedule>,
    plan: StagePlan,
    exec: Execution,
    /// The dispatch installed on each MoE layer (model order), when `ep > 1`.
    experts: Vec<Arc<ExpertParallel>>,
}

/// One rank of a [`Mesh`]: a [`DataParallelTrainer`] over the whole world whose local gradients
/// come from this rank's pipeline stages and experts. Every rank builds one (same model and
/// config, its replica's data: [`Mesh::shard`]) and calls [`ParallelTrainer::train_step`] in
/// step with the others; the global batch is `dp * grad_accum * micro_batch` sequences (fewer
/// while a batch ramp rises).
pub struct ParallelTrainer<'c> {
    /// The data-parallel step over the world; `dp.trainer` holds this rank's model copy.
    pub dp: DataParallelTrainer<'c>,
    mesh: Mesh,
    stages: Option<Stages>,
}

impl std::fmt::Debug for ParallelTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rank, world) = (self.dp.comm().rank(), self.dp.comm().world_size());
        write!(f, "ParallelTrainer(rank {rank} of {world}, {}, {:?})", self.mesh, self.dp.trainer)
    }
}

impl<'c> ParallelTrainer<'c> {
    /// Rank `comm.rank()` of `mesh` (a collective call: every rank at once). `comm` spans the
    /// whole world; the pipeline and expert-parallel groups are split from it. Rank 0's weights
    /// are copied to every rank. `dp_config` is used as given for plain data parallelism; on a
    /// sharded mesh the gradients are summed after the pipeline's last op (no overlap), and with
    /// `zero1` the AdamW state is sharded over the whole world.
    pub fn new(mut trainer: Trainer, comm: &'c dyn Comm, mesh: Mesh, dp_config: DataParallelConfig) -> Result<Self> {
        let (schedules, plan) = mesh.plan_steps(&trainer.model.config, &trainer.config)?;
        if comm.world_size() != mesh.world_size() {
            return Err(Error::Train(format!(
                "parallel layout {mesh} needs {} ranks, the communicator has {}",
                mesh.world_size(),
                comm.world_size()
            )));
        }
        let (replica, stage) = mesh.coordinates(comm.rank());
        let (stages, dp_config) = if mesh.is_sharded() {
            let pipeline = comm.split(replica, stage)?;
            let mut experts = Vec::new();
            if mesh.ep > 1 {
                let group = stage * (mesh.dp / mesh.ep) + replica / mesh.ep;
                let ep_comms = EpComms::new(Arc::from(comm.split(group, replica % mesh.ep)?))?;
                for moe in trainer.model.moe_layers_mut() {
                    experts.push(ExpertParallel::install(&ep_comms, mesh.ep / mesh.ep_nodes, moe)?);
                }
            }
            // A pair's halves overlap on two threads, each with its expert all-to-alls, only
            // where the communicator allows it (not NCCL's: see `Comm::concurrent_splits`).
            let exec = Execution { overlap: mesh.ep == 1 || comm.concurrent_splits() };
            let stages = Stages { pipeline, schedules, plan, exec, experts };
            (Some(stages), DataParallelConfig { overlap: false, ..dp_config })
        } else if comm.world_size() == 1 {
            // One rank steps the trainer's own optimizer (below): a ZeRO-1 shard of it would
            // never step, and syncing it back at a checkpoint would reset the moments.
            (None, DataParallelConfig { zero1: false, ..dp_config })
        } else {
            (None, dp_config)
        };
        let mut dp = DataParallelTrainer::new(trainer, comm, dp_config)?;
        // The world holds `dp` replicas of the model, each spread over its pipeline stages.
        dp.trainer.set_replicas(mesh.dp);
        Ok(ParallelTrainer { dp, mesh, stages })
    }

    pub fn mesh(&self) -> Mesh {
        self.mesh
    }

    /// The most nodes one of this rank's tokens was sent to by an MoE layer in its last
    /// micro-batch's forward (at most `topk_group` where `ep_nodes` > 1; 0 without expert
    /// parallelism).
    pub fn max_nodes_per_token(&self) -> usize {
        let experts = self.stages.as_ref().map_or(&[][..], |s| &s.experts[..]);
        experts.iter().map(|e| e.last_dispatch().max_nodes_per_token).max().unwrap_or(0)
    }

    /// This rank's trainer. With ZeRO-1 its optimizer holds the AdamW state as of the last
    /// [`ParallelTrainer::save_checkpoint`] (the live state is sharded over the ranks).
    pub fn trainer(&self) -> &Trainer {
        &self.dp.trainer
    }

    /// One optimizer step on every rank (a collective call).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let Some(stages) = &self.stages else {
            return match self.dp.comm().world_size() {
                1 => self.dp.trainer.train_step(),
                _ => self.dp.train_step(),
            };
        };
        self.dp.trainer.begin_step();
        let t0 = Instant::now();
        let cfg = self.dp.trainer.config.clone();
        let n = self.dp.trainer.micro_batches_now();
        let micro = (0..n)
            .map(|_| {
                let (input_ids, targets) = self.dp.trainer.data.next_batch(cfg.micro_batch, cfg.seq_len)?;
                Ok(MicroBatch { input_ids, targets })
            })
            .collect::<Result<Vec<_>>>()?;
        let scale = 1.0 / (self.mesh.dp * n) as f32;
        let model = &self.dp.trainer.model;
        let pipeline = Pipeline { schedule: &stages.schedules[&n], plan: &stages.plan, exec: stages.exec };
        let local = pipeline.run_ops(stages.pipeline.as_ref(), model, &micro, scale)?;
        // The losses are already shares of the global mean and the gradients those of the mean
        // loss: the sums over the world need no further scaling.
        let shape = StepShape { grad_scale: 1.0, loss_divisor: 1, sequences: cfg.micro_batch * n * self.mesh.dp };
        self.dp.reduce_and_update(t0, local, shape)
    }

    /// Writes a checkpoint from rank 0 (a collective call): what one rank training alone would
    /// write.
    pub fn save_checkpoint(&mut self, dir: &std::path::Path) -> Result<()> {
        self.dp.save_checkpoint(dir)
    }

    /// `f` on this rank's trainer with every expert run here (expert parallelism taken out for
    /// the call; every rank's copy holds all the weights, equal to every other's): evaluation or
    /// generation on one rank while the others wait. Not a collective call.
    pub fn with_whole_model<R>(&mut self, f: impl FnOnce(&Trainer) -> R) -> R {
        self.set_dispatch(false);
        let r = f(&self.dp.trainer);
        self.set_dispatch(true);
        r
    }

    /// This rank's trainer, every expert run here again (see [`ParallelTrainer::with_whole_model`]),
    /// its optimizer holding the whole AdamW state (with ZeRO-1 gathered from the shards): a
    /// collective call. It still counts the mesh's replicas (its schedule's clock places the
    /// run's sequences by them): it is for evaluating and saving, not for stepping alone.
    pub fn into_trainer(mut self) -> Result<Trainer> {
        self.dp.sync_optimizer()?;
        self.set_dispatch(false);
        Ok(self.dp.trainer)
    }

    fn set_dispatch(&mut self, on: bool) {
        let Some(stages) = &self.stages else { return };
        if stages.experts.is_empty() {
            return;
        }
        for (moe, ep) in self.dp.trainer.model.moe_layers_mut().zip(&stages.experts) {
            moe.dispatch = on.then(|| ep.clone() as Arc<dyn ExpertDispatch>);
        }
    }
}
