//! Expert parallelism (spec 2.2 and 8.3): the routed experts of every MoE layer are sharded over
//! the ranks of a communicator (rank `r` owns experts `[r E/W, (r + 1) E/W)`), each rank routes its
//! own tokens, and DeepEP's two all-to-alls move them:
//!
//! - **dispatch** sends each token once per destination rank (not once per expert), with the
//!   local ids of its experts on that rank (-1 where the expert lives elsewhere) and their gating
//!   weights;
//! - the receiving rank runs its experts on what arrived and sums each row's weighted outputs;
//! - **combine** sends those partial sums back, unweighted, and the source adds them per token.
//!
//! With the layer's `fp8_dispatch` (DeepSeek-V3's low-precision communication) the dispatch
//! carries the tokens, and the combine's backward their gradients, as E4M3 codes with
//! power-of-two scales ([`Wire::Fp8`]); the layer has already rounded them to that grid, so the
//! numbers are one rank's, in about a quarter of the bytes. Otherwise rows cross exactly, bf16
//! two to a word (as DeepEP's BF16 dispatch and combine), other dtypes as f32.
//!
//! Both all-to-alls are differentiable (the backward of one is the other's reverse), so the
//! gradients of the tokens, the gating weights and the local experts come out as on one rank.
//! Forward all-to-alls run on one communicator of the group and backward ones on a second
//! ([`EpComms`]): collectives are matched by call order, and this way a forward and a backward
//! of different micro-batches may run at once (DualPipe's overlapped pairs), each keeping its
//! own order.
//!
//! Node-limited routing is the router's group-limited top-k with one group per node: with
//! `n_group` equal to the number of nodes (ranks / `ranks_per_node`, experts laid out node by
//! node), a token reaches at most `topk_group` nodes. [`ExpertParallel::new`] checks that layout.

use std::sync::{Arc, Mutex};

use whale_model::moe::{run_experts, DeepSeekMoE, ExpertDispatch, Routing};
use whale_model::tensor::fp8::{fp8_comm_quantize, Fp8Blocks, Fp8Format, BLOCK, GRADIENT_MIN_AMAX};
use whale_model::tensor::{BackwardOp, DType, Device, Tensor};

use crate::comm::Comm;
use crate::{Error, Result};

/// What the last dispatch moved (for tests and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Rows sent to each rank (one per token and destination rank).
    pub rows_sent: Vec<usize>,
    /// The most nodes any one token was sent to.
    pub max_nodes_per_token: usize,
}

/// An expert-parallel group's two communicators: the forward's all-to-alls on one, the
/// backward's on the other.
#[derive(Clone)]
pub struct EpComms {
    pub forward: Arc<dyn Comm>,
    pub backward: Arc<dyn Comm>,
}

impl std::fmt::Debug for EpComms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpComms(rank {} of {})", self.forward.rank(), self.forward.world_size())
    }
}

impl EpComms {
    /// `comm` for the forward and a duplicate of it (same ranks) for the backward; a collective call.
    pub fn new(comm: Arc<dyn Comm>) -> Result<Self> {
        let backward: Arc<dyn Comm> = Arc::from(comm.split(0, comm.rank())?);
        Ok(EpComms { forward: comm, backward })
    }
}

/// The [`ExpertDispatch`] of one rank.
pub struct ExpertParallel {
    comms: EpComms,
    ranks_per_node: usize,
    last: Mutex<DispatchStats>,
}

impl std::fmt::Debug for ExpertParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (r, w) = (self.comms.forward.rank(), self.comms.forward.world_size());
        write!(f, "ExpertParallel(rank {r} of {w}, {} ranks per node)", self.ranks_per_node)
    }
}

impl ExpertParallel {
    /// Expert parallelism over `comm` for `moe`'s layout: its experts must split evenly over the
    /// ranks and, when there is more than one node, its router's groups must be the nodes.
    pub fn new(comms: &EpComms, ranks_per_node: usize, moe: &DeepSeekMoE) -> Result<Self> {
        let world = comms.forward.world_size();
        let e = moe.experts.len();
        if ranks_per_node == 0 || world % ranks_per_node != 0 {
            return Err(Error::Train(format!("ranks_per_node {ranks_per_node} does not divide {world} ranks")));
        }
        if e % world != 0 {
            return Err(Error::Train(format!("{e} routed experts do not split evenly over {world} ranks")));
        }
        let nodes = world / ranks_per_node;
        if nodes > 1 && moe.gate.n_group != nodes {
            return Err(Error::Train(format!(
                "node-limited routing needs one router group per node: n_group is {} but there are {nodes} nodes",
                moe.gate.n_group
            )));
        }
        Ok(ExpertParallel { comms: comms.clone(), ranks_per_node, last: Mutex::new(DispatchStats::default()) })
    }

    /// What the last dispatch sent.
    pub fn last_dispatch(&self) -> DispatchStats {
        self.last.lock().expect("stats lock").clone()
    }

    /// Installs expert parallelism on `moe` (its non-local experts stay in memory but are never run).
    pub fn install(comms: &EpComms, ranks_per_node: usize, moe: &mut DeepSeekMoE) -> Result<Arc<Self>> {
        let ep = Arc::new(Self::new(comms, ranks_per_node, moe)?);
        moe.dispatch = Some(ep.clone());
        Ok(ep)
    }

    /// The global ids of the experts this rank runs.
    pub fn local_experts(&self, n_experts: usize) -> std::ops::Range<usize> {
        let per = n_experts / self.comms.forward.world_size();
        let r = self.comms.forward.rank();
        r * per..(r + 1) * per
    }
}

fn model_err(e: impl std::fmt::Display) -> whale_model::Error {
    whale_model::Error::Model(format!("expert parallelism: {e}"))
}

impl ExpertDispatch for ExpertParallel {
    fn dispatch_and_combine(
        &self,
        moe: &DeepSeekMoE,
        tokens: &Tensor,
        routing: &Routing,
    ) -> whale_model::Result<Tensor> {
        let (world, t) = (self.comms.forward.world_size(), tokens.dims()[0]);
        let k = moe.gate.top_k;
        let per = moe.experts.len() / world;
        // Dispatch layout: for each destination, the tokens with an expert there (in token order),
        // and per row its K slots: the local expert id and the index of its weight (or -1 / the
        // zero pad at index T K).
        let mut rows: Vec<Vec<i64>> = vec![Vec::new(); world];
        let mut ids: Vec<Vec<f32>> = vec![Vec::new(); world];
        let mut weight_index: Vec<Vec<i64>> = vec![Vec::new(); world];
        let mut max_nodes = 0;
        // An FP8 dispatch's tokens (and, in the backward, the gradients its combine sends back to
        // the experts) are already rounded to the wire's grid by the MoE layer: they move as codes.
        let wire = if moe.fp8_dispatch { Wire::Fp8 } else { Wire::Plain };
        for tok in 0..t {
            let slots = &routing.experts[tok * k..(tok + 1) * k];
            let mut nodes: Vec<usize> = slots.iter().map(|&e| e / per / self.ranks_per_node).collect();
            nodes.sort_unstable();
            nodes.dedup();
            max_nodes = max_nodes.max(nodes.len());
            for dest in 0..world {
                if !slots.iter().any(|&e| e / per == dest) {
                    continue;
                }
                rows[dest].push(tok as i64);
                for (j, &e) in slots.iter().enumerate() {
                    let here = e / per == dest;
                    ids[dest].push(if here { (e % per) as f32 } else { -1.0 });
                    weight_index[dest].push(if here { (tok * k + j) as i64 } else { (t * k) as i64 });
                }
            }
        }
        let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
        *self.last.lock().expect("stats lock") =
            DispatchStats { rows_sent: counts.clone(), max_nodes_per_token: max_nodes };
        let dev = Device::Cpu;
        let flat = |v: Vec<Vec<i64>>| -> whale_model::Result<Tensor> {
            let v: Vec<i64> = v.concat();
            Ok(Tensor::from_vec(v.clone(), &[v.len()], &dev)?)
        };
        let send_rows = flat(rows)?;
        let x_send = tokens.index_select(0, &send_rows)?;
        let padded_weights =
            Tensor::cat(&[routing.weights.flatten_all()?, Tensor::zeros(&[1], routing.weights.dtype(), &dev)?], 0)?;
        let w_send = padded_weights.index_select(0, &flat(weight_index)?)?.reshape(&[x_send.dims()[0], k])?;

        let comms = &self.comms;
        let (x_recv, recv_counts) = all_to_all_rows(comms, &x_send, &counts, wire, Wire::Plain).map_err(model_err)?;
        let (w_recv, _) = all_to_all_rows(comms, &w_send, &counts, Wire::Plain, Wire::Plain).map_err(model_err)?;
        let ids_recv: Vec<f32> = self.comms.forward.all_to_all(ids).map_err(model_err)?.concat();

        // The local experts on what arrived, each row's weighted sum.
        let mut assignments = Vec::new();
        let mut w_index = Vec::new();
        for (i, &id) in ids_recv.iter().enumerate() {
            if id >= 0.0 {
                assignments.push((i / k, id as usize));
                w_index.push(i as i64);
            }
        }
        let w_index = Tensor::from_vec(w_index.clone(), &[w_index.len()], &dev)?;
        let local = &moe.experts[self.comms.forward.rank() * per..(self.comms.forward.rank() + 1) * per];
        let w_local = w_recv.flatten_all()?.index_select(0, &w_index)?;
        let partial = run_experts(local, &x_recv, &assignments, &w_local, moe.expert_run())?;

        // Combine: the partial sums go back to their tokens' ranks and add up per token.
        let (back, _) = all_to_all_rows(comms, &partial, &recv_counts, Wire::Plain, wire).map_err(model_err)?;
        Ok(tokens.zeros_like()?.index_add(0, &send_rows, &back)?)
    }
}

/// How rows cross an all-to-all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The values exactly: bf16 two to a word, any other dtype as f32.
    Plain,
    /// DeepSeek-V3's low-precision communication: each row as E4M3 codes, four to a word, then
    /// the power-of-two scale of each of its 1x128 tiles. For values already rounded to that grid
    /// ([`Tensor::fp8_comm_round`]), which it carries exactly; a value off the grid is an error,
    /// never silently changed.
    Fp8,
}

/// How a [`Wire`] lays out rows of a dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    F32,
    /// bf16 values are f32s whose low 16 bits are zero: two fit in a word.
    Bf16,
    /// E4M3 codes, four to a word, then each 1x128 tile's power-of-two scale.
    Fp8,
}

impl Wire {
    fn packing(self, dtype: DType) -> Packing {
        match self {
            Wire::Plain if dtype == DType::BF16 => Packing::Bf16,
            Wire::Plain => Packing::F32,
            Wire::Fp8 => Packing::Fp8,
        }
    }

    /// The f32 words one row of `cols` values of `dtype` takes.
    pub fn words_per_row(self, cols: usize, dtype: DType) -> usize {
        match self.packing(dtype) {
            Packing::F32 => cols,
            Packing::Bf16 => cols.div_ceil(2),
            Packing::Fp8 => cols.div_ceil(4) + cols.div_ceil(BLOCK),
        }
    }

    /// `rows` (`n` rows of `cols` values of `dtype`, row-major) on this wire.
    fn encode(self, rows: &[f32], cols: usize, dtype: DType) -> Result<Vec<f32>> {
        let off_grid = |i: usize, grid: &str| {
            Error::Train(format!(
                "{self:?} wire: row {} column {} holds {}, which is not on the {grid}",
                i / cols,
                i % cols,
                rows[i]
            ))
        };
        match self.packing(dtype) {
            _ if rows.is_empty() => Ok(Vec::new()),
            Packing::F32 => Ok(rows.to_vec()),
            Packing::Bf16 => {
                if let Some(i) = rows.iter().position(|v| v.to_bits() & 0xFFFF != 0) {
                    return Err(off_grid(i, "bf16 grid"));
                }
                let halves: Vec<u8> = rows.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
                Ok(pack(&halves, 2 * cols, |_| Vec::new()))
            }
            Packing::Fp8 => {
                // The least amax floor: a rounded value re-encodes exactly whatever floor rounded it.
                let q = fp8_comm_quantize(rows, cols, GRADIENT_MIN_AMAX);
                let same = |(a, b): (&f32, &f32)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
                if let Some(i) = q.dequantize().iter().zip(rows).position(|p| !same(p)) {
                    return Err(off_grid(i, "E4M3 grid of its tile (send values rounded by fp8_comm_round)"));
                }
                let tiles = cols.div_ceil(BLOCK);
                Ok(pack(&q.codes, cols, |r| q.scales[r * tiles..(r + 1) * tiles].to_vec()))
            }
        }
    }

    /// The rows of `words` (received on this wire, values of `dtype`) as f32 values.
    fn decode(self, words: &[f32], cols: usize, dtype: DType) -> Result<Vec<f32>> {
        let packing = self.packing(dtype);
        if words.is_empty() || packing == Packing::F32 {
            return Ok(words.to_vec());
        }
        let per_row = self.words_per_row(cols, dtype);
        if words.len() % per_row != 0 {
            return Err(Error::Train(format!(
                "{self:?} wire: {} words are not whole rows of {cols} values ({per_row} words each)",
                words.len()
            )));
        }
        let n = words.len() / per_row;
        // The row's packed bytes (its first `packed` words), then what follows them.
        let packed = if packing == Packing::Bf16 { cols.div_ceil(2) } else { cols.div_ceil(4) };
        let bytes = |row: &[f32]| -> Vec<u8> { row[..packed].iter().flat_map(|w| w.to_bits().to_le_bytes()).collect() };
        if packing == Packing::Bf16 {
            let mut out = Vec::with_capacity(n * cols);
            for row in words.chunks(per_row) {
                let halves = bytes(row);
                out.extend(halves.chunks(2).take(cols).map(|h| f32::from_bits(u32::from_le_bytes([0, 0, h[0], h[1]]))));
            }
            return Ok(out);
        }
        let (mut codes, mut scales) = (Vec::with_capacity(n * cols), Vec::new());
        for row in words.chunks(per_row) {
            codes.extend(bytes(row).into_iter().take(cols));
            scales.extend_from_slice(&row[packed..]);
        }
        let q = Fp8Blocks::from_parts(codes, scales, (n, cols), (1, BLOCK), Fp8Format::E4M3)
            .map_err(|e| Error::Train(format!("Fp8 wire: {e}")))?;
        Ok(q.dequantize())
    }
}

/// Rows of `row_bytes` bytes, four to a little-endian word (the last word of a row zero-padded),
/// each row followed by `tail(row)`.
fn pack(bytes: &[u8], row_bytes: usize, tail: impl Fn(usize) -> Vec<f32>) -> Vec<f32> {
    let mut out = Vec::new();
    for (r, row) in bytes.chunks(row_bytes).enumerate() {
        out.extend(row.chunks(4).map(|group| {
            let mut word = [0u8; 4];
            word[..group.len()].copy_from_slice(group);
            f32::from_bits(u32::from_le_bytes(word))
        }));
        out.extend(tail(r));
    }
    out
}

/// Sends `counts[d]` consecutive rows of `x` (`[n, c]`) to rank `d` on the `forward` wire and
/// returns the rows received, grouped by source rank in rank order, with their counts.
/// Differentiable in `x`: the backward sends the gradient rows back the way they came, on
/// `comms.backward` and the `backward` wire.
pub fn all_to_all_rows(
    comms: &EpComms,
    x: &Tensor,
    counts: &[usize],
    forward: Wire,
    backward: Wire,
) -> Result<(Tensor, Vec<usize>)> {
    let comm = &comms.forward;
    let [n, c] = x.dims()[..] else {
        return Err(Error::Train(format!("all_to_all_rows: rows must be 2-D, got {:?}", x.dims())));
    };
    if counts.len() != comm.world_size() || counts.iter().sum::<usize>() != n {
        return Err(Error::Train(format!("all_to_all_rows: counts {counts:?} do not split {n} rows over the ranks")));
    }
    let (recv, recv_counts) = exchange(comm.as_ref(), &x.to_vec_f32()?, counts, (c, x.dtype()), forward)?;
    let total: usize = recv_counts.iter().sum();
    let back = AllToAllBackward { comm: comms.backward.clone(), counts: recv_counts.clone(), cols: c, wire: backward };
    let y = Tensor::from_custom_op(recv, &[total, c], x.dtype(), &[x], back)?;
    Ok((y, recv_counts))
}

/// One all-to-all of rows: `counts[d]` consecutive rows of `values` (`cols` wide, of `dtype`) to
/// rank `d` on `wire`; the rows received in rank order, and how many came from each rank.
fn exchange(
    comm: &dyn Comm,
    values: &[f32],
    counts: &[usize],
    (cols, dtype): (usize, DType),
    wire: Wire,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let mut start = 0;
    let mut parts = Vec::with_capacity(counts.len());
    for (dest, &n) in counts.iter().enumerate() {
        let part = wire.encode(&values[start * cols..(start + n) * cols], cols, dtype);
        parts.push(part.map_err(|e| Error::Train(format!("the rows for rank {dest}: {e}")))?);
        start += n;
    }
    let per_row = wire.words_per_row(cols, dtype).max(1);
    let mut recv = Vec::new();
    let mut recv_counts = Vec::with_capacity(counts.len());
    for part in comm.all_to_all(parts)? {
        recv_counts.push(part.len() / per_row);
        recv.extend(wire.decode(&part, cols, dtype)?);
    }
    Ok((recv, recv_counts))
}

/// The reverse all-to-all: the gradient rows received from rank `d` (`counts[d]` of them) go back to it.
struct AllToAllBackward {
    comm: Arc<dyn Comm>,
    counts: Vec<usize>,
    cols: usize,
    wire: Wire,
}

impl BackwardOp for AllToAllBackward {
    fn name(&self) -> &'static str {
        "all_to_all_rows"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> whale_model::tensor::Result<Vec<Option<Tensor>>> {
        // Every rank takes part even when it needs no gradient: the collective is matched by order.
        // The gradient crosses in the dtype it ends in, the rows' own.
        let x = &inputs[0];
        let g = grad.to_dtype(x.dtype())?.to_vec_f32()?;
        let (sent, _) = exchange(self.comm.as_ref(), &g, &self.counts, (self.cols, x.dtype()), self.wire)
            .map_err(|e| whale_model::tensor::Error::Backward(format!("all_to_all_rows: {e}")))?;
        let grad = Tensor::from_vec(sent, x.dims(), &Device::Cpu)?.to_dtype(x.dtype())?;
        Ok(vec![needs[0].then_some(grad)])
    }
}
