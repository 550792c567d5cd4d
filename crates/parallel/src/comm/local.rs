//! [`LocalComm`]: the ranks of a world are threads of one process sharing one mutex-guarded
//! state. A collective is complete when its last rank arrives; that rank checks every rank's call
//! and computes all results (reductions in rank order). With a [`LinkModel`], each call returns
//! no earlier than its message plan would take on that link (the thread sleeps, so a modelled
//! transfer leaves the CPU to compute, as a real link would).
//!
//! What is detected instead of hanging:
//! - ranks calling different collectives at the same point, or with lengths, roots or buffer
//!   counts that disagree: an error on every rank;
//! - a rank that has dropped its communicator (returned, failed or panicked) while another waits
//!   for it in a collective or a `recv`: an error on the waiting ranks;
//! - a deadlock: every thread of every remaining rank that has used the communicator waits, in a
//!   collective that cannot complete or a `recv` with no message queued, and nothing changes for
//!   a grace period ([`LocalComm::set_deadlock_grace`], 2 s by default): an error on every
//!   waiting rank, and on every later call.
//!
//! A rank may use its communicator from several threads (data parallelism's communication thread,
//! DualPipe's overlapped forward): a thread counts from its first call until it exits, so a rank
//! whose other thread is computing is not blocked. A thread that has not called yet is unknown;
//! the grace period is what keeps its first call, if it comes in time, from looking like a
//! deadlock. Not detected: a rank that never calls again but keeps running, a message sent under
//! another tag than the one awaited while its sender runs on, a thread blocked outside the
//! communicator (joining one that waits in it), or a cycle of waits that crosses communicators (a
//! world and the groups split from it each look only at themselves).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::{
    combine, f32_bits_to_u64, single, u64_to_f32_bits, Collective, Comm, CommError, CommStats, LinkModel, ReduceOp,
    Traffic,
};
use crate::threads::in_own_pool;
use crate::Result;

/// How long every rank must stay blocked, with nothing changing, before it is a deadlock.
const DEADLOCK_GRACE: Duration = Duration::from_secs(2);

/// One rank's handle on a world of threads. Dropping it marks the rank as gone.
pub struct LocalComm {
    rank: usize,
    world: Arc<World>,
    next_seq: AtomicU64,
    /// Splits made so far (every rank splits in the same order, so this names a split).
    splits: AtomicU64,
    stats: Mutex<CommStats>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.world.size)
    }
}

struct World {
    size: usize,
    link: Option<LinkModel>,
    state: Mutex<State>,
    changed: Condvar,
}

impl World {
    /// Something happened that may end a wait: wake every waiting thread.
    fn progressed(&self, st: &mut State) {
        st.progress += 1;
        self.changed.notify_all();
    }

    fn new(size: usize, link: Option<LinkModel>) -> Arc<World> {
        let state = State {
            pending: HashMap::new(),
            mailbox: HashMap::new(),
            alive: vec![true; size],
            waits: vec![Vec::new(); size],
            deadlock: None,
            grace: Some(DEADLOCK_GRACE),
            progress: 0,
            participants: vec![Vec::new(); size],
            groups: HashMap::new(),
        };
        Arc::new(World { size, link, state: Mutex::new(state), changed: Condvar::new() })
    }
}

/// What a blocked thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Collective(u64),
    Recv { from: usize, tag: u64 },
}

struct Message {
    data: Vec<f32>,
    /// When the modelled link delivers it.
    arrives: Instant,
}

/// A collective some ranks have joined.
struct Pending {
    calls: Vec<Option<(Collective, Vec<Vec<f32>>)>>,
    arrived: usize,
    last_arrival: Instant,
    outcome: Option<Outcome>,
    left_to_take: usize,
}

enum Outcome {
    Done { outputs: Vec<Option<Vec<Vec<f32>>>>, traffic: Vec<Traffic>, ready_at: Instant },
    Failed(String),
}

/// This rank's part of a completed collective.
type Taken = (Vec<Vec<f32>>, Traffic, Instant);

impl Pending {
    fn new(size: usize, now: Instant) -> Pending {
        Pending {
            calls: (0..size).map(|_| None).collect(),
            arrived: 0,
            last_arrival: now,
            outcome: None,
            left_to_take: size,
        }
    }

    fn complete(&mut self, link: Option<&LinkModel>) {
        let calls = self.calls.iter_mut().map(|c| c.take().expect("every rank arrived")).collect();
        self.outcome = Some(match combine(calls) {
            Ok(c) => {
                let slowest = c.traffic.iter().map(|t| t.cost(link)).max().unwrap_or_default();
                Outcome::Done {
                    outputs: c.outputs.into_iter().map(Some).collect(),
                    traffic: c.traffic,
                    ready_at: self.last_arrival + slowest,
                }
            }
            Err(detail) => Outcome::Failed(detail),
        });
    }
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Queued messages by (from, to, tag).
    mailbox: HashMap<(usize, usize, u64), VecDeque<Message>>,
    alive: Vec<bool>,
    /// Per rank, what its blocked threads wait for.
    waits: Vec<Vec<Wait>>,
    /// Set once a deadlock is found: its description.
    deadlock: Option<String>,
    /// How long a deadlock must last before it is declared; `None`: never.
    grace: Option<Duration>,
    /// Counts changes that could end a wait (arrivals, messages, departures).
    progress: u64,
    /// Per rank, the live threads that have used its communicator.
    participants: Vec<Vec<ThreadId>>,
    /// Sub-worlds being handed out by a split, by (split, color): the world and how many of its
    /// members have yet to take it.
    groups: HashMap<(u64, u64), (Arc<World>, usize)>,
}

impl State {
    /// Whether `wait` (of a thread of `rank`) can end now, with a result or an error.
    fn can_end(&self, rank: usize, wait: Wait) -> bool {
        match wait {
            Wait::Collective(seq) => self.pending.get(&seq).is_none_or(|p| {
                p.outcome.is_some() || p.calls.iter().zip(&self.alive).any(|(c, &alive)| c.is_none() && !alive)
            }),
            Wait::Recv { from, tag } => {
                !self.alive[from] || self.mailbox.get(&(from, rank, tag)).is_some_and(|q| !q.is_empty())
            }
        }
    }

    /// Every thread of every rank still here that has used the communicator is blocked, and no
    /// wait can end.
    fn stuck(&self) -> bool {
        let mut here = (0..self.alive.len()).filter(|&r| self.alive[r]).peekable();
        here.peek().is_some()
            && here.all(|r| {
                let waits = &self.waits[r];
                !waits.is_empty()
                    && waits.len() >= self.participants[r].len()
                    && waits.iter().all(|&w| !self.can_end(r, w))
            })
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (r, waits) in self.waits.iter().enumerate().filter(|(r, _)| self.alive[*r]) {
            for w in waits {
                parts.push(match *w {
                    Wait::Collective(seq) => {
                        let missing: Vec<String> = self.pending[&seq]
                            .calls
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.is_none())
                            .map(|(j, _)| j.to_string())
                            .collect();
                        format!("rank {r} waits in collective #{seq} for rank(s) {}", missing.join(", "))
                    }
                    Wait::Recv { from, tag } => format!("rank {r} waits for a message from rank {from} with tag {tag}"),
                });
            }
        }
        parts.join("; ")
    }

    fn remove_wait(&mut self, rank: usize, wait: Wait) {
        if let Some(i) = self.waits[rank].iter().position(|&w| w == wait) {
            self.waits[rank].swap_remove(i);
        }
    }

    /// `rank`'s result of collective `seq`, once there is one (or an error once there will be none).
    fn take(&mut self, seq: u64, rank: usize, kind: Collective) -> Option<Result<Taken>> {
        let p = self.pending.get_mut(&seq).expect("a joined collective stays until every rank took its part");
        let result = match &mut p.outcome {
            Some(Outcome::Done { outputs, traffic, ready_at }) => {
                Ok((outputs[rank].take().unwrap_or_default(), traffic[rank], *ready_at))
            }
            Some(Outcome::Failed(detail)) => {
                Err(CommError::Mismatch { rank, seq, op: kind.to_string(), detail: detail.clone() })
            }
            None => {
                let gone = p.calls.iter().zip(&self.alive).position(|(c, &alive)| c.is_none() && !alive)?;
                let op = format!("collective #{seq} ({kind})");
                return Some(Err(CommError::RankLeft { rank, op, peer: gone }.into()));
            }
        };
        p.left_to_take -= 1;
        if p.left_to_take == 0 {
            self.pending.remove(&seq);
        }
        Some(result.map_err(Into::into))
    }
}

/// The (world, rank) pairs this thread has used; leaving them when the thread exits.
struct Registrations(RefCell<Vec<(Weak<World>, usize)>>);

impl Drop for Registrations {
    fn drop(&mut self) {
        let me = std::thread::current().id();
        for (world, rank) in self.0.borrow().iter() {
            if let Some(world) = world.upgrade() {
                let mut st = world.state.lock().unwrap_or_else(PoisonError::into_inner);
                st.participants[*rank].retain(|&t| t != me);
                world.progressed(&mut st);
            }
        }
    }
}

thread_local! {
    static REGISTRATIONS: Registrations = const { Registrations(RefCell::new(Vec::new())) };
}

/// Rank `rank`'s share of `threads` threads over `ranks` ranks: as even as whole threads allow
/// (the first `threads % ranks` ranks take one more), and at least one.
fn thread_share(threads: usize, ranks: usize, rank: usize) -> usize {
    let ranks = ranks.max(1);
    (threads / ranks + usize::from(rank < threads % ranks)).max(1)
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

impl LocalComm {
    /// The handles of a new world of `size` ranks (one per rank, in rank order), each to be moved
    /// to its rank's thread. `link`: the modelled cost of every message, or none.
    pub fn world(size: usize, link: Option<LinkModel>) -> Vec<LocalComm> {
        let world = World::new(size, link);
        (0..size).map(|rank| LocalComm::member(rank, world.clone())).collect()
    }

    fn member(rank: usize, world: Arc<World>) -> LocalComm {
        LocalComm {
            rank,
            world,
            next_seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            stats: Mutex::new(CommStats::default()),
        }
    }

    /// A world of one: every collective returns its input; a rank may send to itself.
    pub fn single() -> LocalComm {
        Self::world(1, None).pop().expect("a world of one has one rank")
    }

    /// Runs `f` on `size` ranks, each a thread with its own handle, and returns their results in
    /// rank order. A panic in a rank is re-raised here once every rank has finished (the others
    /// see the panicked rank leave, so they fail instead of waiting for it).
    pub fn run<R: Send>(size: usize, f: impl Fn(&LocalComm) -> R + Sync) -> Vec<R> {
        Self::run_with(size, None, f)
    }

    /// [`LocalComm::run`] on a modelled link.
    ///
    /// Each rank computes on a rayon pool of its own ([`in_own_pool`]), of its share of the
    /// caller's threads (`thread_share`), as if it were a process of its own; the rank threads
    /// themselves only wait for their pools.
    pub fn run_with<R: Send>(size: usize, link: Option<LinkModel>, f: impl Fn(&LocalComm) -> R + Sync) -> Vec<R> {
        let f = &f;
        let available = rayon::current_num_threads();
        std::thread::scope(|s| {
            let threads: Vec<_> = Self::world(size, link)
                .into_iter()
                .map(|comm| {
                    let (name, share) = (format!("rank {}", comm.rank), thread_share(available, size, comm.rank));
                    std::thread::Builder::new()
                        .name(name.clone())
                        .spawn_scoped(s, move || match in_own_pool(share, &name, || f(&comm)) {
                            Ok(r) => r,
                            Err(e) => panic!("{e}"),
                        })
                        .expect("spawning a rank thread")
                })
                .collect();
            let mut results = Vec::with_capacity(size);
            let mut panic = None;
            for t in threads {
                match t.join() {
                    Ok(r) => results.push(r),
                    Err(p) => {
                        panic.get_or_insert(p);
                    }
                }
            }
            if let Some(p) = panic {
                std::panic::resume_unwind(p);
            }
            results
        })
    }

    pub fn link(&self) -> Option<LinkModel> {
        self.world.link
    }

    /// How long every rank must stay blocked with nothing changing before the world reports a
    /// deadlock (for the whole world; `None` turns detection off).
    pub fn set_deadlock_grace(&self, grace: Option<Duration>) {
        self.lock().grace = grace;
    }

    /// Counts this thread as one of its rank's until the thread exits.
    fn register(&self, st: &mut State) {
        let me = std::thread::current().id();
        if st.participants[self.rank].contains(&me) {
            return;
        }
        st.participants[self.rank].push(me);
        let entry = (Arc::downgrade(&self.world), self.rank);
        // During the thread's own teardown there is nothing left to register with.
        let _ = REGISTRATIONS.try_with(|r| r.0.borrow_mut().push(entry));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.world.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deadlock(&self, st: &State) -> Option<CommError> {
        st.deadlock.as_ref().map(|d| CommError::Deadlock { rank: self.rank, detail: d.clone() })
    }

    fn check_peer(&self, op: &str, peer: usize) -> Result<()> {
        if peer >= self.world.size {
            let msg = format!("rank {peer} is outside a world of {}", self.world.size);
            return Err(CommError::Invalid { rank: self.rank, op: op.into(), msg }.into());
        }
        Ok(())
    }

    fn record(&self, traffic: Traffic) {
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        s.calls += 1;
        s.messages += traffic.messages;
        s.bytes += traffic.bytes;
        s.modelled += traffic.cost(self.world.link.as_ref());
    }

    /// Blocks until `poll` gives a result, re-polling whenever the world changes; fails when every
    /// rank is blocked and none can go on.
    fn wait_for<T>(
        &self,
        mut st: MutexGuard<'_, State>,
        wait: Wait,
        mut poll: impl FnMut(&mut State) -> Option<Result<T>>,
    ) -> Result<T> {
        self.register(&mut st);
        loop {
            // A deadlock breaks the world: even a wait that a departing rank would now end reports it.
            if let Some(e) = self.deadlock(&st) {
                return Err(e.into());
            }
            if let Some(r) = poll(&mut st) {
                return r;
            }
            st.waits[self.rank].push(wait);
            let progress = st.progress;
            st = match (st.stuck(), st.grace) {
                (true, Some(grace)) => {
                    let (mut st, timeout) =
                        self.world.changed.wait_timeout(st, grace).unwrap_or_else(PoisonError::into_inner);
                    if timeout.timed_out() && st.progress == progress && st.stuck() && st.deadlock.is_none() {
                        st.deadlock = Some(st.describe());
                        self.world.changed.notify_all();
                    }
                    st
                }
                _ => self.world.changed.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
            st.remove_wait(self.rank, wait);
        }
    }

    /// Joins the next collective with this rank's buffers and returns this rank's result, after
    /// the modelled time of the slowest rank's messages.
    fn collective(&self, kind: Collective, bufs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        let now = Instant::now();
        let size = self.world.size;
        let p = st.pending.entry(seq).or_insert_with(|| Pending::new(size, now));
        p.calls[self.rank] = Some((kind, bufs));
        p.arrived += 1;
        p.last_arrival = p.last_arrival.max(now);
        if p.arrived == size {
            p.complete(self.world.link.as_ref());
            self.world.progressed(&mut st);
        }
        let (out, traffic, ready_at) = self.wait_for(st, Wait::Collective(seq), |st| st.take(seq, self.rank, kind))?;
        self.record(traffic);
        sleep_until(ready_at);
        Ok(out)
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.alive[self.rank] = false;
        self.world.progressed(&mut st);
    }
}

impl Comm for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world.size
    }

    collectives_via_combine!();

    fn send(&self, to: usize, tag: u64, data: &[f32]) -> Result<()> {
        self.check_peer("send", to)?;
        let traffic = if to == self.rank { Traffic::default() } else { Traffic::uniform(1, data.len()) };
        let arrives = Instant::now() + traffic.cost(self.world.link.as_ref());
        let mut st = self.lock();
        self.register(&mut st);
        if let Some(e) = self.deadlock(&st) {
            return Err(e.into());
        }
        if !st.alive[to] {
            return Err(CommError::RankLeft { rank: self.rank, op: format!("send (tag {tag})"), peer: to }.into());
        }
        st.mailbox.entry((self.rank, to, tag)).or_default().push_back(Message { data: data.to_vec(), arrives });
        self.world.progressed(&mut st);
        drop(st);
        self.record(traffic);
        Ok(())
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.check_peer("recv", from)?;
        let st = self.lock();
        let msg = self.wait_for(st, Wait::Recv { from, tag }, |st| {
            if let Some(m) = st.mailbox.get_mut(&(from, self.rank, tag)).and_then(VecDeque::pop_front) {
                return Some(Ok(m));
            }
            let op = format!("recv (tag {tag})");
            (!st.alive[from]).then(|| Err(CommError::RankLeft { rank: self.rank, op, peer: from }.into()))
        })?;
        sleep_until(msg.arrives);
        Ok(msg.data)
    }

    fn join_thread(&self) {
        let mut st = self.lock();
        self.register(&mut st);
    }

    fn stats(&self) -> CommStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every rank learns every (color, key) from one all-gather; the first member of a group to
    /// get here creates its world (same link model), the others join it.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>> {
        let split = self.splits.fetch_add(1, Ordering::Relaxed);
        let all: Vec<u64> = f32_bits_to_u64(&self.all_gather(&u64_to_f32_bits(&[color as u64, key as u64]))?).collect();
        let mut members: Vec<(u64, usize)> =
            (0..self.world.size).filter(|&r| all[2 * r] == color as u64).map(|r| (all[2 * r + 1], r)).collect();
        members.sort_unstable();
        let rank = members.iter().position(|&(_, r)| r == self.rank).expect("a rank is in its own group");
        let mut st = self.lock();
        let entry = st
            .groups
            .entry((split, color as u64))
            .or_insert_with(|| (World::new(members.len(), self.world.link), members.len()));
        let world = entry.0.clone();
        entry.1 -= 1;
        if entry.1 == 0 {
            st.groups.remove(&(split, color as u64));
        }
        Ok(Box::new(LocalComm::member(rank, world)))
    }
}

#[cfg(test)]
mod tests {
    use super::thread_share;

    #[test]
    fn ranks_share_the_threads_as_evenly_as_whole_threads_allow() {
        let shares = |threads, ranks| (0..ranks).map(|r| thread_share(threads, ranks, r)).collect::<Vec<_>>();
        assert_eq!(shares(3, 2), [2, 1]);
        assert_eq!(shares(8, 4), [2, 2, 2, 2]);
        assert_eq!(shares(2, 4), [1, 1, 1, 1], "at least one each");
        assert_eq!(shares(7, 3).iter().sum::<usize>(), 7);
    }
}
