//! Multi-process launch, torchrun-style: each process reads its place from the environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and the processes meet at
//! a TCP rendezvous on the master, where rank 0 hands every other rank one blob (NCCL's unique
//! id, so that all processes join the same NCCL communicator, on one node or across nodes).
//!
//! Protocol: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects (retrying
//! until the deadline, since the master may start last) and sends its rank and the world size
//! as two little-endian u32, then its own contribution (a u32 length and bytes: its listening
//! address, for a mesh of direct connections); the master checks them (each rank once, the same
//! world size) and, once all ranks have arrived, answers each with the blob, every rank's
//! contribution and the address it saw each rank connect from (empty for rank 0), each as a u32
//! length and bytes. A connection that fails before its hello is whole (a port scanner, a health
//! check) is dropped, and the master keeps waiting for the ranks.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// This process's place in a launched world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU of this process on its node.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl LaunchEnv {
    /// Rank `rank` of `world_size` processes on this machine, meeting at `127.0.0.1:port` (tests,
    /// and ranks started as threads).
    pub fn localhost(rank: usize, world_size: usize, port: u16) -> LaunchEnv {
        LaunchEnv { rank, world_size, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
    }

    /// Reads the launch variables; `None` when `RANK` and `WORLD_SIZE` are both unset (a plain,
    /// single-process run). A malformed or missing variable is an error naming it (`MASTER_ADDR`
    /// and `MASTER_PORT` may be left out only by a world of one, as torch's `env://` requires).
    ///
    /// Under torchrun's default static rendezvous its agent's own store already listens on
    /// `MASTER_PORT` (it sets `TORCHELASTIC_USE_AGENT_STORE=True`): Whale's rendezvous then needs
    /// a port of its own in `WHALE_RDZV_PORT`, on the same master.
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`LaunchEnv::from_env`] over any lookup (tests).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        if get("RANK").is_none() && get("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let var = |k: &str| get(k).ok_or_else(|| Error::Train(format!("launch: `{k}` is not set")));
        let num = |k: &str| -> Result<usize> {
            let v = var(k)?;
            v.trim().parse().map_err(|_| Error::Train(format!("launch: `{k}`={v:?} is not a non-negative integer")))
        };
        let (rank, world_size) = (num("RANK")?, num("WORLD_SIZE")?);
        if world_size == 0 || rank >= world_size {
            return Err(Error::Train(format!("launch: RANK {rank} is not below WORLD_SIZE {world_size}")));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(_) => num("LOCAL_RANK")?,
            None => rank,
        };
        let alone = |k: &str, default: &str| match get(k) {
            Some(v) => Ok(v),
            None if world_size == 1 => Ok(default.to_string()),
            None => var(k),
        };
        let master_addr = alone("MASTER_ADDR", "127.0.0.1")?;
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let port_var = match get("WHALE_RDZV_PORT") {
            Some(_) => "WHALE_RDZV_PORT",
            None if agent_store && world_size > 1 => {
                return Err(Error::Train(
                    "launch: `TORCHELASTIC_USE_AGENT_STORE`=True: torchrun's store listens on MASTER_PORT, so set \
                     `WHALE_RDZV_PORT` to a free port on the master for Whale's rendezvous"
                        .into(),
                ))
            }
            None => "MASTER_PORT",
        };
        let port = alone(port_var, "29500")?;
        let master_port = port
            .trim()
            .parse()
            .ok()
            .filter(|&p: &u16| p != 0)
            .ok_or_else(|| Error::Train(format!("launch: `{port_var}`={port:?} is not a port (1 to 65535)")))?;
        Ok(Some(LaunchEnv { rank, world_size, local_rank, master_addr, master_port }))
    }
}

impl LaunchEnv {
    /// `MASTER_ADDR:port`, an IPv6 literal in brackets.
    pub fn master(&self) -> String {
        match self.master_addr.parse::<Ipv6Addr>() {
            Ok(ip) => SocketAddr::new(ip.into(), self.master_port).to_string(),
            Err(_) => format!("{}:{}", self.master_addr, self.master_port),
        }
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Train(format!("rendezvous: {what}: {e}"))
}

/// What a rendezvous hands every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Met {
    /// Rank 0's blob.
    pub blob: Vec<u8>,
    /// Every rank's contribution, by rank.
    pub contributions: Vec<Vec<u8>>,
    /// Where each rank is as this rank can reach it, when known: rank 0 at the address this rank
    /// reached the master on, the others where the master saw them connect from. A rank that
    /// advertises a loopback address (its host name maps to 127.0.1.1, as Debian's /etc/hosts
    /// has it) is reachable there from other machines.
    pub seen: Vec<Option<IpAddr>>,
}

/// Meets the other ranks at the master. Returns rank 0's `blob` (rank 0 must pass `Some`, the
/// others `None`), every rank's `mine`, by rank, and where each was seen. Fails after `timeout`
/// if a rank does not arrive. A world of one meets no one (and binds no port).
pub fn rendezvous(env: &LaunchEnv, blob: Option<&[u8]>, mine: &[u8], timeout: Duration) -> Result<Met> {
    let deadline = Instant::now() + timeout;
    let addr = env.master();
    if env.rank == 0 {
        let blob = blob.ok_or_else(|| Error::Train("rendezvous: rank 0 has no blob to hand out".into()))?;
        if env.world_size == 1 {
            return Ok(Met { blob: blob.to_vec(), contributions: vec![mine.to_vec()], seen: vec![None] });
        }
        let (contributions, seen) = serve(env, &addr, blob, mine, deadline)?;
        return Ok(Met { blob: blob.to_vec(), contributions, seen });
    }
    let mut stream = connect(&addr, deadline)?;
    // Connected, this rank waits for the last one to arrive: up to the master's whole timeout
    // (the master may have started later than this rank and still be inside its own).
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(|e| io_err("timeout", e))?;
    let mut hello = Vec::with_capacity(12 + mine.len());
    hello.extend((env.rank as u32).to_le_bytes());
    hello.extend((env.world_size as u32).to_le_bytes());
    hello.extend((mine.len() as u32).to_le_bytes());
    hello.extend_from_slice(mine);
    stream.write_all(&hello).map_err(|e| io_err("sending the rank", e))?;
    let blob = read_bytes(&mut stream).map_err(|e| io_err(&format!("waiting for the master at {addr}"), e))?;
    let mut read_all = |what: &str| {
        (0..env.world_size).map(|_| read_bytes(&mut stream).map_err(|e| io_err(what, e))).collect::<Result<Vec<_>>>()
    };
    let contributions = read_all("reading the ranks' contributions")?;
    let mut seen: Vec<Option<IpAddr>> = read_all("reading where the ranks were seen")?
        .iter()
        .map(|ip| std::str::from_utf8(ip).ok().and_then(|ip| ip.parse().ok()))
        .collect();
    seen[0] = stream.peer_addr().ok().map(|a| a.ip());
    Ok(Met { blob, contributions, seen })
}

/// The longest blob or contribution a rendezvous carries (an NCCL id is 128 bytes, an address
/// a few dozen): a longer length means the other end speaks another protocol.
const MAX_MESSAGE: usize = 1 << 20;

fn read_bytes(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = read_u32(s)? as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes: not a Whale rendezvous (is another service on this port?)"),
        ));
    }
    let mut out = vec![0u8; len];
    s.read_exact(&mut out)?;
    Ok(out)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend((b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A connection to the master, retried until `deadline`: the master may start later than this
/// rank, and its name may not resolve yet (a cluster's DNS entry appears with the master's pod).
fn connect(addr: &str, deadline: Instant) -> Result<TcpStream> {
    loop {
        let why = match addr.to_socket_addrs() {
            Ok(mut addrs) => {
                match addrs.find_map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok()) {
                    Some(s) => return Ok(s),
                    None => "did not answer".to_string(),
                }
            }
            Err(e) => format!("did not resolve ({e})"),
        };
        if Instant::now() >= deadline {
            return Err(Error::Train(format!("rendezvous: the master at {addr} {why} in time")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One little-endian u32 off `s` (the framing of the rendezvous and of TcpComm's greeting).
pub(crate) fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// The next connection to `listener` (made non-blocking here), or `None` once `deadline` passes.
/// The connection comes back blocking, with reads timing out after `read_timeout`.
pub(crate) fn accept_before(
    listener: &TcpListener,
    deadline: Instant,
    read_timeout: Duration,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(read_timeout))?;
                return Ok(Some((s, from)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Rank 0's listener: every interface on the master's port (MASTER_ADDR names the master for
/// the others; a name that resolves to a loopback address on the master itself must not keep
/// other machines out), in the address family MASTER_ADDR resolves to.
fn listen_on_master(addr: &str, port: u16) -> Result<TcpListener> {
    let v6 = addr.to_socket_addrs().ok().and_then(|mut a| a.next()).is_some_and(|a| a.is_ipv6());
    let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    TcpListener::bind(SocketAddr::new(any, port)).map_err(|e| io_err(&format!("listening on port {port}"), e))
}

/// A rank's hello: its rank, the world size it was given and its contribution.
fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize, Vec<u8>)> {
    let rank = read_u32(s)? as usize;
    let world = read_u32(s)? as usize;
    Ok((rank, world, read_bytes(s)?))
}

/// The master's side: every rank's contribution and the address each was seen connecting from.
type Served = (Vec<Vec<u8>>, Vec<Option<IpAddr>>);

fn serve(env: &LaunchEnv, addr: &str, blob: &[u8], mine: &[u8], deadline: Instant) -> Result<Served> {
    let listener = listen_on_master(addr, env.master_port)?;
    let mut peers: Vec<Option<(TcpStream, Vec<u8>, SocketAddr)>> = (0..env.world_size).map(|_| None).collect();
    let mut arrived = 1; // rank 0 itself
    while arrived < env.world_size {
        match accept_before(&listener, deadline, Duration::from_secs(10)) {
            Ok(Some((mut s, from))) => {
                let (rank, world, theirs) = match read_hello(&mut s) {
                    Ok(hello) => hello,
                    Err(e) => {
                        eprintln!("rendezvous: dropped a connection from {from} that sent no hello ({e})");
                        continue;
                    }
                };
                if world != env.world_size {
                    return Err(Error::Train(format!(
                        "rendezvous: rank {rank} ({from}) says WORLD_SIZE {world}, the master {}",
                        env.world_size
                    )));
                }
                if rank == 0 || rank >= env.world_size || peers[rank].is_some() {
                    return Err(Error::Train(format!(
                        "rendezvous: {from} claims rank {rank}, which is taken or out of range"
                    )));
                }
                peers[rank] = Some((s, theirs, from));
                arrived += 1;
            }
            Ok(None) => {
                let missing: Vec<usize> = (1..env.world_size).filter(|&r| peers[r].is_none()).collect();
                return Err(Error::Train(format!("rendezvous: ranks {missing:?} did not arrive in time")));
            }
            Err(e) => return Err(io_err("accepting", e)),
        }
    }
    let all: Vec<Vec<u8>> = std::iter::once(mine.to_vec())
        .chain(peers.iter().skip(1).map(|p| p.as_ref().expect("every rank arrived").1.clone()))
        .collect();
    let seen: Vec<Option<IpAddr>> = peers.iter().map(|p| p.as_ref().map(|p| p.2.ip())).collect();
    let mut answer = Vec::new();
    put_bytes(&mut answer, blob);
    all.iter().for_each(|c| put_bytes(&mut answer, c));
    seen.iter().for_each(|ip| put_bytes(&mut answer, ip.map(|ip| ip.to_string()).unwrap_or_default().as_bytes()));
    for (rank, peer) in peers.iter_mut().enumerate().skip(1) {
        let (s, _, _) = peer.as_mut().expect("every rank arrived");
        s.write_all(&answer).map_err(|e| io_err(&format!("answering rank {rank}"), e))?;
    }
    Ok((all, seen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(rank: usize, world: usize, port: u16) -> LaunchEnv {
        LaunchEnv::localhost(rank, world, port)
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn the_variables_are_read_and_checked() {
        let vars = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            LaunchEnv::from_vars(move |k| m.get(k).cloned())
        };
        assert_eq!(vars(&[]).unwrap(), None);
        let e = vars(&[("RANK", "2"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "1234")]).unwrap();
        assert_eq!(
            e,
            Some(LaunchEnv { rank: 2, world_size: 4, local_rank: 2, master_addr: "node0".into(), master_port: 1234 })
        );
        assert!(vars(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err().to_string().contains("not below"));
        assert!(vars(&[("RANK", "x"), ("WORLD_SIZE", "4")]).unwrap_err().to_string().contains("`RANK`"));
        assert!(vars(&[("RANK", "0")]).unwrap_err().to_string().contains("`WORLD_SIZE`"));
        // A world of one needs no master; a larger one names what it misses.
        let one = vars(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert_eq!((one.master_addr.as_str(), one.master_port), ("127.0.0.1", 29500));
        let err = vars(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err().to_string();
        assert!(err.contains("`MASTER_ADDR`"), "{err}");
        let two = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "node0")];
        assert!(vars(&two).unwrap_err().to_string().contains("`MASTER_PORT`"));
        let port = |p: &str| vars(&[two[0], two[1], two[2], ("MASTER_PORT", p)]);
        assert!(port("0").unwrap_err().to_string().contains("not a port"));
        // Under torchrun's agent store, MASTER_PORT is taken: Whale's rendezvous needs its own.
        let torchrun = [two[0], two[1], two[2], ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")];
        assert!(vars(&torchrun).unwrap_err().to_string().contains("`WHALE_RDZV_PORT`"));
        let own = [torchrun[0], torchrun[1], torchrun[2], torchrun[3], torchrun[4], ("WHALE_RDZV_PORT", "29600")];
        assert_eq!(vars(&own).unwrap().unwrap().master_port, 29600);
        let at = |addr: &str| LaunchEnv { master_addr: addr.into(), ..env(0, 2, 29500) }.master();
        assert_eq!(
            (at("node0"), at("10.0.0.1"), at("::1")),
            ("node0:29500".into(), "10.0.0.1:29500".into(), "[::1]:29500".into())
        );
    }

    #[test]
    fn a_service_that_is_not_a_rendezvous_is_an_error_not_a_huge_allocation() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(&[0xff; 16]);
            std::thread::sleep(Duration::from_millis(200));
        });
        let err = rendezvous(&env(1, 2, port), None, b"me", Duration::from_secs(5)).unwrap_err().to_string();
        assert!(err.contains("not a Whale rendezvous"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn every_rank_gets_the_masters_blob_whoever_starts_first() {
        let port = free_port();
        let blob: Vec<u8> = (0..128).map(|i| (i * 7) as u8).collect();
        let got: Vec<Met> = std::thread::scope(|s| {
            // The workers start before the master and retry until it listens.
            let workers: Vec<_> = (1..4)
                .map(|r| {
                    s.spawn(move || rendezvous(&env(r, 4, port), None, &[r as u8; 3], Duration::from_secs(20)).unwrap())
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let master = rendezvous(&env(0, 4, port), Some(&blob), b"zero", Duration::from_secs(20)).unwrap();
            std::iter::once(master).chain(workers.into_iter().map(|w| w.join().unwrap())).collect()
        });
        let contributions = vec![b"zero".to_vec(), vec![1; 3], vec![2; 3], vec![3; 3]];
        assert!(got.iter().all(|m| m.blob == blob && m.contributions == contributions));
        // Each rank knows where the master saw the others (and where it reached the master).
        let local = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(got[0].seen, [None, local, local, local]);
        assert!(got[1..].iter().all(|m| m.seen == [local; 4]));
        // A world of one meets no one.
        let alone = rendezvous(&env(0, 1, port), Some(b"id"), b"me", Duration::from_millis(1)).unwrap();
        assert_eq!(alone.contributions, [b"me".to_vec()]);
    }

    #[test]
    fn a_connection_that_is_not_a_rank_is_dropped() {
        let port = free_port();
        let met = std::thread::scope(|s| {
            let master = s.spawn(move || rendezvous(&env(0, 2, port), Some(b"id"), b"zero", Duration::from_secs(20)));
            // A health check: connects, says nothing a rank would, leaves.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut probe = connect(&format!("127.0.0.1:{port}"), deadline).unwrap();
            probe.write_all(&[1, 0]).unwrap();
            drop(probe);
            let worker = rendezvous(&env(1, 2, port), None, b"one", Duration::from_secs(20)).unwrap();
            (master.join().unwrap().unwrap(), worker)
        });
        assert_eq!(met.0.contributions, [b"zero".to_vec(), b"one".to_vec()]);
        assert_eq!(met.1.blob, b"id");
    }

    #[test]
    fn a_missing_rank_or_a_wrong_world_size_is_an_error() {
        let port = free_port();
        let err = rendezvous(&env(0, 3, port), Some(b"id"), &[], Duration::from_millis(300)).unwrap_err().to_string();
        assert!(err.contains("[1, 2]"), "{err}");
        let port = free_port();
        let err = std::thread::scope(|s| {
            s.spawn(move || rendezvous(&env(1, 5, port), None, &[], Duration::from_secs(5)));
            rendezvous(&env(0, 2, port), Some(b"id"), &[], Duration::from_secs(5)).unwrap_err().to_string()
        });
        assert!(err.contains("WORLD_SIZE 5"), "{err}");
    }
}
