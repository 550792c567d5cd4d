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
use whale_model::tensor::{BackwardOp, Device, Tensor};

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
        let (x_recv, recv_counts) = all_to_all_rows(comms, &x_send, &counts).map_err(model_err)?;
        let (w_recv, _) = all_to_all_rows(comms, &w_send, &counts).map_err(model_err)?;
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
        let partial = run_experts(local, &x_recv, &assignments, &w_local, moe.recompute_experts)?;

        // Combine: the partial sums go back to their tokens' ranks and add up per token.
        let (back, _) = all_to_all_rows(comms, &partial, &recv_counts).map_err(model_err)?;
        Ok(tokens.zeros_like()?.index_add(0, &send_rows, &back)?)
    }
}

/// Sends `counts[d]` consecutive rows of `x` (`[n, c]`) to rank `d` and returns the rows
/// received, grouped by source rank in rank order, with their counts. Differentiable in `x`: the
/// backward sends the gradient rows back the way they came, on `comms.backward`.
pub fn all_to_all_rows(comms: &EpComms, x: &Tensor, counts: &[usize]) -> Result<(Tensor, Vec<usize>)> {
    let comm = &comms.forward;
    let [n, c] = x.dims()[..] else {
        return Err(Error::Train(format!("all_to_all_rows: rows must be 2-D, got {:?}", x.dims())));
    };
    if counts.len() != comm.world_size() || counts.iter().sum::<usize>() != n {
        return Err(Error::Train(format!("all_to_all_rows: counts {counts:?} do not split {n} rows over the ranks")));
    }
    let values = x.to_vec_f32()?;
    let recv = comm.all_to_all(split_rows(&values, counts, c))?;
    let recv_counts: Vec<usize> = recv.iter().map(|v| v.len() / c.max(1)).collect();
    let total: usize = recv_counts.iter().sum();
    let back = AllToAllBackward { comm: comms.backward.clone(), counts: recv_counts.clone(), cols: c };
    let y = Tensor::from_custom_op(recv.concat(), &[total, c], x.dtype(), &[x], back)?;
    Ok((y, recv_counts))
}

fn split_rows(values: &[f32], counts: &[usize], cols: usize) -> Vec<Vec<f32>> {
    let mut start = 0;
    counts
        .iter()
        .map(|&n| {
            let part = values[start * cols..(start + n) * cols].to_vec();
            start += n;
            part
        })
        .collect()
}

/// The reverse all-to-all: the gradient rows received from rank `d` (`counts[d]` of them) go back to it.
struct AllToAllBackward {
    comm: Arc<dyn Comm>,
    counts: Vec<usize>,
    cols: usize,
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
        let g = grad.to_vec_f32()?;
        let sent = self
            .comm
            .all_to_all(split_rows(&g, &self.counts, self.cols))
            .map_err(|e| whale_model::tensor::Error::Backward(format!("all_to_all_rows: {e}")))?;
        let x = &inputs[0];
        let grad = Tensor::from_vec(sent.concat(), x.dims(), &Device::Cpu)?.to_dtype(x.dtype())?;
        Ok(vec![needs[0].then_some(grad)])
    }
}
