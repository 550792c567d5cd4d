//! [`NcclComm`] (feature `cuda`): one process per GPU, launched torchrun-style (see
//! `crate::launch`), so it runs across nodes. Rank 0 creates NCCL's unique id and the host mesh
//! ([`TcpComm`]) hands it to every rank; each process opens GPU `LOCAL_RANK`.
//!
//! - All-reduce, broadcast, all-gather and reduce-scatter run in NCCL.
//! - All-to-all is a group of NCCL sends and receives after the sizes are exchanged on the host
//!   (its sizes vary per destination).
//! - Tagged point-to-point messages (pipeline activations) stay on the host mesh: NCCL's sends
//!   wait for their receivers, which would break the contract that a send returns at once (two
//!   pipeline neighbours that both send first would deadlock).
//! - `split` splits the host mesh and opens an NCCL communicator for each group.
//!
//! Buffers are host slices: each call copies in and out of the GPU. Device-resident tensors
//! arrive with whale-tensor's CUDA backend, and with them collectives without the copies.
//!
//! Its test (tests/nccl.rs) passed on one H200 with one rank (scripts/reports/); more than one
//! GPU has not been available, so results across GPUs are pending such a run.
//!
//! Unlike [`LocalComm`](super::LocalComm) and [`TcpComm`], the collectives that run in NCCL are
//! not matched by the host first: ranks that call different collectives, or one with other
//! lengths, hang or fail in NCCL rather than erroring on every rank (the [`Comm`] contract's
//! exception; the host-side calls, `barrier`, `send`/`recv`, the all-to-all's sizes, still check).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{self, group_end, group_start, Id};

use super::{Comm, CommStats, ReduceOp, TcpComm};
use crate::launch::LaunchEnv;
use crate::{Error, Result};

/// An NCCL communicator handle that can move between threads.
struct Handle(nccl::Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every use goes through the `Mutex` in `NcclComm`, which serialises them.
unsafe impl Send for Handle {}

/// One rank's NCCL communicator with its host mesh.
pub struct NcclComm {
    host: TcpComm,
    nccl: Mutex<Handle>,
    stream: Arc<CudaStream>,
    stats: Mutex<CommStats>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank(), self.world_size())
    }
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Train(format!("nccl: {what}: {e:?}"))
}

/// NCCL's reduction for `op`. Unlike [`ReduceOp`]'s contract for Max/Min (NaN wins), NCCL's
/// max/min drop NaN; only Sum is used by the trainers.
fn nccl_op(op: ReduceOp) -> nccl::ReduceOp {
    match op {
        ReduceOp::Sum => nccl::ReduceOp::Sum,
        ReduceOp::Max => nccl::ReduceOp::Max,
        ReduceOp::Min => nccl::ReduceOp::Min,
    }
}

impl NcclComm {
    /// Joins the world `env` describes on GPU `env.local_rank`. An error, not a panic, when this
    /// machine has no CUDA driver.
    pub fn connect(env: &LaunchEnv, timeout: Duration, patience: Duration) -> Result<NcclComm> {
        // SAFETY: only probes whether the driver library can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Train("nccl: no CUDA driver library on this machine".into()));
        }
        let host = TcpComm::connect(env, timeout, patience)?;
        let ctx =
            CudaContext::new(env.local_rank).map_err(|e| cuda_err(&format!("opening GPU {}", env.local_rank), e))?;
        Self::over(host, ctx.default_stream())
    }

    /// An NCCL communicator for the ranks of `host`, on `stream`'s GPU.
    fn over(host: TcpComm, stream: Arc<CudaStream>) -> Result<NcclComm> {
        let mut id = vec![0.0f32; 32]; // 128 bytes
        if host.rank() == 0 {
            let made = Id::new().map_err(|e| cuda_err("creating the unique id", e))?;
            let bytes: Vec<u8> = made.internal().iter().map(|&c| c as u8).collect();
            id = bytes.chunks_exact(4).map(|b| f32::from_bits(u32::from_le_bytes(b.try_into().expect("4")))).collect();
        }
        host.broadcast(&mut id, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, w) in id.iter().enumerate() {
            for (j, b) in w.to_bits().to_le_bytes().into_iter().enumerate() {
                internal[4 * i + j] = b as std::ffi::c_char;
            }
        }
        let comm = nccl::Comm::from_rank(stream.clone(), host.rank(), host.world_size(), Id::uninit(internal))
            .map_err(|e| cuda_err("joining the communicator", e))?;
        Ok(NcclComm { host, nccl: Mutex::new(Handle(comm)), stream, stats: Mutex::new(CommStats::default()) })
    }

    fn count(&self, floats: usize) {
        let mut s = self.stats.lock().expect("stats lock");
        s.calls += 1;
        s.messages += 1;
        s.bytes += 4 * floats as u64;
    }

    /// `f` on a GPU copy of `buf`, copied back into `buf`.
    fn in_place(
        &self,
        buf: &mut [f32],
        f: impl FnOnce(&nccl::Comm, &mut cudarc::driver::CudaSlice<f32>) -> std::result::Result<(), nccl::result::NcclError>,
    ) -> Result<()> {
        // Every rank's buffer is empty (collectives agree on lengths): nothing to move, and CUDA
        // refuses a zero-byte allocation.
        if buf.is_empty() {
            self.count(0);
            return Ok(());
        }
        let mut d = self.stream.clone_htod(buf).map_err(|e| cuda_err("copy to GPU", e))?;
        f(&self.nccl.lock().expect("nccl lock").0, &mut d).map_err(|e| cuda_err("collective", e))?;
        self.stream.memcpy_dtoh(&d, buf).map_err(|e| cuda_err("copy from GPU", e))?;
        self.stream.synchronize().map_err(|e| cuda_err("synchronize", e))?;
        self.count(buf.len());
        Ok(())
    }

    /// `f` from a GPU copy of `input` into `out_len` floats.
    fn to_new_buffer(
        &self,
        input: &[f32],
        out_len: usize,
        f: impl FnOnce(
            &nccl::Comm,
            &cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<(), nccl::result::NcclError>,
    ) -> Result<Vec<f32>> {
        if input.is_empty() || out_len == 0 {
            self.count(input.len());
            return Ok(vec![0.0; out_len]);
        }
        let src = self.stream.clone_htod(input).map_err(|e| cuda_err("copy to GPU", e))?;
        let mut dst = self.stream.alloc_zeros::<f32>(out_len).map_err(|e| cuda_err("allocating", e))?;
        f(&self.nccl.lock().expect("nccl lock").0, &src, &mut dst).map_err(|e| cuda_err("collective", e))?;
        let out = self.stream.clone_dtoh(&dst).map_err(|e| cuda_err("copy from GPU", e))?;
        self.count(input.len());
        Ok(out)
    }
}

impl Comm for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn all_reduce(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.in_place(buf, |c, d| c.all_reduce_in_place(d, &nccl_op(op)).map(|_| ()))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        self.in_place(buf, |c, d| c.broadcast_in_place(d, root as i32).map(|_| ()))
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        self.to_new_buffer(local, local.len() * self.world_size(), |c, s, d| c.all_gather(s, d).map(|_| ()))
    }

    fn reduce_scatter(&self, input: &[f32], op: ReduceOp) -> Result<Vec<f32>> {
        let w = self.world_size();
        if input.len() % w != 0 {
            return Err(Error::Train(format!("nccl: reduce_scatter of {} floats over {w} ranks", input.len())));
        }
        self.to_new_buffer(input, input.len() / w, |c, s, d| c.reduce_scatter(s, d, &nccl_op(op)).map(|_| ()))
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let (w, me) = (self.world_size(), self.rank());
        if send.len() != w {
            return Err(Error::Train(format!("nccl: all_to_all needs {w} buffers, got {}", send.len())));
        }
        if let Some(b) = send.iter().find(|b| b.len() > u32::MAX as usize) {
            return Err(Error::Train(format!("nccl: all_to_all of a {}-float buffer (at most 2^32 - 1)", b.len())));
        }
        // Everyone learns what it will receive, then one NCCL group moves the data.
        let sizes: Vec<f32> = send.iter().map(|b| f32::from_bits(b.len() as u32)).collect();
        let all = self.host.all_gather(&sizes)?;
        let incoming: Vec<usize> = (0..w).map(|j| all[j * w + me].to_bits() as usize).collect();
        let mut src = Vec::with_capacity(w);
        let mut dst = Vec::with_capacity(w);
        // No device buffer for an empty message (CUDA refuses zero-byte allocations).
        for j in 0..w {
            let buffer = (!send[j].is_empty()).then(|| self.stream.clone_htod(&send[j])).transpose();
            src.push(buffer.map_err(|e| cuda_err("copy to GPU", e))?);
            dst.push(self.stream.alloc_zeros::<f32>(incoming[j].max(1)).map_err(|e| cuda_err("allocating", e))?);
        }
        {
            let guard = self.nccl.lock().expect("nccl lock");
            group_start().map_err(|e| cuda_err("group start", e))?;
            for j in 0..w {
                if let Some(src) = &src[j] {
                    guard.0.send(src, j as i32).map_err(|e| cuda_err("send", e))?;
                }
                if incoming[j] > 0 {
                    guard.0.recv(&mut dst[j], j as i32).map_err(|e| cuda_err("recv", e))?;
                }
            }
            group_end().map_err(|e| cuda_err("group end", e))?;
        }
        let mut out = Vec::with_capacity(w);
        for (j, d) in dst.iter().enumerate() {
            let mut v = self.stream.clone_dtoh(d).map_err(|e| cuda_err("copy from GPU", e))?;
            v.truncate(incoming[j]);
            out.push(v);
        }
        self.count(send.iter().map(Vec::len).sum());
        Ok(out)
    }

    fn send(&self, to: usize, tag: u64, data: &[f32]) -> Result<()> {
        self.host.send(to, tag, data)
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.host.recv(from, tag)
    }

    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }

    fn stats(&self) -> CommStats {
        let (mine, host) = (*self.stats.lock().expect("stats lock"), self.host.stats());
        CommStats {
            calls: mine.calls + host.calls,
            messages: mine.messages + host.messages,
            bytes: mine.bytes + host.bytes,
            modelled: Duration::ZERO,
        }
    }

    /// A communicator for a colour's ranks on this one's stream. NCCL needs the collectives of
    /// communicators used at the same time to be issued in one order on every rank, so splits
    /// are not driven from two threads at once ([`Comm::concurrent_splits`]: the pipeline then
    /// runs DualPipe's paired halves one after the other). Not yet run on more than one GPU.
    fn split(&self, color: usize, key: usize) -> Result<Box<dyn Comm>> {
        let host = self.host.split_tcp(color, key)?;
        Ok(Box::new(NcclComm::over(host, self.stream.clone())?))
    }

    fn concurrent_splits(&self) -> bool {
        false
    }
}
