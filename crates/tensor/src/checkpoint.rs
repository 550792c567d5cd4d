//! Activation recomputation (`torch.utils.checkpoint`; DeepSeek-V3 recomputes its RMSNorms and
//! MLA up-projections in the backward, TR 3.2.3).
//!
//! [`checkpoint`] runs a function's forward without keeping any of its intermediate tensors: the
//! graph holds only the function's inputs and its output. The backward runs the function again,
//! this time recording, and takes the gradients through that fresh graph. Memory for the
//! activations inside is traded for a second forward of the function.
//!
//! The function sees its tensor inputs as arguments; the weights it uses may simply be captured
//! (a layer's fields). The first run finds them in the graph it records (tensors older than the
//! call that require a gradient), and they become inputs of the checkpoint's node, so their
//! gradients flow, and a split backward (ZeroBubble's B/W, [`crate::backprop`]) defers them like
//! any other weight's: the "B" pass recomputes for the input gradients, the "W" pass again for the
//! weights'.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::backprop::{enable_grad, grad_within, is_grad_enabled, BackwardOp, GradInfo};
use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};

/// The function a checkpoint runs: its inputs in, one tensor out (its errors as text: a backward
/// reports them as [`Error::Backward`]).
type Region = dyn Fn(&[Tensor]) -> std::result::Result<Tensor, String> + Send + Sync;

/// `f(inputs)`, its intermediate tensors recomputed in the backward instead of kept.
///
/// `f` must compute the same values each time it runs on the same inputs (no sampling, no
/// dropout, no collective: the backward runs it again) and should not write into tensors in
/// place. Outside of gradient recording ([`crate::no_grad`]) this is just `f(inputs)`. `name`
/// names the region in errors. `f` may fail with any error that holds this crate's: the forward
/// returns it as it is, a backward as text in an [`Error::Backward`] naming the region.
pub fn checkpoint<F, E>(name: &'static str, inputs: &[&Tensor], f: F) -> std::result::Result<Tensor, E>
where
    F: Fn(&[Tensor]) -> std::result::Result<Tensor, E> + Send + Sync + 'static,
    E: From<Error> + std::fmt::Display,
{
    let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
    if !is_grad_enabled() {
        return f(&owned);
    }
    // The first run records, to find what from outside the region (captured weights, buffers)
    // the output depends on; its graph goes on return, the output's values stay. So the region's
    // activations are all alive once, during this call, as they are again in its backward.
    let leaves: Vec<Tensor> = owned.iter().map(stand_in).collect();
    let from = TensorId::watermark();
    let out = f(&leaves)?;
    let outside = Outside::of(name, &out, &leaves, from)?;
    let node_inputs: Vec<&Tensor> = inputs.iter().copied().chain(&outside.captured).collect();
    let f = move |x: &[Tensor]| f(x).map_err(|e| e.to_string());
    let read = outside.read.into_iter().map(|t| (t.0.storage.version(), t)).collect();
    let op = Recompute { name, f: Arc::new(f), n_inputs: inputs.len(), read };
    Ok(Tensor::with_history_on(
        out.0.storage.clone(),
        out.layout().clone(),
        out.dtype(),
        out.device(),
        &node_inputs,
        op,
    ))
}

/// A fresh leaf holding `t`'s values, recording its gradient when `t` needs one (not a weight:
/// the region's own graph is walked from the output to it, never by a split backward).
fn stand_in(t: &Tensor) -> Tensor {
    if t.requires_grad() {
        t.detach().input_variable()
    } else {
        t.detach()
    }
}

/// What a region's graph reads from outside it: tensors made before the region ran (other than
/// its arguments' stand-ins), found by a depth-first walk from its output.
struct Outside {
    /// Those that require a gradient, in the order the walk meets them.
    captured: Vec<Tensor>,
    /// Those that do not (frozen weights, buffers, tables): read again by the rerun, so checked
    /// for writes in place.
    read: Vec<Tensor>,
}

impl Outside {
    fn of(name: &str, out: &Tensor, leaves: &[Tensor], from: TensorId) -> Result<Outside> {
        let own: HashSet<TensorId> = leaves.iter().map(Tensor::id).collect();
        let mut seen: HashSet<TensorId> = HashSet::new();
        let (mut captured, mut read) = (Vec::new(), Vec::new());
        let mut stack = vec![out.clone()];
        while let Some(t) = stack.pop() {
            if own.contains(&t.id()) || !seen.insert(t.id()) {
                continue;
            }
            if t.id() < from {
                if t.requires_grad() {
                    captured.push(t);
                } else {
                    read.push(t);
                }
                continue;
            }
            match &t.0.grad {
                GradInfo::Node { inputs, .. } => stack.extend(inputs.iter().rev().cloned()),
                GradInfo::None => {}
                GradInfo::Leaf { .. } => {
                    return Err(Error::Backward(format!(
                        "checkpoint `{name}`: the function made a variable of its own ({:?} {:?}), whose \
                         gradient a recomputation would lose; make it outside and capture or pass it",
                        t.dtype(),
                        t.dims()
                    )))
                }
            }
        }
        Ok(Outside { captured, read })
    }
}

/// The backward of a [`checkpoint`]: its inputs are the function's `n_inputs` arguments, then the
/// captured tensors; `read` holds what else the region read from outside, with the version of
/// its values then.
struct Recompute {
    name: &'static str,
    f: Arc<Region>,
    n_inputs: usize,
    read: Vec<(u64, Tensor)>,
}

impl Recompute {
    fn differs(&self, what: String) -> Error {
        Error::Backward(format!(
            "checkpoint `{}`: the recomputation {what}; the function must compute the same each time",
            self.name
        ))
    }
}

impl BackwardOp for Recompute {
    fn name(&self) -> &'static str {
        self.name
    }

    fn input_name(&self, n: usize) -> String {
        match n.checked_sub(self.n_inputs) {
            None => format!("argument {n}"),
            Some(c) => format!("captured tensor {c} (a weight the function reads from outside)"),
        }
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        // (The arguments and captured tensors are checked as every node's inputs are.)
        for (then, t) in &self.read {
            if t.0.storage.version() != *then {
                return Err(Error::Backward(format!(
                    "checkpoint `{}`: a tensor it reads ({:?} {:?}) was written in place after the forward, so \
                     the recomputation would see other values",
                    self.name,
                    t.dtype(),
                    t.dims()
                )));
            }
        }
        RECOMPUTATIONS.fetch_add(1, Ordering::Relaxed);
        let (args, captured) = inputs.split_at(self.n_inputs);
        // Arguments whose gradient is not asked for this time are constants of the rerun.
        let leaves: Vec<Tensor> =
            args.iter().zip(needs).map(|(t, &need)| if need { stand_in(t) } else { t.detach() }).collect();
        let from = TensorId::watermark();
        let out = enable_grad(|| (self.f)(&leaves))
            .map_err(|e| Error::Backward(format!("checkpoint `{}`: recomputing: {e}", self.name)))?;
        if out.dims() != output.dims() || out.dtype() != output.dtype() {
            let (now, then) = ((out.dtype(), out.dims()), (output.dtype(), output.dims()));
            return Err(self.differs(format!("gave {now:?}, the forward {then:?}")));
        }
        // The rerun must depend on the tensors from outside the forward did, and only on them:
        // its gradients stop there, where the outer backward takes them on.
        let reached: HashSet<TensorId> =
            Outside::of(self.name, &out, &leaves, from)?.captured.iter().map(Tensor::id).collect();
        if reached != captured.iter().map(Tensor::id).collect() {
            let what = format!(
                "reached {} tensors from outside that need a gradient, the forward {}",
                reached.len(),
                captured.len()
            );
            return Err(self.differs(what));
        }
        let wanted: Vec<usize> = (0..inputs.len()).filter(|&i| needs[i]).collect();
        let targets: Vec<Tensor> =
            wanted.iter().map(|&i| if i < self.n_inputs { leaves[i].clone() } else { inputs[i].clone() }).collect();
        let grads = grad_within(&out, grad, &targets, captured)?;
        let mut all = vec![None; inputs.len()];
        for (i, g) in wanted.into_iter().zip(grads) {
            all[i] = g;
        }
        Ok(all)
    }
}

/// Regions run again by backward passes in this process so far (each half of a split backward
/// counts): what a test or a profile reads to see that recomputation happened.
pub fn recomputations() -> u64 {
    RECOMPUTATIONS.load(Ordering::Relaxed)
}

static RECOMPUTATIONS: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use std::sync::{Mutex, Weak};

    use super::*;
    use crate::testing::randn;

    /// The intermediate tensors of `x * w -> silu -> sum`, recorded as they are made.
    fn run(x: &Tensor, w: &Tensor, made: &Arc<Mutex<Vec<Weak<crate::tensor::Inner>>>>, recompute: bool) -> Tensor {
        let (w, made) = (w.clone(), made.clone());
        let f = move |x: &[Tensor]| {
            let h = x[0].mul(&w)?;
            made.lock().unwrap().push(Arc::downgrade(&h.0));
            h.silu()
        };
        if recompute {
            checkpoint::<_, Error>("silu", &[x], f).unwrap()
        } else {
            f(std::slice::from_ref(x)).unwrap()
        }
    }

    #[test]
    fn the_graph_keeps_no_intermediate_of_the_region() {
        let (x, w) = (randn(&[3, 5], 1).input_variable(), randn(&[3, 5], 2).variable());
        for recompute in [false, true] {
            let made = Arc::new(Mutex::new(Vec::new()));
            let out = run(&x, &w, &made, recompute);
            let alive = made.lock().unwrap().iter().filter(|h| h.upgrade().is_some()).count();
            assert_eq!(alive, usize::from(!recompute), "recompute {recompute}: intermediates alive");
            out.sum_all().unwrap().backward().unwrap();
            // The backward made the intermediate once more, and let it go.
            assert_eq!(made.lock().unwrap().len(), 1 + usize::from(recompute));
            assert!(made.lock().unwrap().iter().skip(1).all(|h| h.upgrade().is_none()));
        }
    }
}
