//! Runs a schedule under a cost model. Each rank executes its op list in order; an op starts when
//! the rank is free and every input it needs has arrived: a forward needs the previous stage's
//! forward of its micro-batch, a backward the next stage's backward (the last stage only its own
//! forward, where the loss is), a W its b. An input from another rank arrives `comm` after the
//! op producing it ends; from the same rank (DualPipeV's turn at the last rank) at once. Sends
//! are not batched with the next receive as the reference does, and links never contend.

use std::collections::HashMap;

use super::{Blocked, Op, Result, Schedule, ScheduleError, Work};

/// Times of the table's quantities, in any unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    /// A forward chunk.
    pub f: f64,
    /// A full backward chunk (input and weight gradients); an input-only b costs `b - w`.
    pub b: f64,
    /// A weight-gradient backward.
    pub w: f64,
    /// A mutually overlapped forward + full backward pair (F&B).
    pub fb: f64,
    /// Point-to-point latency between neighbouring ranks.
    pub comm: f64,
}

impl Default for Cost {
    /// F = W = 1, B = 2, F&B = F + B = 3, no latency: the assumptions under which every rank's
    /// simulated bubble equals the table.
    fn default() -> Self {
        Cost { f: 1.0, b: 2.0, w: 1.0, fb: 3.0, comm: 0.0 }
    }
}

impl Cost {
    pub fn check(&self) -> Result<()> {
        let all = [("F", self.f), ("B", self.b), ("W", self.w), ("F&B", self.fb), ("comm", self.comm)];
        if let Some((name, v)) = all.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
            return Err(ScheduleError::Cost(format!("{name} = {v}: times must be finite and non-negative")));
        }
        if self.w > self.b {
            return Err(ScheduleError::Cost(format!(
                "W = {} exceeds B = {}: W is a part of the full backward",
                self.w, self.b
            )));
        }
        Ok(())
    }

    pub fn duration(&self, op: &Op) -> f64 {
        match op {
            Op::F(_) => self.f,
            Op::B(_) => self.b,
            Op::BInput(_) => self.b - self.w,
            Op::W(_) => self.w,
            Op::FB { .. } => self.fb,
        }
    }
}

/// One op as it ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub op: Op,
    pub start: f64,
    pub end: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RankTimeline {
    pub spans: Vec<Span>,
    /// Time spent computing.
    pub busy: f64,
    /// Time idle between 0 and the end of the whole step.
    pub bubble: f64,
    pub peak_activations: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// When the last op of any rank ends.
    pub total: f64,
    pub ranks: Vec<RankTimeline>,
}

impl Timeline {
    /// The largest bubble of any rank: the table's figure.
    pub fn max_bubble(&self) -> f64 {
        self.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max)
    }

    pub fn peak_activations(&self) -> usize {
        self.ranks.iter().map(|r| r.peak_activations).max().unwrap_or(0)
    }
}

/// What a finished op hands on: a forward or an input gradient of one micro-batch at one stage
/// of a path (weight gradients feed nothing downstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    Forward,
    InputGrad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Event {
    pass: Pass,
    path: usize,
    micro: usize,
    stage: usize,
}

/// Runs `schedule` under `cost`: per-rank spans, bubbles and peak activations, or the ranks a
/// deadlock leaves blocked.
pub fn simulate(schedule: &Schedule, cost: &Cost) -> Result<Timeline> {
    cost.check()?;
    schedule.check_ops()?;
    let ranks = schedule.ranks.len();
    // When each event happened and on which rank.
    let mut done: HashMap<Event, (f64, usize)> = HashMap::new();
    let mut spans: Vec<Vec<Span>> = vec![Vec::new(); ranks];
    let mut free = vec![0.0f64; ranks];
    let total_ops: usize = schedule.ranks.iter().map(Vec::len).sum();
    let mut ran = 0;
    while ran < total_ops {
        let before = ran;
        for r in 0..ranks {
            while let Some(op) = schedule.ranks[r].get(spans[r].len()) {
                let comm = |from: usize| if from == r { 0.0 } else { cost.comm };
                let ready = needs(schedule, r, op)
                    .iter()
                    .try_fold(free[r], |t, need| done.get(need).map(|&(end, from)| t.max(end + comm(from))));
                let Some(start) = ready else { break };
                let span = Span { op: *op, start, end: start + cost.duration(op) };
                free[r] = span.end;
                for event in gives(schedule, r, op) {
                    done.insert(event, (span.end, r));
                }
                spans[r].push(span);
                ran += 1;
            }
        }
        if ran == before {
            return Err(deadlock(schedule, &spans, &done, ran, total_ops));
        }
    }
    let total = free.iter().copied().fold(0.0, f64::max);
    let peaks = schedule.peak_activations();
    let ranks = spans
        .into_iter()
        .zip(peaks)
        .map(|(spans, peak_activations)| {
            let busy: f64 = spans.iter().map(|s| s.end - s.start).sum();
            RankTimeline { spans, busy, bubble: total - busy, peak_activations }
        })
        .collect();
    Ok(Timeline { total, ranks })
}

/// The event a pass of `work` on `rank` is, with the stage offset `delta`: `None` past either end.
fn event(schedule: &Schedule, rank: usize, work: Work, pass: Pass, delta: isize) -> Option<Event> {
    let (path, stage) = schedule.locate(rank, work.chunk)?;
    let stage = stage.checked_add_signed(delta).filter(|&s| s < schedule.paths[path].stages.len())?;
    Some(Event { pass, path, micro: work.micro, stage })
}

/// The events `op` on `rank` waits for.
fn needs(schedule: &Schedule, rank: usize, op: &Op) -> Vec<Event> {
    let mut out = Vec::new();
    if let Some(w) = op.forward() {
        out.extend(event(schedule, rank, w, Pass::Forward, -1));
    }
    if let Some(w) = op.backward() {
        out.extend(event(schedule, rank, w, Pass::Forward, 0));
        out.extend(event(schedule, rank, w, Pass::InputGrad, 1));
    }
    if let Op::W(w) = op {
        out.extend(event(schedule, rank, *w, Pass::InputGrad, 0));
    }
    out
}

/// The events `op` on `rank` produces when it ends.
fn gives(schedule: &Schedule, rank: usize, op: &Op) -> Vec<Event> {
    let mut out = Vec::new();
    if let Some(w) = op.forward() {
        out.extend(event(schedule, rank, w, Pass::Forward, 0));
    }
    if let Some(w) = op.backward() {
        out.extend(event(schedule, rank, w, Pass::InputGrad, 0));
    }
    out
}

fn deadlock(
    schedule: &Schedule,
    spans: &[Vec<Span>],
    done: &HashMap<Event, (f64, usize)>,
    ran: usize,
    total: usize,
) -> ScheduleError {
    let blocked = schedule
        .ranks
        .iter()
        .enumerate()
        .filter_map(|(rank, ops)| {
            let op = *ops.get(spans[rank].len())?;
            let missing = needs(schedule, rank, &op).into_iter().find(|e| !done.contains_key(e))?;
            Some(Blocked { rank, op, waits_for: describe(schedule, missing) })
        })
        .collect();
    ScheduleError::Deadlock { done: ran, total, blocked }
}

/// An event named as the op that produces it, and where: `F0.3 on rank 1`.
fn describe(schedule: &Schedule, e: Event) -> String {
    let place = schedule.paths[e.path].stages[e.stage];
    let work = Work { chunk: place.chunk, micro: e.micro };
    match e.pass {
        Pass::Forward => format!("F{work} on rank {}", place.rank),
        Pass::InputGrad => format!("the backward of {work} on rank {}", place.rank),
    }
}
