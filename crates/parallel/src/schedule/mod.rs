//! Pipeline-parallel schedules as data: for every rank, the ordered list of operations it runs
//! (forward, full backward, input-only backward, deferred weight backward, overlapped
//! forward&backward pairs). Generators build 1F1B, ZB1P (ZB-H1), and DualPipe and DualPipeV in
//! the exact order of deepseek-ai/DualPipe; [`simulator`] times a schedule under a cost model
//! and [`svg`] draws it.
//!
//! A micro-batch flows along a [`Path`] of stages, each stage a (rank, chunk) [`Place`]. 1F1B and
//! ZB1P have one path over the ranks. DualPipe has two: direction 0 enters at rank 0 (chunk 0 of
//! every rank) and direction 1 enters at the last rank (chunk 1). DualPipeV has one V-shaped path
//! of 2·ranks stages: down the ranks on chunk 0, then back up on chunk 1.

mod dualpipe;
mod dualpipev;
mod one_f_one_b;
pub mod simulator;
pub mod svg;
mod zb1p;

use std::collections::{HashMap, VecDeque};
use std::fmt;

pub use simulator::{simulate, Cost, RankTimeline, Span, Timeline};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("unknown schedule {0:?}: expected 1f1b, zb1p, dualpipe or dualpipev")]
    UnknownMethod(String),
    /// The method cannot be built for this many stages or micro-batches.
    #[error("{method} with PP={pp} and {micro} micro-batches: {reason}")]
    Shape { method: Method, pp: usize, micro: usize, reason: String },
    /// An op list that does not run every micro-batch's passes exactly once, in a possible order.
    #[error("{method} schedule, rank {rank}: {reason}")]
    Malformed { method: Method, rank: usize, reason: String },
    #[error("cost model: {0}")]
    Cost(String),
    /// No rank can start its next op: each blocked rank with the input it waits for.
    #[error("deadlock after {done} of {total} ops: {}", list_blocked(.blocked))]
    Deadlock { done: usize, total: usize, blocked: Vec<Blocked> },
}

/// A rank stuck at `op` because `waits_for` (an op on another rank, or its own) never ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocked {
    pub rank: usize,
    pub op: Op,
    pub waits_for: String,
}

fn list_blocked(blocked: &[Blocked]) -> String {
    let items: Vec<String> =
        blocked.iter().map(|b| format!("rank {} at {} waits for {}", b.rank, b.op, b.waits_for)).collect();
    items.join("; ")
}

pub type Result<T> = std::result::Result<T, ScheduleError>;

/// The pipeline schedules of DeepSeek-V3 TR Table 2 / the DualPipe README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// One forward, one backward (PipeDream-Flush / Megatron): full backwards.
    OneFOneB,
    /// Zero Bubble ZB-H1: 1F1B with the backward split into input-grad (b) and weight-grad (W),
    /// some W deferred to fill the cool-down bubble at the same peak memory.
    Zb1p,
    /// Bidirectional: two model copies fed from both ends, forward/backward pairs overlapped.
    DualPipe,
    /// DualPipe "cut in half": two stages per rank on PP/2 ranks, one V-shaped path.
    DualPipeV,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::OneFOneB, Method::Zb1p, Method::DualPipe, Method::DualPipeV];

    /// The name the CLI takes.
    pub fn cli_name(self) -> &'static str {
        match self {
            Method::OneFOneB => "1f1b",
            Method::Zb1p => "zb1p",
            Method::DualPipe => "dualpipe",
            Method::DualPipeV => "dualpipev",
        }
    }

    /// Ranks (devices) that run `pp` stages: DualPipeV puts two stages on each.
    pub fn ranks(self, pp: usize) -> usize {
        if self == Method::DualPipeV {
            pp / 2
        } else {
            pp
        }
    }

    /// The bubble column of the table, as written there.
    pub fn bubble_formula(self) -> &'static str {
        match self {
            Method::OneFOneB => "(PP-1)(F+B)",
            Method::Zb1p => "(PP-1)(F+B-2W)",
            Method::DualPipe | Method::DualPipeV => "(PP/2-1)(F&B+B-3W)",
        }
    }

    /// The table's bubble for `pp` stages under `cost` (its communication latency plays no part).
    pub fn table_bubble(self, pp: usize, cost: &Cost) -> f64 {
        let pp = pp as f64;
        match self {
            Method::OneFOneB => (pp - 1.0) * (cost.f + cost.b),
            Method::Zb1p => (pp - 1.0) * (cost.f + cost.b - 2.0 * cost.w),
            Method::DualPipe | Method::DualPipeV => (pp / 2.0 - 1.0) * (cost.fb + cost.b - 3.0 * cost.w),
        }
    }

    /// Whether `pp` stages, `micro` micro-batches and `cost` meet the assumptions under which
    /// [`Method::table_bubble`] is what the simulator finds ([`Method::table_assumptions`]). Off
    /// them the simulated bubble can differ either way.
    pub fn table_assumes(self, pp: usize, micro: usize, cost: &Cost) -> bool {
        // B = F + W up to the rounding of the sum (costs in microseconds round at ~1e-11).
        let b_is_f_plus_w = (cost.b - cost.w - cost.f).abs() <= 1e-12 * cost.b.abs().max(1.0);
        let split_like_forward = b_is_f_plus_w && cost.w <= cost.f;
        cost.comm == 0.0
            && match self {
                Method::OneFOneB => true,
                Method::Zb1p => split_like_forward && micro >= pp,
                Method::DualPipe | Method::DualPipeV => {
                    split_like_forward && cost.b <= cost.fb && cost.fb <= cost.f + cost.b
                }
            }
    }

    /// What [`Method::table_assumes`] checks, in words.
    pub fn table_assumptions(self) -> &'static str {
        match self {
            Method::OneFOneB => "no latency",
            Method::Zb1p => "no latency, B = F + W with W <= F, and at least PP micro-batches",
            Method::DualPipe | Method::DualPipeV => "no latency, B = F + W with W <= F, and B <= F&B <= F + B",
        }
    }

    /// The table's activation column: chunk activations alive at once on the busiest device.
    pub fn table_activations(self, pp: usize) -> usize {
        match self {
            Method::OneFOneB | Method::Zb1p => pp,
            Method::DualPipe | Method::DualPipeV => pp + 1,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::OneFOneB => "1F1B",
            Method::Zb1p => "ZB1P",
            Method::DualPipe => "DualPipe",
            Method::DualPipeV => "DualPipeV",
        })
    }
}

impl std::str::FromStr for Method {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase();
        Method::ALL
            .into_iter()
            .find(|m| m.cli_name() == key || (key == "zb-h1" && *m == Method::Zb1p))
            .ok_or_else(|| ScheduleError::UnknownMethod(s.to_string()))
    }
}

/// One micro-batch on one model chunk of a rank. `chunk` is DualPipe's direction (0 enters at
/// rank 0), DualPipeV's stage half (0 = stage r, 1 = stage 2P-1-r), and 0 for 1F1B/ZB1P;
/// `micro` counts the micro-batches of its path from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Work {
    pub chunk: u8,
    pub micro: usize,
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.chunk, self.micro)
    }
}

/// What a rank runs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Forward of one chunk.
    F(Work),
    /// Full backward: input and weight gradients together.
    B(Work),
    /// Input-gradient backward only ("b"); its weight gradient waits for a [`Op::W`].
    BInput(Work),
    /// The deferred weight-gradient backward of an earlier [`Op::BInput`].
    W(Work),
    /// A forward and a full backward of different micro-batches, overlapped so each one's
    /// communication hides under the other's computation; costs F&B.
    FB { f: Work, b: Work },
}

/// The kind of an [`Op`], for costs and colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Forward,
    Backward,
    BackwardInput,
    BackwardWeight,
    ForwardBackward,
}

impl Op {
    pub fn kind(&self) -> OpKind {
        match self {
            Op::F(_) => OpKind::Forward,
            Op::B(_) => OpKind::Backward,
            Op::BInput(_) => OpKind::BackwardInput,
            Op::W(_) => OpKind::BackwardWeight,
            Op::FB { .. } => OpKind::ForwardBackward,
        }
    }

    /// The forward this op runs, if any.
    pub fn forward(&self) -> Option<Work> {
        match *self {
            Op::F(w) | Op::FB { f: w, .. } => Some(w),
            _ => None,
        }
    }

    /// The input-gradient backward this op runs (full or input-only), if any.
    pub fn backward(&self) -> Option<Work> {
        match *self {
            Op::B(w) | Op::BInput(w) | Op::FB { b: w, .. } => Some(w),
            _ => None,
        }
    }

    /// Whether this op frees a chunk activation when it ends (a full backward or a W).
    fn frees(&self) -> bool {
        matches!(self, Op::B(_) | Op::W(_) | Op::FB { .. })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::F(w) => write!(f, "F{w}"),
            Op::B(w) => write!(f, "B{w}"),
            Op::BInput(w) => write!(f, "b{w}"),
            Op::W(w) => write!(f, "W{w}"),
            Op::FB { f: fw, b: bw } => write!(f, "[F{fw}&B{bw}]"),
        }
    }
}

/// A model chunk: `chunk` on `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Place {
    pub rank: usize,
    pub chunk: u8,
}

/// A pipeline: `micro` micro-batches run through `stages` in order (forward) and back (backward).
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub micro: usize,
    pub stages: Vec<Place>,
}

/// A whole schedule: the paths micro-batches take and each rank's op list.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub method: Method,
    /// Pipeline stages (the table's PP).
    pub stages: usize,
    /// Micro-batches in all (DualPipe: both directions together).
    pub micro: usize,
    pub paths: Vec<Path>,
    /// `ranks[r]` = the ops rank r runs, in order.
    pub ranks: Vec<Vec<Op>>,
}

impl Schedule {
    /// Builds and validates `method` for `pp` stages and `micro` micro-batches.
    pub fn new(method: Method, pp: usize, micro: usize) -> Result<Self> {
        let shape = |reason: &str| ScheduleError::Shape { method, pp, micro, reason: reason.to_string() };
        if pp == 0 {
            return Err(shape("needs at least one stage"));
        }
        if micro == 0 {
            return Err(shape("needs at least one micro-batch"));
        }
        let schedule = match method {
            Method::OneFOneB => one_f_one_b::generate(pp, micro),
            Method::Zb1p => zb1p::generate(pp, micro),
            Method::DualPipe => dualpipe::generate(pp, micro).map_err(shape)?,
            Method::DualPipeV => dualpipev::generate(pp, micro).map_err(shape)?,
        };
        schedule.validate()?;
        Ok(schedule)
    }

    /// The path and stage index that `chunk` of `rank` holds.
    pub fn locate(&self, rank: usize, chunk: u8) -> Option<(usize, usize)> {
        let place = Place { rank, chunk };
        self.paths.iter().enumerate().find_map(|(p, path)| path.stages.iter().position(|&s| s == place).map(|i| (p, i)))
    }

    /// Rank `rank`'s ops in the notation of spec section 5.3: `F0.1`, `B1.0`, `b0.2`, `[F0.3&B1.1]`,
    /// and a bare `W`, because in the reference a W pops the oldest deferred weight gradient
    /// rather than naming a micro-batch.
    pub fn notation(&self, rank: usize) -> String {
        let ops: Vec<String> = self.ranks[rank]
            .iter()
            .map(|op| if let Op::W(_) = op { "W".to_string() } else { op.to_string() })
            .collect();
        ops.join(" ")
    }

    /// Per rank, the most chunk activations alive at once: a forward holds one from its start
    /// (an overlapped pair's forward counts while the pair runs) until its full backward or its W
    /// ends; an input-only backward frees nothing.
    pub fn peak_activations(&self) -> Vec<usize> {
        self.ranks
            .iter()
            .map(|ops| {
                let (mut live, mut peak) = (0usize, 0usize);
                for op in ops {
                    live += usize::from(op.forward().is_some());
                    peak = peak.max(live);
                    live = live.saturating_sub(usize::from(op.frees()));
                }
                peak
            })
            .collect()
    }

    /// Every micro-batch runs exactly one forward and one backward (full, or input-only plus W)
    /// on every stage of its path, each rank orders a chunk's forward before its backward and a b
    /// before its W, and the cross-rank dependencies can all be met (a dry run finds no deadlock).
    pub fn validate(&self) -> Result<()> {
        self.check_ops()?;
        simulate(self, &Cost::default()).map(|_| ())
    }

    /// The per-rank part of [`Schedule::validate`]: counts and same-rank order, no timing.
    pub(crate) fn check_ops(&self) -> Result<()> {
        let malformed = |rank: usize, reason: String| ScheduleError::Malformed { method: self.method, rank, reason };
        for (rank, ops) in self.ranks.iter().enumerate() {
            // Where each (chunk, micro)'s forward, backward and W stand in the list.
            let mut at: HashMap<Work, Passes> = HashMap::new();
            for (i, op) in ops.iter().enumerate() {
                let weight = if let Op::W(w) = op { Some(*w) } else { None };
                for (work, pass) in [(op.forward(), 0), (op.backward(), 1), (weight, 2)] {
                    let Some(work) = work else { continue };
                    let Some((path, _)) = self.locate(rank, work.chunk) else {
                        return Err(malformed(rank, format!("{op} runs chunk {}, not held here", work.chunk)));
                    };
                    if work.micro >= self.paths[path].micro {
                        return Err(malformed(rank, format!("{op}: only {} micro-batches", self.paths[path].micro)));
                    }
                    let passes = at.entry(work).or_default();
                    if passes.index[pass].replace(i).is_some() {
                        return Err(malformed(rank, format!("{op}: its {} runs twice", PASS_NAMES[pass])));
                    }
                    passes.split |= matches!(op, Op::BInput(_));
                }
            }
            let held = self
                .paths
                .iter()
                .flat_map(|p| p.stages.iter().filter(|pl| pl.rank == rank).map(|pl| (pl.chunk, p.micro)));
            for (chunk, micros) in held {
                for micro in 0..micros {
                    let work = Work { chunk, micro };
                    let Passes { index, split } = at.get(&work).copied().unwrap_or_default();
                    let problem = match index {
                        [None, _, _] => "has no forward",
                        [_, None, _] => "has no backward",
                        [Some(f), Some(b), _] if b < f => "runs its backward before its forward",
                        [_, _, None] if split => "runs b but no W",
                        [_, _, Some(_)] if !split => "runs a W without an input-only backward",
                        [_, Some(b), Some(w)] if w < b => "runs its W before its b",
                        _ => continue,
                    };
                    return Err(malformed(rank, format!("{work} {problem}")));
                }
            }
        }
        Ok(())
    }
}

const PASS_NAMES: [&str; 3] = ["forward", "backward", "W"];

/// Where one (chunk, micro)'s forward, backward and W stand in a rank's list, and whether the
/// backward was input-only.
#[derive(Debug, Clone, Copy, Default)]
struct Passes {
    index: [Option<usize>; 3],
    split: bool,
}

/// A time for printing: at most six decimals, no trailing zeros.
pub fn fmt_time(t: f64) -> String {
    let rounded = (t * 1e6).round() / 1e6;
    format!("{}", if rounded == 0.0 { 0.0 } else { rounded })
}

/// Builds one rank's op list the way the reference issues it: forwards and backwards take the
/// next micro-batch of their chunk in order, input-only backwards push their weight gradient
/// into a FIFO and a W pops the oldest.
#[derive(Debug, Default)]
struct OpList {
    ops: Vec<Op>,
    next_f: [usize; 2],
    next_b: [usize; 2],
    deferred: VecDeque<Work>,
}

impl OpList {
    fn take_f(&mut self, chunk: u8) -> Work {
        let micro = self.next_f[chunk as usize];
        self.next_f[chunk as usize] += 1;
        Work { chunk, micro }
    }

    fn take_b(&mut self, chunk: u8) -> Work {
        let micro = self.next_b[chunk as usize];
        self.next_b[chunk as usize] += 1;
        Work { chunk, micro }
    }

    fn forward(&mut self, chunk: u8) {
        let w = self.take_f(chunk);
        self.ops.push(Op::F(w));
    }

    /// A full backward, or with `split` an input-only one whose W is deferred.
    fn backward(&mut self, chunk: u8, split: bool) {
        let w = self.take_b(chunk);
        if split {
            self.deferred.push_back(w);
            self.ops.push(Op::BInput(w));
        } else {
            self.ops.push(Op::B(w));
        }
    }

    /// The oldest deferred W. The generators issue a W only after its b (the reference asserts
    /// its queue is not empty); were one to run ahead, nothing is pushed and validation reports
    /// the b left without its W.
    fn weight(&mut self) {
        debug_assert!(!self.deferred.is_empty(), "a W with no deferred weight gradient");
        if let Some(w) = self.deferred.pop_front() {
            self.ops.push(Op::W(w));
        }
    }

    fn pair(&mut self, f_chunk: u8, b_chunk: u8) {
        let (f, b) = (self.take_f(f_chunk), self.take_b(b_chunk));
        self.ops.push(Op::FB { f, b });
    }
}

/// The single path of 1F1B/ZB1P: stage s on rank s, chunk 0.
fn straight_path(pp: usize, micro: usize) -> Path {
    Path { micro, stages: (0..pp).map(|rank| Place { rank, chunk: 0 }).collect() }
}
