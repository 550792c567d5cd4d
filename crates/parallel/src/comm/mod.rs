//! Communicators: the collectives and point-to-point messages that data, expert and pipeline
//! parallelism are written against. [`Comm`] is the interface; [`LocalComm`] runs ranks as threads
//! of one process (tests and CPU runs), optionally paying a modelled [`LinkModel`] per message so
//! that overlap of communication with compute can be measured on a CPU. World size 1 is
//! [`LocalComm::single`]: the same code runs on one rank, where every collective is the identity.
//!
//! Buffers are f32; integer and f64 reductions that must be exact go through
//! [`Comm::all_reduce_u64`] and [`Comm::all_reduce_f64`], which move bit patterns.

/// The collective methods of a [`Comm`] impl whose type has
/// `fn collective(&self, Collective, Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>` (every rank's call
/// checked and computed by [`combine`]).
macro_rules! collectives_via_combine {
    () => {
        fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
            let out = single(self.collective(Collective::AllReduce(op), vec![buf.to_vec()])?);
            buf.copy_from_slice(&out);
            Ok(())
        }

        fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
            let out = single(self.collective(Collective::Broadcast { root }, vec![buf.to_vec()])?);
            buf.copy_from_slice(&out);
            Ok(())
        }

        fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
            Ok(single(self.collective(Collective::AllGather, vec![local.to_vec()])?))
        }

        fn reduce_scatter(&self, input: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
            Ok(single(self.collective(Collective::ReduceScatter(op), vec![input.to_vec()])?))
        }

        fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
            self.collective(Collective::AllToAll, send)
        }

        fn barrier(&self) -> Result<()> {
            self.collective(Collective::Barrier, Vec::new()).map(|_| ())
        }
    };
}

mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;

use std::time::Duration;

pub use local::LocalComm;
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
pub use tcp::TcpComm;
/// GPUs this process can use (0 without a CUDA driver).
#[cfg(feature = "cuda")]
pub use whale_kernels::cuda::device_count as gpu_count;

use crate::Result;

/// How [`Comm::all_reduce`] and [`Comm::reduce_scatter`] combine the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// NaN wins: a NaN on any rank makes the result NaN.
    Max,
    /// NaN wins, as for `Max`.
    Min,
}

impl ReduceOp {
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            ReduceOp::Sum => a + b,
            ReduceOp::Max if a.is_nan() || b.is_nan() => f32::NAN,
            ReduceOp::Min if a.is_nan() || b.is_nan() => f32::NAN,
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }

    /// Folds `inputs` element-wise in rank order: `((x0 op x1) op x2) ...`, so every rank gets
    /// the same bits and a rerun gets them again.
    fn fold<'a>(self, mut inputs: impl Iterator<Item = &'a [f32]>) -> Vec<f32> {
        let mut acc = inputs.next().map(<[f32]>::to_vec).unwrap_or_default();
        for x in inputs {
            acc.iter_mut().zip(x).for_each(|(a, &b)| *a = self.apply(*a, b));
        }
        acc
    }
}

/// The cost of one message on a modelled link: `latency + bytes / bandwidth` of wall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    pub latency: Duration,
    /// Bytes per second; infinite for a latency-only link.
    pub bandwidth: f64,
}

impl LinkModel {
    /// The time of one message of `bytes`.
    pub fn cost(&self, bytes: u64) -> Duration {
        self.latency + self.transfer(bytes)
    }

    fn transfer(&self, bytes: u64) -> Duration {
        let secs = if self.bandwidth.is_finite() && self.bandwidth > 0.0 { bytes as f64 / self.bandwidth } else { 0.0 };
        Duration::from_secs_f64(secs)
    }
}

/// What one rank's communicator has done so far. `messages` and `bytes` count what this rank
/// sent under the message plan of each operation (see [`Comm`]); `modelled` is the link model's
/// time for those messages (zero without a model).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommStats {
    /// Collectives and sends issued.
    pub calls: u64,
    pub messages: u64,
    pub bytes: u64,
    pub modelled: Duration,
}

/// Why a communication failed. A collective fails on every rank with the same detail, so no
/// rank is left waiting for the others.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    /// The ranks called different collectives at the same point, or disagree on sizes or roots.
    #[error("rank {rank}: collective #{seq} ({op}): the ranks disagree: {detail}")]
    Mismatch { rank: usize, seq: u64, op: String, detail: String },
    /// A rank dropped its communicator (returned, failed or panicked) before taking part.
    #[error("rank {rank}: {op}: rank {peer} has left (its communicator was dropped) without taking part")]
    RankLeft { rank: usize, op: String, peer: usize },
    /// Nothing came from a peer that is still connected for the receive's patience: it may be
    /// hung, or slower than the patience allows (TCP; torch's collective timeout).
    #[error("rank {rank}: {op}: nothing from rank {peer} for {after:?}, its connection still open (hung, or slower than the patience)")]
    Timeout { rank: usize, op: String, peer: usize, after: std::time::Duration },
    /// Every rank is blocked and none can proceed.
    #[error("rank {rank}: deadlock: every rank waits and none can proceed ({detail})")]
    Deadlock { rank: usize, detail: String },
    /// A call that is wrong on its own (a peer outside the world).
    #[error("rank {rank}: {op}: {msg}")]
    Invalid { rank: usize, op: String, msg: String },
}

/// A communicator: this rank's view of a world of `world_size` ranks.
///
/// Contract, for every implementation:
/// - Collectives are matched by call order: the n-th collective of every rank is one operation,
///   so every rank must call them in the same order (from one thread at a time per rank).
///   A mismatch (another collective, other lengths or root) is an error on every rank
///   (`NcclComm`'s NCCL collectives excepted: NCCL does not check).
/// - Every rank receives bit-identical results. [`LocalComm`] reduces in rank order, so results
///   are also reproducible run to run.
/// - `send` does not wait for the matching `recv`; messages between two ranks with the same tag
///   arrive in the order they were sent.
///
/// Message plan (what [`CommStats`] counts and a [`LinkModel`] charges, per rank, for a world of
/// `W`, ring algorithms): `all_reduce` and `broadcast` of n floats: `2 (W - 1)` messages of
/// `n / W` floats; `reduce_scatter` and `all_gather`: `W - 1` messages of one shard; `all_to_all`:
/// one message per other rank, of its size; `barrier`: `2 (W - 1)` empty messages; `send`: one
/// message. Nothing is sent at world size 1 or to oneself.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Replaces `buf` with the element-wise reduction of every rank's `buf` (same length on all).
    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;

    /// Replaces `buf` with `root`'s `buf` (same length on all).
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;

    /// Every rank's `local` (same length on all), concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;

    /// `input` (same length on all, a multiple of the world size) is `W` shards; rank r receives
    /// the reduction over ranks of shard r.
    fn reduce_scatter(&self, input: &[f32], op: ReduceOp) -> Result<Vec<f32>>;

    /// `send[j]` goes to rank j (any length, `world_size` entries); entry j of the result is what
    /// rank j sent here.
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>>;

    /// Sends `data` to rank `to` under `tag`; returns without waiting for the receiver.
    fn send(&self, to: usize, tag: u64, data: &[f32]) -> Result<()>;

    /// The oldest message from rank `from` under `tag` not yet received; waits for it.
    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>>;

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;

    fn stats(&self) -> CommStats;

    /// Announces a further thread of this rank that will use the communicator (DualPipe's
    /// overlapped forward), before it computes: deadlock detection then counts it as running
    /// until it exits, rather than as unknown. A no-op where nothing is detected.
    fn join_thread(&self) {}

    /// A communicator over the ranks here that pass the same `color`, ranked by `key` (ties by
    /// rank here): the data-parallel group among expert- or pipeline-parallel ranks. A collective
    /// call on this communicator; the new one's collectives are independent of this one's.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>>;

    /// Whether communicators split from this one may run collectives from two threads at once
    /// (DualPipe's overlapped halves, each with its expert all-to-alls). NCCL's, queued on one
    /// stream in whatever order the threads reach it, may not: two ranks queueing them in other
    /// orders would each wait on the other's kernel.
    fn concurrent_splits(&self) -> bool {
        true
    }

    /// Exact sums of integers (expert loads, token counts) across ranks, in rank order (wrapping
    /// on overflow). The values travel as bit patterns in an [`Comm::all_gather`].
    fn all_reduce_u64(&self, values: &mut [u64]) -> Result<()> {
        let gathered = self.all_gather(&u64_to_f32_bits(values))?;
        let per_rank = 2 * values.len();
        values.fill(0);
        if per_rank > 0 {
            for rank in gathered.chunks(per_rank) {
                values.iter_mut().zip(f32_bits_to_u64(rank)).for_each(|(v, x)| *v = v.wrapping_add(x));
            }
        }
        Ok(())
    }

    /// Sums of f64 values across ranks, in rank order and in f64 (losses, squared norms).
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let bits: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
        let gathered = self.all_gather(&u64_to_f32_bits(&bits))?;
        let per_rank = 2 * values.len();
        if per_rank > 0 {
            let mut ranks = gathered.chunks(per_rank).map(|r| f32_bits_to_u64(r).map(f64::from_bits));
            let first: Vec<f64> = ranks.next().map(Iterator::collect).unwrap_or_default();
            values.copy_from_slice(&first);
            for rank in ranks {
                values.iter_mut().zip(rank).for_each(|(v, x)| *v += x);
            }
        }
        Ok(())
    }
}

/// Each u64 as two f32 bit patterns (low word first). Moving an f32 copies its bits, NaN
/// patterns included, so the values survive any gather.
fn u64_to_f32_bits(values: &[u64]) -> Vec<f32> {
    values.iter().flat_map(|&v| [f32::from_bits(v as u32), f32::from_bits((v >> 32) as u32)]).collect()
}

fn f32_bits_to_u64(bits: &[f32]) -> impl Iterator<Item = u64> + '_ {
    bits.chunks_exact(2).map(|w| w[0].to_bits() as u64 | (w[1].to_bits() as u64) << 32)
}

/// One collective as every rank states it; ranks must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collective {
    AllReduce(ReduceOp),
    Broadcast { root: usize },
    AllGather,
    ReduceScatter(ReduceOp),
    AllToAll,
    Barrier,
}

impl std::fmt::Display for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Collective::AllReduce(op) => write!(f, "all_reduce({op:?})"),
            Collective::Broadcast { root } => write!(f, "broadcast(root {root})"),
            Collective::AllGather => write!(f, "all_gather"),
            Collective::ReduceScatter(op) => write!(f, "reduce_scatter({op:?})"),
            Collective::AllToAll => write!(f, "all_to_all"),
            Collective::Barrier => write!(f, "barrier"),
        }
    }
}

/// Messages and bytes one rank sends in one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Traffic {
    messages: u64,
    bytes: u64,
}

impl Traffic {
    /// `messages` messages of `floats` f32 each.
    fn uniform(messages: usize, floats: usize) -> Traffic {
        Traffic { messages: messages as u64, bytes: (messages * floats * 4) as u64 }
    }

    fn cost(&self, link: Option<&LinkModel>) -> Duration {
        match link {
            None => Duration::ZERO,
            Some(l) => l.latency * self.messages as u32 + l.transfer(self.bytes),
        }
    }
}

/// Every rank's output of one collective and what each rank sent.
struct Combined {
    outputs: Vec<Vec<Vec<f32>>>,
    traffic: Vec<Traffic>,
}

/// Checks that all ranks called the same collective with compatible buffers and computes every
/// rank's result. `calls[r]` is rank r's collective and buffers (one buffer, or one per
/// destination for all_to_all). The error says what disagrees.
fn combine(calls: Vec<(Collective, Vec<Vec<f32>>)>) -> std::result::Result<Combined, String> {
    let w = calls.len();
    let kind = calls[0].0;
    if calls.iter().any(|(k, _)| *k != kind) {
        let list: Vec<String> = calls.iter().enumerate().map(|(r, (k, _))| format!("rank {r}: {k}")).collect();
        return Err(format!("different collectives: {}", list.join(", ")));
    }
    let bufs: Vec<Vec<Vec<f32>>> = calls.into_iter().map(|(_, b)| b).collect();
    let same_len = |bufs: &[Vec<Vec<f32>>]| -> std::result::Result<usize, String> {
        let n = bufs[0][0].len();
        if bufs.iter().any(|b| b[0].len() != n) {
            let list: Vec<String> = bufs.iter().enumerate().map(|(r, b)| format!("rank {r}: {}", b[0].len())).collect();
            return Err(format!("buffer lengths differ: {}", list.join(", ")));
        }
        Ok(n)
    };
    let ring = |n: usize| Traffic::uniform(2 * (w - 1), n.div_ceil(w));
    let same = |out: Vec<f32>| vec![vec![out]; w];
    Ok(match kind {
        Collective::AllReduce(op) => {
            let n = same_len(&bufs)?;
            Combined { outputs: same(op.fold(bufs.iter().map(|b| b[0].as_slice()))), traffic: vec![ring(n); w] }
        }
        Collective::Broadcast { root } => {
            if root >= w {
                return Err(format!("root {root} is outside a world of {w}"));
            }
            let n = same_len(&bufs)?;
            Combined { outputs: same(bufs[root][0].clone()), traffic: vec![ring(n); w] }
        }
        Collective::AllGather => {
            let n = same_len(&bufs)?;
            Combined { outputs: same(bufs.concat().concat()), traffic: vec![Traffic::uniform(w - 1, n); w] }
        }
        Collective::ReduceScatter(op) => {
            let n = same_len(&bufs)?;
            if n % w != 0 {
                return Err(format!("reduce_scatter of {n} floats over {w} ranks: not a multiple of the world size"));
            }
            let s = n / w;
            let outputs = (0..w).map(|r| vec![op.fold(bufs.iter().map(|b| &b[0][r * s..(r + 1) * s]))]).collect();
            Combined { outputs, traffic: vec![Traffic::uniform(w - 1, s); w] }
        }
        Collective::AllToAll => {
            if let Some((r, b)) = bufs.iter().enumerate().find(|(_, b)| b.len() != w) {
                return Err(format!("rank {r} passed {} buffers for a world of {w}", b.len()));
            }
            let traffic = (0..w)
                .map(|r| {
                    let floats: usize = (0..w).filter(|&j| j != r).map(|j| bufs[r][j].len()).sum();
                    Traffic { messages: (w - 1) as u64, bytes: (floats * 4) as u64 }
                })
                .collect();
            let mut bufs = bufs;
            let outputs = (0..w).map(|r| (0..w).map(|j| std::mem::take(&mut bufs[j][r])).collect()).collect();
            Combined { outputs, traffic }
        }
        Collective::Barrier => Combined { outputs: vec![Vec::new(); w], traffic: vec![ring(0); w] },
    })
}

/// The single buffer of a one-buffer collective's output.
fn single(mut out: Vec<Vec<f32>>) -> Vec<f32> {
    out.pop().unwrap_or_default()
}
