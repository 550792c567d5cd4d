//! ZeRO stage 1 for [`super::DataParallelTrainer`]: each rank owns shard r of every gradient
//! bucket, keeps AdamW state for that shard alone and updates it with whale-tensor's AdamW (the
//! same arithmetic element by element as one rank's), and the updated shards are all-gathered into
//! every rank's weights. The state can be gathered back into one AdamW's (checkpoints) and split
//! again for other buckets.

use std::collections::BTreeMap;

use whale_model::tensor::optim::{read_step, step_tensor, AdamW, AdamWConfig};
use whale_model::tensor::{Device, ParamStore, Tensor};

use super::{Bucket, Slot};
use crate::comm::Comm;
use crate::Result;

/// ZeRO stage 1: this rank's shard of every bucket and the AdamW state for it alone.
pub(super) struct Zero1 {
    /// The pieces of parameters in this rank's shards.
    segments: Vec<Segment>,
    /// The segments as variables, so whale-tensor's AdamW updates them; its state is this rank's.
    store: ParamStore,
    pub(super) opt: AdamW,
    /// Where each bucket's shard starts in the concatenated shard, and its total length last.
    starts: Vec<usize>,
    /// This rank's shard of the gradients, summed over ranks, scaled and clipped.
    grads: Vec<f32>,
    world: usize,
}

/// A piece of one parameter inside this rank's shard.
struct Segment {
    slot: usize,
    /// Start in the parameter's flat values.
    param_start: usize,
    /// Start in the concatenated shard.
    shard_start: usize,
    len: usize,
    /// `[1, len]` for a piece of a matrix and `[len]` for a piece of a vector, so that AdamW's
    /// weight-decay rule (matrices only) treats it as it treats the whole parameter.
    var: Tensor,
    name: String,
}

impl Zero1 {
    /// Shards for `buckets`, with AdamW state cut from `state` (per-parameter `{name}.exp_avg` and
    /// `{name}.exp_avg_sq`, as `AdamW::state_tensors` names them) after `steps` steps.
    pub(super) fn new(
        slots: &[Slot],
        buckets: &[Bucket],
        comm: &dyn Comm,
        config: AdamWConfig,
        steps: u64,
        state: &BTreeMap<String, Tensor>,
    ) -> Result<Zero1> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let (mut store, mut segments, mut starts, mut base) = (ParamStore::new(), Vec::new(), Vec::new(), 0);
        let mut seg_state = BTreeMap::new();
        for b in buckets {
            let shard = b.padded / world;
            let (lo, hi) = (rank * shard, (rank + 1) * shard);
            starts.push(base);
            for &(i, off) in &b.members {
                let (a, z) = (off.max(lo), (off + slots[i].len).min(hi));
                if a >= z {
                    continue;
                }
                let (param_start, len) = (a - off, z - a);
                let name = format!("{}[{}..{}]", slots[i].name, param_start, param_start + len);
                let shape = if slots[i].tensor.rank() >= 2 { vec![1, len] } else { vec![len] };
                let values = slots[i].tensor.to_vec_f32()?[param_start..param_start + len].to_vec();
                let var = store.insert(name.clone(), &Tensor::from_vec(values, &shape, &Device::Cpu)?)?;
                for suffix in ["exp_avg", "exp_avg_sq"] {
                    if let Some(t) = state.get(&format!("{}.{suffix}", slots[i].name)) {
                        let piece = t.to_vec_f32()?[param_start..param_start + len].to_vec();
                        seg_state.insert(format!("{name}.{suffix}"), Tensor::from_vec(piece, &[len], &Device::Cpu)?);
                    }
                }
                // Every piece of a parameter has the parameter's update count.
                if let Some(t) = state.get(&format!("{}.step", slots[i].name)) {
                    seg_state.insert(format!("{name}.step"), t.clone());
                }
                segments.push(Segment { slot: i, param_start, shard_start: base + a - lo, len, var, name });
            }
            base += shard;
        }
        starts.push(base);
        let mut opt = AdamW::new(config)?;
        opt.load_state(steps, &seg_state, &store)?;
        Ok(Zero1 { segments, store, opt, starts, grads: vec![0.0; base], world })
    }

    /// Takes this rank's reduced gradient shards, scales them, and clips by the global norm
    /// (`clip_grad_norm`'s rule); returns the norm before clipping.
    pub(super) fn set_grads(
        &mut self,
        comm: &dyn Comm,
        shards: Vec<Vec<f32>>,
        scale: f32,
        max_norm: f64,
    ) -> Result<f64> {
        self.grads = shards.concat();
        self.grads.iter_mut().for_each(|g| *g *= scale);
        let mut sq = [self.grads.iter().map(|&g| g as f64 * g as f64).sum::<f64>()];
        comm.all_reduce_f64(&mut sq)?;
        let norm = sq[0].sqrt();
        let coef = max_norm / (norm + 1e-6);
        if norm.is_finite() && coef < 1.0 {
            self.grads.iter_mut().for_each(|g| *g *= coef as f32);
        }
        Ok(norm)
    }

    /// AdamW on this rank's shard (parameters no rank had a gradient for are skipped), then every
    /// rank's updated shard into every rank's parameters.
    pub(super) fn update(
        &mut self,
        comm: &dyn Comm,
        slots: &[Slot],
        buckets: &[Bucket],
        present: &[bool],
        lr: f32,
    ) -> Result<()> {
        for seg in &self.segments {
            let (from, to) = (seg.param_start, seg.param_start + seg.len);
            slots[seg.slot].tensor.with_f32_mut(|w| seg.var.with_f32_mut(|v| v.copy_from_slice(&w[from..to])))??;
            let g = &self.grads[seg.shard_start..seg.shard_start + seg.len];
            let grad =
                present[seg.slot].then(|| Tensor::from_vec(g.to_vec(), seg.var.dims(), &Device::Cpu)).transpose()?;
            seg.var.set_grad(grad)?;
        }
        self.opt.step(&self.store, lr)?;
        let mut shard = vec![0.0; self.grads.len()];
        for seg in &self.segments {
            shard[seg.shard_start..seg.shard_start + seg.len].copy_from_slice(&seg.var.to_vec_f32()?);
            seg.var.zero_grad();
        }
        let all = comm.all_gather(&shard)?;
        for (k, b) in buckets.iter().enumerate() {
            b.write_values(slots, &self.unshard(&all, 0, k))?;
        }
        Ok(())
    }

    /// Bucket `k` whole, from the concatenation over ranks of per-rank vectors of
    /// `stride` floats whose part `part` (of the shard's length each) holds the shards.
    fn unshard_strided(&self, all: &[f32], stride: usize, part: usize, k: usize) -> Vec<f32> {
        let total = self.grads.len();
        let (start, len) = (self.starts[k], self.starts[k + 1] - self.starts[k]);
        (0..self.world).flat_map(|r| &all[r * stride + part * total + start..][..len]).copied().collect()
    }

    fn unshard(&self, all: &[f32], part: usize, k: usize) -> Vec<f32> {
        self.unshard_strided(all, self.grads.len(), part, k)
    }

    /// The whole AdamW state by parameter name, gathered from every rank's shard (a collective
    /// call); parameters without state on any rank are left out, as AdamW leaves them out.
    pub(super) fn full_state(
        &self,
        comm: &dyn Comm,
        slots: &[Slot],
        buckets: &[Bucket],
    ) -> Result<BTreeMap<String, Tensor>> {
        let state: BTreeMap<String, Tensor> = self.opt.state_tensors()?.into_iter().collect();
        let total = self.grads.len();
        let stride = 2 * total + slots.len();
        let mut local = vec![0.0; stride];
        for seg in &self.segments {
            let m = state.get(&format!("{}.exp_avg", seg.name));
            let v = state.get(&format!("{}.exp_avg_sq", seg.name));
            if let (Some(m), Some(v)) = (m, v) {
                local[seg.shard_start..][..seg.len].copy_from_slice(&m.to_vec_f32()?);
                local[total + seg.shard_start..][..seg.len].copy_from_slice(&v.to_vec_f32()?);
                local[2 * total + seg.slot] = 1.0;
            }
        }
        let all = comm.all_gather(&local)?;
        // Each parameter's update count: the same on every rank holding a piece of it, so the
        // sum over holders divided by their number.
        let mut steps = vec![0u64; 2 * slots.len()];
        for seg in &self.segments {
            if let Some(t) = state.get(&format!("{}.step", seg.name)) {
                steps[seg.slot] += read_step(t, self.opt.steps()).unwrap_or(0);
                steps[slots.len() + seg.slot] += 1;
            }
        }
        comm.all_reduce_u64(&mut steps)?;
        let mut out = BTreeMap::new();
        for (k, b) in buckets.iter().enumerate() {
            let (m, v) = (self.unshard_strided(&all, stride, 0, k), self.unshard_strided(&all, stride, 1, k));
            for &(i, off) in &b.members {
                if (0..self.world).any(|r| all[r * stride + 2 * total + i] > 0.0) {
                    let (name, len) = (&slots[i].name, slots[i].len);
                    out.insert(
                        format!("{name}.exp_avg"),
                        Tensor::from_vec(m[off..off + len].to_vec(), &[len], &Device::Cpu)?,
                    );
                    out.insert(
                        format!("{name}.exp_avg_sq"),
                        Tensor::from_vec(v[off..off + len].to_vec(), &[len], &Device::Cpu)?,
                    );
                    out.insert(format!("{name}.step"), step_tensor(steps[i] / steps[slots.len() + i].max(1))?);
                }
            }
        }
        Ok(out)
    }

    /// The name of a parameter with a non-finite gradient in this rank's shard.
    pub(super) fn non_finite_param(&self, slots: &[Slot]) -> Option<String> {
        let seg = self.segments.iter().find(|s| self.grads[s.shard_start..][..s.len].iter().any(|g| !g.is_finite()))?;
        Some(slots[seg.slot].name.clone())
    }
}
