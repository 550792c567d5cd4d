//! Data parallelism: every rank holds the whole model and trains on its own share of the global
//! batch. Gradients are summed across ranks in buckets and divided by the number of micro-batches
//! in the world, so N ranks take the step one rank would take on their N shares together. The
//! MoE balancing biases move by the load summed over ranks, so they stay equal everywhere.
//!
//! **What overlaps with what.** Micro-batches before the last accumulate locally (no
//! communication, like DDP's `no_sync`). During the last micro-batch's backward a communication
//! thread reduces bucket after bucket, each as soon as all of its gradients are final, while the
//! main thread goes on with the backward; clipping, AdamW and the bias update wait for the last
//! bucket. The autograd has no gradient hooks, so the thread watches the parameters' gradient
//! slots: a backward writes a parameter's slot once, when its turn comes in the topological order,
//! and a slot whose gradient tensor changed since the last micro-batch began is final.
//!
//! That order is a depth-first one. In DeepSeek-V3 the routed experts and the query path are
//! written layer by layer as the backward reaches them, but the attention's key/value and output
//! projections and the shared experts of every layer are written only as the backward ends: in
//! the tiny model 31% of the gradient elements become final in the backward's last tenth. So
//! buckets start in reverse order of parameter creation (PyTorch DDP's guess) and, after the first
//! overlapped step, are rebuilt in the order rank 0 saw gradients become final, as DDP does.
//! Bucketing never changes the numbers: each element is summed over ranks in rank order whatever
//! bucket carries it. `examples/data_parallel_overlap.rs` measures what is hidden on a modelled
//! link (2 ranks, 200 us + 400 MB/s: a 72 ms step without overlap, 53 ms with it).
//!
//! **ZeRO-1** (optimizer state sharded): each bucket is reduce-scattered instead; rank r owns shard
//! r of every bucket, runs AdamW (whale-tensor's, same numerics element by element) on that shard
//! only, and the updated shards are all-gathered into every rank's parameters. The global gradient
//! norm for clipping is the f64 sum of the ranks' squared shards.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use whale_model::tensor::optim::clip_grad_norm;
use whale_model::tensor::{Tensor, TensorId};

use crate::comm::{Comm, ReduceOp};
use crate::trainer::{Accumulated, DataSource, StepMetrics, Trainer};
use crate::{Error, Result};

mod zero1;
use zero1::Zero1;

/// How often the communication thread looks at the gradient slots.
const POLL: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, PartialEq)]
pub struct DataParallelConfig {
    /// A bucket closes once it holds at least this many bytes of gradients.
    pub bucket_bytes: usize,
    /// Reduce buckets on a communication thread during the last micro-batch's backward.
    pub overlap: bool,
    /// After the first overlapped step, order buckets as rank 0 saw gradients become final.
    pub rebuild_buckets: bool,
    /// ZeRO stage 1: each rank keeps AdamW state for its shard of the parameters only.
    pub zero1: bool,
}

impl Default for DataParallelConfig {
    fn default() -> Self {
        DataParallelConfig { bucket_bytes: 1 << 20, overlap: true, rebuild_buckets: true, zero1: false }
    }
}

/// A trainable parameter as data parallelism sees it.
struct Slot {
    name: String,
    tensor: Tensor,
    len: usize,
}

/// Parameters whose gradients travel in one collective: `(slot, offset)` in a flat buffer of
/// `padded` floats (a multiple of the world size, so it splits into equal shards).
#[derive(Debug, Clone)]
struct Bucket {
    members: Vec<(usize, usize)>,
    padded: usize,
}

impl Bucket {
    /// Buckets of about `bucket_bytes`, filled with the slots in `order`.
    fn build(slots: &[Slot], order: &[usize], bucket_bytes: usize, world: usize) -> Vec<Bucket> {
        let mut buckets = Vec::new();
        let (mut members, mut len) = (Vec::new(), 0);
        for (k, &i) in order.iter().enumerate() {
            members.push((i, len));
            len += slots[i].len;
            if len * 4 >= bucket_bytes || k + 1 == order.len() {
                buckets.push(Bucket { members: std::mem::take(&mut members), padded: len.div_ceil(world) * world });
                len = 0;
            }
        }
        buckets
    }

    /// The members' gradients (zeros where a parameter has none), or their values.
    fn flatten(&self, slots: &[Slot], grads: bool) -> Result<Vec<f32>> {
        let mut buf = vec![0.0; self.padded];
        for &(i, off) in &self.members {
            let t = if grads { slots[i].tensor.grad() } else { Some(slots[i].tensor.clone()) };
            if let Some(t) = t {
                buf[off..off + slots[i].len].copy_from_slice(&t.to_vec_f32()?);
            }
        }
        Ok(buf)
    }

    /// Writes `values` (a flat bucket) into the members' weights.
    fn write_values(&self, slots: &[Slot], values: &[f32]) -> Result<()> {
        for &(i, off) in &self.members {
            slots[i].tensor.with_f32_mut(|w| w.copy_from_slice(&values[off..off + w.len()]))?;
        }
        Ok(())
    }

    /// Sets the members' gradients from `sum` (a flat bucket) times `scale`; `None` for parameters
    /// no rank had a gradient for, so AdamW skips them as it would on one rank.
    fn write_grads(&self, slots: &[Slot], sum: &[f32], scale: f32, present: &[bool]) -> Result<()> {
        for &(i, off) in &self.members {
            let s = &slots[i];
            let g = present[i]
                .then(|| {
                    let v = sum[off..off + s.len].iter().map(|&g| g * scale).collect();
                    Tensor::from_vec(v, s.tensor.dims(), &s.tensor.device())
                })
                .transpose()?;
            s.tensor.set_grad(g)?;
        }
        Ok(())
    }
}

/// Tells the communication thread which gradients are final.
struct Watch {
    /// Each parameter's gradient tensor before the last micro-batch's backward.
    before: Vec<Option<TensorId>>,
    backward_done: AtomicBool,
    /// The backward panicked: its gradients will never be final.
    aborted: AtomicBool,
}

impl Watch {
    fn new(slots: &[Slot], backward_done: bool) -> Watch {
        let before = slots.iter().map(|s| s.tensor.grad().map(|g| g.id())).collect();
        Watch { before, backward_done: AtomicBool::new(backward_done), aborted: AtomicBool::new(false) }
    }

    fn is_final(&self, slots: &[Slot], i: usize) -> bool {
        slots[i].tensor.grad().map(|g| g.id()) != self.before[i]
    }

    /// Whether the backward has ended; an error when it panicked (the reducer then stops without
    /// communicating: reducing half a backward's gradients with the other ranks would hand them
    /// wrong sums, and waiting for the rest would never end).
    fn backward_over(&self) -> Result<bool> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(Error::Train("data parallel: the backward panicked; its gradients were not reduced".into()));
        }
        Ok(self.backward_done.load(Ordering::Acquire))
    }
}

/// Ends the backward for the reducer when dropped, whether the backward returned or unwound.
struct EndOfBackward<'a>(&'a Watch);

impl Drop for EndOfBackward<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.aborted.store(true, Ordering::Release);
        }
        self.0.backward_done.store(true, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reduction {
    /// Every rank gets the whole bucket summed.
    AllReduce,
    /// Every rank gets its shard of the bucket summed (ZeRO).
    ReduceScatter,
}

/// Reduces the buckets in order, each once its gradients are final or the backward is done.
/// With `record`, every parameter is watched (not only the next bucket's) and the order in which
/// they were seen to become final is returned.
fn reduce_buckets(
    comm: &dyn Comm,
    slots: &[Slot],
    buckets: &[Bucket],
    how: Reduction,
    watch: &Watch,
    record: bool,
) -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
    let mut seen = vec![false; slots.len()];
    let mut order = Vec::new();
    let mut reduced = Vec::with_capacity(buckets.len());
    for b in buckets {
        loop {
            let done = watch.backward_over()?;
            let mut look = |i: usize| {
                if !seen[i] && watch.is_final(slots, i) {
                    seen[i] = true;
                    order.push(i);
                }
            };
            match record {
                true => (0..slots.len()).for_each(&mut look),
                false => b.members.iter().for_each(|&(i, _)| look(i)),
            }
            if done || b.members.iter().all(|&(i, _)| seen[i]) {
                break;
            }
            std::thread::sleep(POLL);
        }
        let mut grads = b.flatten(slots, true)?;
        reduced.push(match how {
            Reduction::AllReduce => {
                comm.all_reduce(&mut grads, ReduceOp::Sum)?;
                grads
            }
            Reduction::ReduceScatter => comm.reduce_scatter(&grads, ReduceOp::Sum)?,
        });
    }
    Ok((reduced, order))
}

/// One micro-batch's forward and backward through the trainer, its loss unscaled.
fn micro_batch(trainer: &mut Trainer) -> Result<Accumulated> {
    trainer.accumulate_micro_batches(1)
}

/// The step's micro-batches together: mean losses, summed loads, the first problem.
fn merge(accs: Vec<Accumulated>) -> Accumulated {
    let n = accs.len().max(1) as f64;
    let mean = |f: fn(&Accumulated) -> Option<f64>| accs.iter().map(f).sum::<Option<f64>>().map(|s| s / n);
    let mut loads = accs.first().map(|a| a.loads.clone()).unwrap_or_default();
    for a in accs.iter().skip(1) {
        loads.iter_mut().flatten().zip(a.loads.iter().flatten()).for_each(|(t, x)| *t += x);
    }
    Accumulated {
        loss: mean(|a| Some(a.loss)).unwrap_or(0.0),
        main_loss: mean(|a| Some(a.main_loss)).unwrap_or(0.0),
        mtp_loss: mean(|a| a.mtp_loss),
        aux_loss: mean(|a| a.aux_loss),
        loads,
        problem: accs.into_iter().find_map(|a| a.problem),
    }
}

/// A data source for rank `rank` of `world`: of every `world` consecutive micro-batches of
/// `inner`, the rank's own. Every rank's `inner` must be the same stream (same seed); its state is
/// then the global cursor, the same on every rank.
pub struct ShardedData {
    pub inner: Box<dyn DataSource>,
    pub rank: usize,
    pub world: usize,
}

impl std::fmt::Debug for ShardedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardedData(rank {} of {})", self.rank, self.world)
    }
}

impl DataSource for ShardedData {
    fn next_batch(&mut self, batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        let mut mine = None;
        for r in 0..self.world {
            let b = self.inner.next_batch(batch, seq)?;
            if r == self.rank {
                mine = Some(b);
            }
        }
        mine.ok_or_else(|| Error::Train(format!("rank {} outside a world of {}", self.rank, self.world)))
    }

    fn state(&self) -> Value {
        self.inner.state()
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        self.inner.restore(state)
    }
}

/// How a step's gradients and losses, summed over the ranks, become those of the mean loss over
/// the global batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepShape {
    /// Multiplies the summed gradients.
    pub(crate) grad_scale: f32,
    /// Divides the summed losses.
    pub(crate) loss_divisor: usize,
    /// Sequences in the global batch.
    pub(crate) sequences: usize,
}

/// A [`Trainer`] on one rank of a data-parallel world. Every rank builds its own trainer (same
/// model and config, its own data) and calls [`DataParallelTrainer::train_step`] in step with the
/// others; the global batch is `world * grad_accum * micro_batch` sequences (fewer while a batch
/// ramp rises).
pub struct DataParallelTrainer<'c> {
    pub trainer: Trainer,
    config: DataParallelConfig,
    comm: &'c dyn Comm,
    slots: Vec<Slot>,
    buckets: Vec<Bucket>,
    zero: Option<Zero1>,
    rebuilt: bool,
    /// Parameters in the order the last overlapped step saw their gradients become final.
    ready_order: Vec<usize>,
    /// Of the last step: how long the main thread waited for gradient communication after its
    /// backward (all of it without overlap).
    pub exposed_comm: Duration,
}

impl std::fmt::Debug for DataParallelTrainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (r, w) = (self.comm.rank(), self.comm.world_size());
        write!(f, "DataParallelTrainer(rank {r} of {w}, {} buckets, {:?})", self.buckets.len(), self.trainer)
    }
}

/// The bucket order every rank uses: rank 0's (`order`, indices into `slots`, which every rank
/// holds in name order), once every rank is seen to hold the same parameters. The order follows
/// creation (the backward reaches the last-made parameters first); a rank whose model was made
/// another way (a copy, whose tensors are made in name order) would otherwise bucket other
/// tensors together, and equal-length buckets would add another rank's gradients into the wrong
/// parameters without an error.
fn agreed_order(comm: &dyn Comm, slots: &[Slot], order: Vec<usize>) -> Result<Vec<usize>> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for s in slots {
        for b in s.name.bytes().chain(s.len.to_le_bytes()).chain([0]) {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let mut sum = [hash];
    comm.all_reduce_u64(&mut sum)?;
    if sum[0] != hash.wrapping_mul(comm.world_size() as u64) {
        return Err(Error::Train(format!(
            "data parallel: rank {}'s parameters (names and sizes) differ from another rank's",
            comm.rank()
        )));
    }
    let mut agreed: Vec<f32> = order.iter().map(|&i| i as f32).collect();
    comm.broadcast(&mut agreed, 0)?;
    Ok(agreed.into_iter().map(|i| i as usize).collect())
}

impl<'c> DataParallelTrainer<'c> {
    /// Wraps `trainer` (a collective call: every rank at once). Rank 0's weights and buffers are
    /// copied to every rank, as DDP does; with ZeRO-1 the trainer's AdamW state (a resumed one)
    /// is split into the shards.
    pub fn new(mut trainer: Trainer, comm: &'c dyn Comm, config: DataParallelConfig) -> Result<Self> {
        if config.bucket_bytes == 0 {
            return Err(Error::Train("data parallel: bucket_bytes must be positive".into()));
        }
        // Every rank ends each step with the same weights: rank 0's moving average is the run's.
        // (Its average starts from its own weights, which the broadcast below gives every rank.)
        if comm.rank() != 0 {
            trainer.leave_ema_to_rank_zero();
        }
        trainer.set_replicas(comm.world_size());
        let slots: Vec<Slot> = trainer
            .model
            .params
            .iter()
            .map(|(name, t)| Slot { name: name.to_string(), tensor: t.clone(), len: t.elem_count() })
            .collect();
        let mut order: Vec<usize> = (0..slots.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(slots[i].tensor.id()));
        let order = agreed_order(comm, &slots, order)?;
        let buckets = Bucket::build(&slots, &order, config.bucket_bytes, comm.world_size());
        for b in &buckets {
            let mut values = b.flatten(&slots, false)?;
            comm.broadcast(&mut values, 0)?;
            b.write_values(&slots, &values)?;
        }
        for t in trainer.model.buffers.values() {
            let mut values = t.to_vec_f32()?;
            comm.broadcast(&mut values, 0)?;
            t.with_f32_mut(|b| b.copy_from_slice(&values))?;
        }
        let zero = match config.zero1 {
            true => {
                let state: BTreeMap<String, Tensor> = trainer.opt.state_tensors()?.into_iter().collect();
                let steps = trainer.opt.steps();
                Some(Zero1::new(&slots, &buckets, comm, trainer.opt.config, steps, &state)?)
            }
            false => None,
        };
        Ok(DataParallelTrainer {
            trainer,
            config,
            comm,
            slots,
            buckets,
            zero,
            rebuilt: false,
            ready_order: Vec::new(),
            exposed_comm: Duration::ZERO,
        })
    }

    pub fn config(&self) -> &DataParallelConfig {
        &self.config
    }

    pub fn comm(&self) -> &'c dyn Comm {
        self.comm
    }

    /// Number of gradient buckets and their sizes in floats (padded), in reduction order.
    pub fn bucket_sizes(&self) -> Vec<usize> {
        self.buckets.iter().map(|b| b.padded).collect()
    }

    /// One optimizer step on every rank (a collective call).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        self.trainer.begin_step();
        let t0 = Instant::now();
        let cfg = self.trainer.config.clone();
        let world = self.comm.world_size();
        let n = self.trainer.micro_batches_now();
        let mut accs = Vec::with_capacity(n);
        for _ in 1..n {
            accs.push(micro_batch(&mut self.trainer)?);
        }
        let (last, reduced) = self.last_micro_batch(self.reduction())?;
        accs.push(last);
        let shape = StepShape {
            grad_scale: 1.0 / (world * n) as f32,
            loss_divisor: world,
            sequences: cfg.micro_batch * n * world,
        };
        self.update(t0, merge(accs), reduced, shape)
    }

    /// The rest of a step whose local gradients something else computed (the pipeline stages of
    /// [`crate::parallel_trainer`]): the gradients in this rank's parameters, a parameter's being
    /// absent or zero wherever it did not run, are summed over the communicator after the
    /// backward (no overlap), then the update follows as for [`DataParallelTrainer::train_step`].
    /// `local` holds this rank's shares of the step's losses and its expert loads. A collective
    /// call.
    pub(crate) fn reduce_and_update(
        &mut self,
        started: Instant,
        local: Accumulated,
        shape: StepShape,
    ) -> Result<StepMetrics> {
        let watch = Watch::new(&self.slots, true);
        let t = Instant::now();
        let (reduced, _) = reduce_buckets(self.comm, &self.slots, &self.buckets, self.reduction(), &watch, false)?;
        self.exposed_comm = t.elapsed();
        self.update(started, local, reduced, shape)
    }

    fn reduction(&self) -> Reduction {
        if self.zero.is_some() {
            Reduction::ReduceScatter
        } else {
            Reduction::AllReduce
        }
    }

    /// Global losses and loads, the reduced gradients scaled into the parameters (or the ZeRO
    /// shards) and clipped by the global norm, then the shared end of a step.
    fn update(
        &mut self,
        t0: Instant,
        local: Accumulated,
        reduced: Vec<Vec<f32>>,
        shape: StepShape,
    ) -> Result<StepMetrics> {
        let cfg = self.trainer.config.clone();
        // Losses, problem flags and gradient presence in one f64 sum; loads as exact integers.
        let n_scalars = 7;
        let mut scalars = vec![
            local.loss,
            local.main_loss,
            local.mtp_loss.unwrap_or(0.0),
            local.aux_loss.unwrap_or(0.0),
            local.mtp_loss.is_some() as u8 as f64,
            local.aux_loss.is_some() as u8 as f64,
            local.problem.is_some() as u8 as f64,
        ];
        scalars.extend(self.slots.iter().map(|s| s.tensor.grad().is_some() as u8 as f64));
        self.comm.all_reduce_f64(&mut scalars)?;
        let present: Vec<bool> = scalars[n_scalars..].iter().map(|&c| c > 0.0).collect();
        let mut flat: Vec<u64> = local.loads.iter().flatten().map(|&x| x as u64).collect();
        self.comm.all_reduce_u64(&mut flat)?;
        let mut flat = flat.into_iter().map(|x| x as usize);
        let loads: Vec<Vec<usize>> = local.loads.iter().map(|l| flat.by_ref().take(l.len()).collect()).collect();

        let mut problem = match (local.problem, scalars[6] > 0.0) {
            (Some(p), _) => Some(p),
            (None, true) => Some(("loss".to_string(), "another rank's batch".to_string())),
            (None, false) => None,
        };
        let mut grad_norm = f64::NAN;
        if problem.is_none() {
            grad_norm = match &mut self.zero {
                None => {
                    for (b, sum) in self.buckets.iter().zip(&reduced) {
                        b.write_grads(&self.slots, sum, shape.grad_scale, &present)?;
                    }
                    clip_grad_norm(&self.trainer.model.params, cfg.grad_clip)?
                }
                Some(z) => z.set_grads(self.comm, reduced, shape.grad_scale, cfg.grad_clip)?,
            };
            if !grad_norm.is_finite() {
                problem = Some(("gradient".into(), self.locate_non_finite_gradient()));
            }
        }

        // The world's means; an optional loss is there when some rank has it.
        let mean = |i: usize| scalars[i] / shape.loss_divisor as f64;
        let measured = Accumulated {
            loss: mean(0),
            main_loss: mean(1),
            mtp_loss: (scalars[4] > 0.0).then(|| mean(2)),
            aux_loss: (scalars[5] > 0.0).then(|| mean(3)),
            loads,
            problem,
        };
        let Self { trainer, zero, comm, slots, buckets, .. } = self;
        let m = trainer.finish_step(measured, grad_norm, shape.sequences, t0, |t, lr| match zero {
            None => Ok(t.opt.step(&t.model.params, lr)?),
            Some(z) => z.update(*comm, slots, buckets, &present, lr),
        })?;
        if let Some(order) = self.rebuild_order()? {
            self.rebuild(&order)?;
        }
        Ok(m)
    }

    /// The last micro-batch, with the gradient reduction overlapped with its backward (or after
    /// it). Also remembers the order in which gradients became final, for the bucket rebuild.
    fn last_micro_batch(&mut self, how: Reduction) -> Result<(Accumulated, Vec<Vec<f32>>)> {
        let overlap = self.config.overlap;
        let record = overlap && self.config.rebuild_buckets && !self.rebuilt;
        let watch = Watch::new(&self.slots, !overlap);
        let Self { trainer, comm, slots, buckets, .. } = self;
        let comm: &dyn Comm = *comm;
        let (last, reduced, exposed) = if overlap {
            std::thread::scope(|s| {
                let reducer = std::thread::Builder::new()
                    .name(format!("rank {} gradient reduction", comm.rank()))
                    .spawn_scoped(s, || reduce_buckets(comm, slots, buckets, how, &watch, record))
                    .map_err(|e| Error::Train(format!("data parallel: cannot start the communication thread: {e}")))?;
                let end = EndOfBackward(&watch);
                let last = micro_batch(trainer);
                drop(end);
                let t = Instant::now();
                let reduced = reducer.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                Ok::<_, Error>((last, reduced, t.elapsed()))
            })?
        } else {
            let last = micro_batch(trainer)?;
            let t = Instant::now();
            let reduced = reduce_buckets(comm, slots, buckets, how, &watch, false);
            (Ok(last), reduced, t.elapsed())
        };
        self.exposed_comm = exposed;
        let (reduced, order) = reduced?;
        self.ready_order = order;
        Ok((last?, reduced))
    }

    /// The first parameter (in name order) whose gradient is not finite after the reduction.
    fn locate_non_finite_gradient(&self) -> String {
        let bad = |t: &Tensor| t.to_vec_f32().map_or(true, |v| v.iter().any(|x| !x.is_finite()));
        let found = match &self.zero {
            None => self.slots.iter().find(|s| s.tensor.grad().is_some_and(|g| bad(&g))).map(|s| s.name.clone()),
            Some(z) => z.non_finite_param(&self.slots),
        };
        found.unwrap_or_else(|| "a parameter sharded to another rank".into())
    }

    /// After the first overlapped step (when rebuilding is on): rank 0's order of gradients
    /// becoming final, parameters it never saw last in their current order. A collective call.
    fn rebuild_order(&mut self) -> Result<Option<Vec<usize>>> {
        if self.rebuilt || !self.config.overlap || !self.config.rebuild_buckets {
            return Ok(None);
        }
        let mut order = std::mem::take(&mut self.ready_order);
        let mut seen = vec![false; self.slots.len()];
        order.iter().for_each(|&i| seen[i] = true);
        order.extend(self.buckets.iter().flat_map(|b| b.members.iter().map(|&(i, _)| i)).filter(|&i| !seen[i]));
        let mut as_f32: Vec<f32> = order.iter().map(|&i| i as f32).collect();
        self.comm.broadcast(&mut as_f32, 0)?;
        Ok(Some(as_f32.into_iter().map(|x| x as usize).collect()))
    }

    /// New buckets in `order`; ZeRO shards move with them (their AdamW state is gathered and
    /// split again).
    fn rebuild(&mut self, order: &[usize]) -> Result<()> {
        let buckets = Bucket::build(&self.slots, order, self.config.bucket_bytes, self.comm.world_size());
        if let Some(z) = &self.zero {
            let state = z.full_state(self.comm, &self.slots, &self.buckets)?;
            let (config, steps) = (z.opt.config, z.opt.steps());
            self.zero = Some(Zero1::new(&self.slots, &buckets, self.comm, config, steps, &state)?);
        }
        self.buckets = buckets;
        self.rebuilt = true;
        Ok(())
    }

    /// Puts the whole optimizer state into `trainer.opt` (with ZeRO-1, gathered from the shards;
    /// a collective call), so that `trainer.save_checkpoint` writes what one rank would.
    pub fn sync_optimizer(&mut self) -> Result<()> {
        if let Some(z) = &self.zero {
            let state = z.full_state(self.comm, &self.slots, &self.buckets)?;
            self.trainer.opt.load_state(z.opt.steps(), &state, &self.trainer.model.params)?;
        }
        Ok(())
    }

    /// Writes a checkpoint from rank 0 (a collective call). The data state saved is rank 0's:
    /// with [`ShardedData`] that is the global cursor.
    pub fn save_checkpoint(&mut self, dir: &std::path::Path) -> Result<()> {
        self.sync_optimizer()?;
        if self.comm.rank() == 0 {
            self.trainer.save_checkpoint(dir)?;
        }
        self.comm.barrier()
    }
}
