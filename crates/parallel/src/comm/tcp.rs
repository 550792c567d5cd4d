//! [`TcpComm`]: ranks as processes (on one machine or many) joined by a full mesh of TCP
//! connections. It is the multi-process CPU communicator, and the host side of the NCCL one
//! (which keeps point-to-point messages here, where a send never waits for its receiver).
//!
//! Set-up: the launch rendezvous (`crate::launch`) hands every rank every other rank's listening
//! address; rank i then connects to each rank below it and accepts one connection from each rank
//! above. One reader thread per connection files incoming frames in a mailbox by (source,
//! channel, tag), so a send returns once its bytes are written and a receive waits only for its
//! own message.
//!
//! Collectives: every rank sends its call (the collective and its buffers' lengths) to every
//! other rank, with the part of its buffers that rank needs ([`part_for`]: all of them for an
//! all-reduce or all-gather, the root's for a broadcast, the receiver's slice for a
//! reduce-scatter, the receiver's buffer for an all-to-all), and each rank checks all the calls
//! and computes its result with the same code as [`LocalComm`](super::LocalComm) (rank-order
//! reductions: bit-identical on every rank). An all-reduce thus moves `W - 1` copies of the
//! buffer per rank, more than a ring; it is simple and exact, and meant for CPU runs and small
//! control messages. Sub-communicators from [`Comm::split`] share the connections under their
//! own channel.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{
    combine, f32_bits_to_u64, single, u64_to_f32_bits, Collective, Comm, CommError, CommStats, ReduceOp, Traffic,
};
use crate::launch::{accept_before, read_u32, rendezvous, LaunchEnv};
use crate::{Error, Result};

/// Frame header: source rank (u32), channel (u64), tag (u64), payload length in floats (u64).
const HEADER: usize = 28;

/// The connections of one process and what has arrived on them.
struct Mesh {
    rank: usize,
    writers: Vec<Option<Mutex<TcpStream>>>,
    state: Mutex<MeshState>,
    arrived: Condvar,
    /// How long a receive waits with no byte from its peer before it reports the silence as an
    /// error (a large message that is still arriving does not time out).
    patience: Duration,
}

#[derive(Default)]
struct MeshState {
    mailbox: HashMap<(usize, u64, u64), VecDeque<Vec<f32>>>,
    /// Peers whose connection ended, with why.
    gone: HashMap<usize, String>,
    /// When bytes last arrived from each peer.
    heard: HashMap<usize, Instant>,
}

/// A message body is read in pieces of this many bytes, each one news that the peer is there.
const READ_PIECE: usize = 1 << 20;

/// Why a receive from a peer got nothing.
enum Quiet {
    /// The connection ended (the peer dropped its communicator, exited or crashed).
    Ended(String),
    /// The connection is open but nothing came for the patience.
    For(Duration),
}

impl Quiet {
    fn error(self, rank: usize, op: String, peer: usize) -> Error {
        match self {
            Quiet::Ended(why) => CommError::RankLeft { rank, op: format!("{op} ({why})"), peer },
            Quiet::For(after) => CommError::Timeout { rank, op, peer, after },
        }
        .into()
    }
}

impl Mesh {
    fn deliver(&self, from: usize, channel: u64, tag: u64, data: Vec<f32>) {
        let mut st = self.state.lock().expect("mailbox lock");
        st.mailbox.entry((from, channel, tag)).or_default().push_back(data);
        drop(st);
        self.arrived.notify_all();
    }

    fn send(&self, to: usize, channel: u64, tag: u64, data: &[f32]) -> std::io::Result<()> {
        if to == self.rank {
            self.deliver(to, channel, tag, data.to_vec());
            return Ok(());
        }
        let mut frame = Vec::with_capacity(HEADER + 4 * data.len());
        frame.extend((self.rank as u32).to_le_bytes());
        frame.extend(channel.to_le_bytes());
        frame.extend(tag.to_le_bytes());
        frame.extend((data.len() as u64).to_le_bytes());
        data.iter().for_each(|x| frame.extend(x.to_le_bytes()));
        let writer = self.writers[to].as_ref().expect("a connection to every other rank");
        let mut stream = writer.lock().expect("writer lock");
        let sent = stream.write_all(&frame);
        if sent.is_err() {
            // Part of a frame may be out: nothing after it could be read right, so the connection
            // ends here (the peer's reader sees it end).
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        sent
    }

    fn recv(&self, from: usize, channel: u64, tag: u64) -> std::result::Result<Vec<f32>, Quiet> {
        let start = Instant::now();
        let mut st = self.state.lock().expect("mailbox lock");
        loop {
            if let Some(m) = st.mailbox.get_mut(&(from, channel, tag)).and_then(VecDeque::pop_front) {
                return Ok(m);
            }
            if let Some(why) = st.gone.get(&from) {
                return Err(Quiet::Ended(format!("the connection to rank {from} ended ({why})")));
            }
            let quiet_since = st.heard.get(&from).map_or(start, |&t| t.max(start));
            let deadline = quiet_since + self.patience;
            let now = Instant::now();
            if now >= deadline {
                return Err(Quiet::For(self.patience));
            }
            st = self.arrived.wait_timeout(st, deadline - now).expect("mailbox lock").0;
        }
    }

    fn heard_from(&self, peer: usize) {
        self.state.lock().expect("mailbox lock").heard.insert(peer, Instant::now());
    }

    /// Reads frames from `peer` until the connection ends.
    fn read_loop(self: Arc<Self>, peer: usize, mut stream: TcpStream) {
        let why = 'frames: loop {
            let mut head = [0u8; HEADER];
            if let Err(e) = stream.read_exact(&mut head) {
                break e.to_string();
            }
            self.heard_from(peer);
            let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
            let (channel, tag, len) = (word(4), word(12), word(20));
            // The body grows as it arrives: a corrupt header ends the connection (its bytes
            // never come) rather than sizing one huge allocation.
            let Some(bytes) = usize::try_from(len).ok().and_then(|n| n.checked_mul(4)) else {
                break format!("a frame header of {len} floats");
            };
            let mut body = Vec::with_capacity(bytes.min(READ_PIECE));
            while body.len() < bytes {
                let start = body.len();
                body.resize(start + (bytes - start).min(READ_PIECE), 0);
                if let Err(e) = stream.read_exact(&mut body[start..]) {
                    break 'frames e.to_string();
                }
                self.heard_from(peer);
            }
            let data = body.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            self.deliver(peer, channel, tag, data);
        };
        self.state.lock().expect("mailbox lock").gone.insert(peer, why);
        self.arrived.notify_all();
    }
}

impl std::fmt::Debug for TcpComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpComm(rank {} of {}, channel {})", self.rank, self.members.len(), self.channel)
    }
}

/// One rank's handle on a group of processes (the whole world, or a [`Comm::split`] of it).
pub struct TcpComm {
    mesh: Arc<Mesh>,
    /// World ranks of this group's members, by group rank.
    members: Vec<usize>,
    rank: usize,
    /// Separates this group's messages from other groups' on the shared connections.
    channel: u64,
    seq: AtomicU64,
    splits: AtomicU64,
    stats: Mutex<CommStats>,
    /// The world communicator owns the connections: dropping it closes them, so the peers see
    /// this rank leave instead of waiting for it.
    owner: bool,
}

impl Drop for TcpComm {
    fn drop(&mut self) {
        if self.owner {
            for w in self.mesh.writers.iter().flatten() {
                if let Ok(s) = w.lock() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }
}

/// This machine's address as the master sees it (the interface that routes to it).
fn reachable_ip(master: &str, port: u16) -> IpAddr {
    UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect((master, port)).map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Where to connect to a peer that advertised `advertised`: there, unless that is a loopback or
/// unspecified address (its host name maps to 127.0.1.1) and the rendezvous knows better: where
/// the master saw the peer connect from, or, when that was a loopback too (the peer shares the
/// master's machine), where this rank reached the master.
fn reachable_at(advertised: SocketAddr, seen: Option<IpAddr>, master: Option<IpAddr>) -> SocketAddr {
    let local = |ip: &IpAddr| ip.is_loopback() || ip.is_unspecified();
    if !local(&advertised.ip()) {
        return advertised;
    }
    let elsewhere = seen.filter(|ip| !local(ip)).or(master.filter(|ip| !local(ip)));
    elsewhere.map_or(advertised, |ip| SocketAddr::new(ip, advertised.port()))
}

fn io(op: &str, e: impl std::fmt::Display) -> Error {
    Error::Train(format!("tcp comm: {op}: {e}"))
}

/// The connections of ranks `rank + 1 .. world`, which connect to this one right after the
/// rendezvous and greet it with their rank. A rank that died since is an error after `timeout`,
/// not a wait forever; a connection that greets with no rank of theirs (a port scan, a health
/// check) is dropped, as the rendezvous drops one; two that claim the same rank are an error.
fn accept_peers(
    listener: &TcpListener,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<(usize, TcpStream)>> {
    let deadline = Instant::now() + timeout;
    // A rank greets at once: a connection silent for seconds is not one.
    let greeting = timeout.min(Duration::from_secs(5));
    let mut peers: Vec<(usize, TcpStream)> = Vec::new();
    while peers.len() < world - rank - 1 {
        let Some((mut s, from)) = accept_before(listener, deadline, greeting).map_err(|e| io("accepting", e))? else {
            let missing: Vec<usize> = (rank + 1..world).filter(|r| !peers.iter().any(|(p, _)| p == r)).collect();
            return Err(io("accepting", format!("ranks {missing:?} did not connect in {timeout:?}")));
        };
        let peer = match read_u32(&mut s) {
            Ok(p) if (rank + 1..world).contains(&(p as usize)) => p as usize,
            Ok(p) => {
                eprintln!("tcp comm: dropped a connection from {from} that claims rank {p} (not a rank above {rank})");
                continue;
            }
            Err(e) => {
                eprintln!("tcp comm: dropped a connection from {from} that sent no rank ({e})");
                continue;
            }
        };
        if peers.iter().any(|(p, _)| *p == peer) {
            return Err(io("accepting", format!("two connections claim rank {peer}")));
        }
        // Frames wait as long as the program does; `patience` bounds a receive instead.
        s.set_read_timeout(None).map_err(|e| io("socket", e))?;
        peers.push((peer, s));
    }
    Ok(peers)
}

impl TcpComm {
    /// Joins the world `env` describes (every rank calls this; see [`LaunchEnv::from_env`]).
    /// A receive that hears nothing from its peer for `patience` fails rather than hang (torch's
    /// collective timeout): make it longer than any pause a rank takes alone while the others
    /// wait for it, such as rank 0 writing a checkpoint.
    pub fn connect(env: &LaunchEnv, timeout: Duration, patience: Duration) -> Result<TcpComm> {
        let ip = reachable_ip(&env.master_addr, env.master_port);
        let any: IpAddr = if ip.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let listener = TcpListener::bind(SocketAddr::new(any, 0)).map_err(|e| io("listening", e))?;
        let port = listener.local_addr().map_err(|e| io("listening", e))?.port();
        let me = SocketAddr::new(ip, port).to_string();
        let blob = (env.rank == 0).then_some(&b"whale-tcp"[..]);
        let met = rendezvous(env, blob, me.as_bytes(), timeout)?;
        let (rank, world) = (env.rank, env.world_size);
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (peer, addr) in met.contributions.iter().enumerate().take(rank) {
            let advertised: SocketAddr = String::from_utf8_lossy(addr)
                .parse()
                .map_err(|e| io(&format!("rank {peer}'s address {:?}", String::from_utf8_lossy(addr)), e))?;
            let addr = reachable_at(advertised, met.seen[peer], met.seen[0]);
            let mut s = TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1)))
                .map_err(|e| io(&format!("connecting to rank {peer} at {addr}"), e))?;
            s.write_all(&(rank as u32).to_le_bytes()).map_err(|e| io("greeting", e))?;
            streams[peer] = Some(s);
        }
        for (peer, s) in accept_peers(&listener, rank, world, timeout)? {
            streams[peer] = Some(s);
        }
        let mut writers = Vec::with_capacity(world);
        let mut readers = Vec::new();
        for (peer, s) in streams.into_iter().enumerate() {
            match s {
                Some(s) => {
                    s.set_nodelay(true).map_err(|e| io("socket", e))?;
                    // A peer that stops reading fails the send after `patience` instead of
                    // blocking it (and every later send to that peer) for good.
                    s.set_write_timeout(Some(patience.max(Duration::from_millis(1)))).map_err(|e| io("socket", e))?;
                    readers.push((peer, s.try_clone().map_err(|e| io("socket", e))?));
                    writers.push(Some(Mutex::new(s)));
                }
                None => writers.push(None),
            }
        }
        let mesh = Arc::new(Mesh {
            rank,
            writers,
            state: Mutex::new(MeshState::default()),
            arrived: Condvar::new(),
            patience,
        });
        for (peer, s) in readers {
            let m = mesh.clone();
            std::thread::Builder::new()
                .name(format!("tcp comm {rank}<-{peer}"))
                .spawn(move || m.read_loop(peer, s))
                .map_err(|e| io("spawning a reader", e))?;
        }
        Ok(TcpComm::group(mesh, (0..world).collect(), rank, 0, true))
    }

    fn group(mesh: Arc<Mesh>, members: Vec<usize>, rank: usize, channel: u64, owner: bool) -> TcpComm {
        TcpComm {
            mesh,
            members,
            rank,
            channel,
            seq: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            stats: Mutex::new(CommStats::default()),
            owner,
        }
    }

    fn record(&self, traffic: Traffic) {
        let mut s = self.stats.lock().expect("stats lock");
        s.calls += 1;
        s.messages += traffic.messages;
        s.bytes += traffic.bytes;
    }

    fn failed(&self, op: &str, msg: String) -> Error {
        CommError::Invalid { rank: self.rank, op: op.to_string(), msg }.into()
    }

    /// [`Comm::split`] with the concrete type (the NCCL communicator splits its host mesh).
    pub fn split_tcp(&self, color: usize, key: usize) -> Result<TcpComm> {
        let n = self.splits.fetch_add(1, Ordering::SeqCst);
        let all = self.all_gather(&u64_to_f32_bits(&[color as u64, key as u64]))?;
        let words: Vec<u64> = f32_bits_to_u64(&all).collect();
        let mut group: Vec<(u64, usize)> = words
            .chunks_exact(2)
            .enumerate()
            .filter(|(_, ck)| ck[0] == color as u64)
            .map(|(r, ck)| (ck[1], r))
            .collect();
        group.sort_unstable();
        let members: Vec<usize> = group.iter().map(|&(_, r)| self.members[r]).collect();
        let rank = group.iter().position(|&(_, r)| r == self.rank).expect("this rank is in its own color");
        // The same on every member (same parent, same split, same color), different across colors.
        let channel = mix(mix(mix(self.channel, n), color as u64), 0x5eed);
        Ok(TcpComm::group(self.mesh.clone(), members, rank, channel, false))
    }

    /// Runs one collective: every member's call goes to every member, each computes the results.
    fn collective(&self, kind: Collective, bufs: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        if let Some(b) = bufs.iter().find(|b| b.len() > u32::MAX as usize) {
            return Err(self.failed(&kind.to_string(), format!("a buffer of {} floats (at most 2^32 - 1)", b.len())));
        }
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let w = self.members.len();
        let channel = self.channel * 2 + 1;
        for (peer, &global) in self.members.iter().enumerate() {
            if peer != self.rank {
                self.mesh
                    .send(global, channel, seq, &encode(kind, &bufs, &part_for(kind, &bufs, self.rank, peer, w)))
                    .map_err(|e| self.failed(&kind.to_string(), e.to_string()))?;
            }
        }
        let mut calls = Vec::with_capacity(w);
        for (peer, &global) in self.members.iter().enumerate() {
            if peer == self.rank {
                calls.push((kind, bufs.clone()));
                continue;
            }
            let msg = self.mesh.recv(global, channel, seq).map_err(|q| q.error(self.rank, kind.to_string(), peer))?;
            calls.push(
                decode(&msg)
                    .ok_or_else(|| self.failed(&kind.to_string(), format!("rank {peer} sent a garbled call")))?,
            );
        }
        let combined = combine(calls).map_err(|detail| {
            Error::from(CommError::Mismatch { rank: self.rank, seq, op: kind.to_string(), detail })
        })?;
        let mut outputs = combined.outputs;
        self.record(combined.traffic[self.rank]);
        Ok(std::mem::take(&mut outputs[self.rank]))
    }
}

/// What rank `to` needs of the buffers of rank `from`'s call, as a range of each: all of them
/// where every rank folds or gathers every buffer, the root's for a broadcast (the others'
/// lengths are still checked), `to`'s slice for a reduce-scatter and `to`'s buffer for an
/// all-to-all.
fn part_for(kind: Collective, bufs: &[Vec<f32>], from: usize, to: usize, w: usize) -> Vec<Range<usize>> {
    let all = |b: &Vec<f32>| 0..b.len();
    match kind {
        Collective::AllReduce(_) | Collective::AllGather | Collective::Barrier => bufs.iter().map(all).collect(),
        Collective::Broadcast { root } => bufs.iter().map(|b| if from == root { all(b) } else { 0..0 }).collect(),
        Collective::ReduceScatter(_) => bufs
            .iter()
            .map(|b| {
                // A length that is not a multiple of the world is refused on every rank anyway.
                let s = b.len() / w;
                if b.len() % w == 0 {
                    to * s..(to + 1) * s
                } else {
                    0..0
                }
            })
            .collect(),
        Collective::AllToAll => bufs.iter().enumerate().map(|(j, b)| if j == to { all(b) } else { 0..0 }).collect(),
    }
}

/// A call as floats: kind, its parameter, the number of buffers, their lengths, the range of each
/// that is sent, the values in those ranges (each count a u32: a longer buffer is refused by
/// [`TcpComm::collective`]).
fn encode(kind: Collective, bufs: &[Vec<f32>], sent: &[Range<usize>]) -> Vec<f32> {
    let op_code = |op: ReduceOp| match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 1,
        ReduceOp::Min => 2,
    };
    let (k, param) = match kind {
        Collective::AllReduce(op) => (0u32, op_code(op)),
        Collective::Broadcast { root } => (1, root as u32),
        Collective::AllGather => (2, 0),
        Collective::ReduceScatter(op) => (3, op_code(op)),
        Collective::AllToAll => (4, 0),
        Collective::Barrier => (5, 0),
    };
    let bits = |x: u32| f32::from_bits(x);
    let mut out = vec![bits(k), bits(param), bits(bufs.len() as u32)];
    out.extend(bufs.iter().map(|b| bits(b.len() as u32)));
    out.extend(sent.iter().flat_map(|r| [bits(r.start as u32), bits(r.len() as u32)]));
    bufs.iter().zip(sent).for_each(|(b, r)| out.extend_from_slice(&b[r.clone()]));
    out
}

fn decode(msg: &[f32]) -> Option<(Collective, Vec<Vec<f32>>)> {
    let word = |i: usize| msg.get(i).map(|x| x.to_bits());
    let op = |c: u32| match c {
        0 => Some(ReduceOp::Sum),
        1 => Some(ReduceOp::Max),
        2 => Some(ReduceOp::Min),
        _ => None,
    };
    let (k, param, n) = (word(0)?, word(1)?, word(2)? as usize);
    if n.checked_mul(3).is_none_or(|words| words > msg.len()) {
        return None;
    }
    let kind = match k {
        0 => Collective::AllReduce(op(param)?),
        1 => Collective::Broadcast { root: param as usize },
        2 => Collective::AllGather,
        3 => Collective::ReduceScatter(op(param)?),
        4 => Collective::AllToAll,
        5 => Collective::Barrier,
        _ => return None,
    };
    // What was not sent is zeros: `combine` computes every rank's output and this rank keeps its
    // own, which reads only what was sent.
    let mut at = 3 + 3 * n;
    let mut bufs = Vec::with_capacity(n);
    for i in 0..n {
        let (len, start, count) = (word(3 + i)? as usize, word(3 + n + 2 * i)? as usize, word(4 + n + 2 * i)? as usize);
        let mut buf = vec![0.0; len];
        buf.get_mut(start..start.checked_add(count)?)?.copy_from_slice(msg.get(at..at + count)?);
        bufs.push(buf);
        at += count;
    }
    Some((kind, bufs))
}

impl Comm for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    collectives_via_combine!();

    fn send(&self, to: usize, tag: u64, data: &[f32]) -> Result<()> {
        let global = *self.members.get(to).ok_or_else(|| self.failed("send", format!("no rank {to}")))?;
        self.mesh.send(global, self.channel * 2, tag, data).map_err(|e| self.failed("send", e.to_string()))?;
        self.record(Traffic::uniform(usize::from(to != self.rank), data.len()));
        Ok(())
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        let global = *self.members.get(from).ok_or_else(|| self.failed("recv", format!("no rank {from}")))?;
        self.mesh.recv(global, self.channel * 2, tag).map_err(|q| q.error(self.rank, format!("recv (tag {tag})"), from))
    }

    fn stats(&self) -> CommStats {
        *self.stats.lock().expect("stats lock")
    }

    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>> {
        Ok(Box::new(self.split_tcp(color, key)?))
    }
}

/// A 64-bit mixing step (splitmix64's finaliser over `a * K + b`).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(b).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) >> 1 // the top bit stays clear: channels are doubled
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each rank's result from the parts its peers send equals its result from their whole calls,
    /// disagreements are found as they are from whole calls, and an all-to-all or reduce-scatter
    /// sends each peer only its own share.
    #[test]
    fn each_peer_gets_the_part_it_needs_and_the_same_result() {
        let kinds = [
            Collective::AllReduce(ReduceOp::Sum),
            Collective::AllReduce(ReduceOp::Max),
            Collective::Broadcast { root: 0 },
            Collective::Broadcast { root: 2 },
            Collective::AllGather,
            Collective::ReduceScatter(ReduceOp::Sum),
            Collective::AllToAll,
            Collective::Barrier,
        ];
        let value = |r: usize, j: usize, i: usize| (r * 100 + j * 10 + i) as f32 + 0.25;
        // A world's calls: `n` floats per buffer (all-to-all: rank r sends r + j + 1 to rank j).
        let calls = |kind: Collective, w: usize, n: &dyn Fn(usize) -> usize| -> Vec<(Collective, Vec<Vec<f32>>)> {
            (0..w)
                .map(|r| {
                    let bufs = match kind {
                        Collective::Barrier => Vec::new(),
                        Collective::AllToAll => {
                            (0..w).map(|j| (0..r + j + 1).map(|i| value(r, j, i)).collect()).collect()
                        }
                        _ => vec![(0..n(r)).map(|i| value(r, 0, i)).collect()],
                    };
                    (kind, bufs)
                })
                .collect()
        };
        // What rank `me` computes from the frames its peers would send it.
        let at_rank = |me: usize, whole: &[(Collective, Vec<Vec<f32>>)]| {
            let w = whole.len();
            let mut sent = 0;
            let got: Vec<(Collective, Vec<Vec<f32>>)> = whole
                .iter()
                .enumerate()
                .map(|(r, (kind, bufs))| {
                    if r == me {
                        return (*kind, bufs.clone());
                    }
                    let parts = part_for(*kind, bufs, r, me, w);
                    sent += parts.iter().map(Range::len).sum::<usize>();
                    decode(&encode(*kind, bufs, &parts)).expect("a frame decodes")
                })
                .collect();
            (combine(got).map(|mut c| std::mem::take(&mut c.outputs[me])), sent)
        };
        for w in 1..=4 {
            for kind in kinds {
                if matches!(kind, Collective::Broadcast { root } if root >= w) {
                    continue;
                }
                let whole = calls(kind, w, &|_| 3 * w);
                let want = combine(whole.clone()).map(|c| c.outputs).unwrap();
                for me in 0..w {
                    let (got, sent) = at_rank(me, &whole);
                    assert_eq!(got.unwrap(), want[me], "{kind} at rank {me} of {w}");
                    let least = match kind {
                        Collective::AllReduce(_) | Collective::AllGather => (w - 1) * 3 * w,
                        Collective::Broadcast { root } => usize::from(root != me) * 3 * w,
                        Collective::ReduceScatter(_) => (w - 1) * 3,
                        Collective::AllToAll => (0..w).filter(|&r| r != me).map(|r| r + me + 1).sum(),
                        Collective::Barrier => 0,
                    };
                    assert_eq!(sent, least, "{kind} at rank {me} of {w}: floats received");
                }
                // A rank whose buffer has another length is named as from whole calls.
                if w > 1 && !matches!(kind, Collective::AllToAll | Collective::Barrier) {
                    let odd = calls(kind, w, &|r| if r == 1 { 3 * w + 1 } else { 3 * w });
                    for me in 0..w {
                        assert_eq!(at_rank(me, &odd).0.err(), combine(odd.clone()).err(), "{kind} at rank {me}");
                    }
                }
            }
        }
        assert!(decode(&[]).is_none());
    }

    #[test]
    fn a_loopback_address_is_replaced_by_where_the_rendezvous_saw_the_peer() {
        let at = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let ip = |s: &str| -> Option<IpAddr> { Some(s.parse().unwrap()) };
        // A routable address is used as advertised.
        assert_eq!(reachable_at(at("10.0.0.2:4000"), ip("10.0.0.9"), ip("10.0.0.1")), at("10.0.0.2:4000"));
        // Rank 0 on a host whose name maps to 127.0.1.1: where this rank reached the master.
        assert_eq!(reachable_at(at("127.0.1.1:4000"), ip("10.0.0.1"), ip("10.0.0.1")), at("10.0.0.1:4000"));
        // Another rank: where the master saw it; on the master's machine, the master's address.
        assert_eq!(reachable_at(at("127.0.0.1:4001"), ip("10.0.0.2"), ip("10.0.0.1")), at("10.0.0.2:4001"));
        assert_eq!(reachable_at(at("127.0.1.1:4002"), ip("127.0.1.1"), ip("10.0.0.1")), at("10.0.0.1:4002"));
        assert_eq!(reachable_at(at("0.0.0.0:4003"), None, ip("10.0.0.1")), at("10.0.0.1:4003"));
        // One machine: loopback all along.
        assert_eq!(reachable_at(at("127.0.0.1:4004"), ip("127.0.0.1"), ip("127.0.0.1")), at("127.0.0.1:4004"));
        assert_eq!(reachable_at(at("[::1]:4005"), ip("::1"), None), at("[::1]:4005"));
    }

    #[test]
    fn connections_that_are_not_ranks_are_dropped_and_the_ranks_are_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let greet = |rank: Option<u32>| {
            let mut s = TcpStream::connect(addr).unwrap();
            if let Some(r) = rank {
                s.write_all(&r.to_le_bytes()).unwrap();
            }
            s
        };
        // Rank 1 of 4 accepts ranks 2 and 3; a health check that says nothing and a stray that
        // claims rank 9 come first.
        let (_silent, _stray, _two, _three) = (greet(None), greet(Some(9)), greet(Some(2)), greet(Some(3)));
        drop(_silent);
        let mut got: Vec<usize> =
            accept_peers(&listener, 1, 4, Duration::from_secs(10)).unwrap().into_iter().map(|(p, _)| p).collect();
        got.sort_unstable();
        assert_eq!(got, [2, 3]);
        // A rank claimed twice is an error, and so is one that never comes.
        let (_a, _b) = (greet(Some(2)), greet(Some(2)));
        let err = accept_peers(&listener, 1, 4, Duration::from_secs(10)).unwrap_err().to_string();
        assert!(err.contains("two connections claim rank 2"), "{err}");
        let err = accept_peers(&listener, 2, 4, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("[3]"), "{err}");
    }
}
