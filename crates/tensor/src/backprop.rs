//! Reverse-mode autograd.
//!
//! Each tensor computed from a variable records its op (a [`BackwardOp`]) and its inputs. A backward
//! pass sorts that graph topologically from the seed(s) and hands each op the gradient of its
//! output; the op returns gradients for the inputs it is asked for. Variables accumulate what
//! reaches them.
//!
//! **Split backward (ZeroBubble's B/W).** Variables are either weights ([`Tensor::variable`]) or
//! inputs ([`Tensor::input_variable`], e.g. the activation a pipeline stage received).
//! [`Tensor::backward_split`] propagates only along the path to the *inputs* (the "B" pass that the
//! previous pipeline stage is waiting for) and returns a [`WeightGradWork`] holding, for every op
//! that touches a weight, the output gradient it will need. Running that work later (the "W" pass)
//! produces exactly the weight gradients a full backward would have, so a schedule can fill
//! pipeline bubbles with it.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};

/// The backward of one op.
pub trait BackwardOp: Send + Sync {
    fn name(&self) -> &'static str;

    /// Gradients of the op's inputs given the gradient of its output, computed only where
    /// `needs[i]`; other entries are `None`.
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>>;

    /// How an error names input `n` (`input 2`; a checkpoint names its captured tensors).
    fn input_name(&self, n: usize) -> String {
        format!("input {n}")
    }
}

/// A backward written as a closure, which keeps each op's forward and backward side by side.
pub(crate) struct FnBackward<F> {
    pub name: &'static str,
    pub f: F,
}

impl<F> BackwardOp for FnBackward<F>
where
    F: Fn(&[Tensor], &Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn backward(
        &self,
        inputs: &[Tensor],
        output: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        (self.f)(inputs, output, grad, needs)
    }
}

/// Shorthand for building a [`FnBackward`].
pub(crate) fn backward_fn<F>(name: &'static str, f: F) -> FnBackward<F>
where
    F: Fn(&[Tensor], &Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync,
{
    FnBackward { name, f }
}

/// The op of a tensor with no differentiable inputs (never called).
pub(crate) struct NoBackward;

impl BackwardOp for NoBackward {
    fn name(&self) -> &'static str {
        "none"
    }
    fn backward(&self, inputs: &[Tensor], _: &Tensor, _: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![None; inputs.len()])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    Weight,
    Input,
}

pub(crate) enum GradInfo {
    None,
    Leaf {
        kind: VarKind,
        grad: Mutex<Option<Tensor>>,
    },
    /// An op's output: the op, its inputs, and the versions of the inputs' buffers and then of
    /// the output's own when the op ran (see [`crate::storage::SharedStorage`]).
    Node {
        op: Box<dyn BackwardOp>,
        inputs: Vec<Tensor>,
        versions: Vec<u64>,
        input_path: bool,
    },
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Disables graph recording on this thread until dropped (restores the previous mode).
#[derive(Debug)]
pub struct NoGradGuard {
    prev: bool,
}

impl NoGradGuard {
    pub fn new() -> Self {
        NoGradGuard { prev: GRAD_ENABLED.with(|g| g.replace(false)) }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.prev));
    }
}

/// Runs `f` without recording autograd history (inference, optimizer math, evaluation).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Runs `f` recording autograd history even inside [`no_grad`] or a backward pass (a backward
/// that recomputes its forward: [`crate::checkpoint()`]); restores the previous mode after.
pub(crate) fn enable_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(true)));
    f()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Everything that requires a gradient.
    Full,
    /// Only the path to input variables; weight work is deferred.
    InputsOnly,
}

impl Pass {
    fn visits(self, t: &Tensor) -> bool {
        match self {
            Pass::Full => t.requires_grad(),
            Pass::InputsOnly => t.on_input_path(),
        }
    }
}

/// Deferred weight-gradient work from [`Tensor::backward_split`].
#[derive(Default)]
pub struct WeightGradWork {
    /// (op output, which inputs to differentiate, gradient of the output)
    items: Vec<(Tensor, Vec<bool>, Tensor)>,
    /// Gradients of weight-only tensors, to propagate as they are.
    seeds: Vec<(Tensor, Tensor)>,
}

impl std::fmt::Debug for WeightGradWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightGradWork({} pieces)", self.len())
    }
}

impl WeightGradWork {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.seeds.is_empty()
    }

    /// Number of deferred pieces of work (ops plus weight-only seeds).
    pub fn len(&self) -> usize {
        self.items.len() + self.seeds.len()
    }

    /// Computes the deferred weight gradients and accumulates them into the weights.
    pub fn run(self) -> Result<()> {
        let _guard = NoGradGuard::new();
        let mut seeds = self.seeds;
        for (out, mask, grad) in self.items {
            let (op, inputs) = node_parts(&out)?;
            let grads = op.backward(inputs, &out, &grad, &mask)?;
            for ((input, g), wanted) in inputs.iter().zip(grads).zip(&mask) {
                if let (true, Some(g)) = (*wanted, g) {
                    check_grad_shape(op.name(), input, &g)?;
                    seeds.push((input.clone(), g));
                }
            }
        }
        // One pass over all seeds, so weight-only subgraphs shared by several ops (tied weights)
        // are differentiated once with their summed gradient.
        run_backward(seeds, Pass::Full).map(|_| ())
    }
}

/// The op that made `t` and its inputs, once it is checked that none of the values its backward
/// may read (its inputs and its output) has been written in place since it ran.
fn node_parts(t: &Tensor) -> Result<(&dyn BackwardOp, &[Tensor])> {
    let GradInfo::Node { op, inputs, versions, .. } = &t.0.grad else { unreachable!("only op outputs are queued") };
    let saved = inputs.iter().map(|i| (i, "input")).chain(std::iter::once((t, "output")));
    for (n, ((tensor, what), &then)) in saved.zip(versions).enumerate() {
        let now = tensor.0.storage.version();
        if now != then {
            let which = if what == "input" { op.input_name(n) } else { what.to_string() };
            return Err(Error::Backward(format!(
                "op `{}`: its {which} ({:?} {:?}) was written in place after the op ran (version {now}, \
                 {then} when recorded), so its gradient would come from other values; run backward before \
                 the write (an optimizer step, assign, write_window) or write into a copy",
                op.name(),
                tensor.dtype(),
                tensor.dims(),
            )));
        }
    }
    Ok((op.as_ref(), inputs.as_slice()))
}

fn check_grad_shape(op: &str, input: &Tensor, g: &Tensor) -> Result<()> {
    if g.dims() != input.dims() {
        return Err(Error::Backward(format!(
            "op `{op}` produced a gradient of shape {:?} for an input of shape {:?}",
            g.dims(),
            input.dims()
        )));
    }
    Ok(())
}

/// Tensors reachable from `roots` through visited nodes, outputs before their inputs.
fn topo_order(roots: &[Tensor], pass: Pass) -> Vec<Tensor> {
    topo_order_within(roots, pass, &HashSet::new())
}

/// [`topo_order`] that does not enter the history of the tensors in `bounds` (they are listed,
/// their inputs are not).
fn topo_order_within(roots: &[Tensor], pass: Pass, bounds: &HashSet<TensorId>) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut done: HashSet<TensorId> = HashSet::new();
    // Iterative post-order DFS: deep models would overflow a recursive one.
    let mut stack: Vec<(Tensor, bool)> = roots.iter().filter(|t| pass.visits(t)).map(|t| (t.clone(), false)).collect();
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !done.insert(t.id()) {
            continue;
        }
        stack.push((t.clone(), true));
        if bounds.contains(&t.id()) {
            continue;
        }
        if let GradInfo::Node { inputs, .. } = &t.0.grad {
            for input in inputs {
                if pass.visits(input) && !done.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order.reverse();
    order
}

/// `prev + g`, or `g` when nothing has accumulated yet.
fn sum_into(prev: Option<Tensor>, g: Tensor) -> Result<Tensor> {
    match prev {
        Some(prev) => prev.add(&g),
        None => Ok(g),
    }
}

/// `g` as a leaf keeps it: a contiguous buffer of its own, as PyTorch's AccumulateGrad keeps
/// only a gradient nothing else holds. A pass-through backward (add's, a seed's) hands on the very
/// tensor the caller holds, and a broadcast's is a stride-0 view: stored as they are, a write into
/// one gradient would change another, or the caller's seed, and in-place updates would refuse it.
/// A view of part of a larger buffer (cat's backward narrows its gradient) is copied too, so a
/// leaf's gradient does not keep the whole buffer alive.
fn owned_gradient(g: Tensor) -> Result<Tensor> {
    let len = g.0.storage.read().expect("tensor storage lock poisoned").len();
    if g.spans_its_buffer(len) && Arc::strong_count(&g.0) == 1 && Arc::strong_count(&g.0.storage) == 1 {
        return Ok(g);
    }
    g.deep_clone()
}

fn accumulate(map: &mut HashMap<TensorId, Tensor>, t: &Tensor, g: Tensor) -> Result<()> {
    let sum = sum_into(map.remove(&t.id()), g)?;
    map.insert(t.id(), sum);
    Ok(())
}

/// Adds `g`, the gradient of some loss with respect to `t`, to `grads` as a seed. A seed of
/// another dtype is cast to its tensor's (torch's engine does the same), so every gradient below
/// is in its tensor's dtype.
fn seed(grads: &mut HashMap<TensorId, Tensor>, t: &Tensor, g: Tensor) -> Result<()> {
    check_grad_shape("seed", t, &g)?;
    let g = if g.dtype() == t.dtype() { g } else { g.to_dtype(t.dtype())? };
    accumulate(grads, t, g)
}

/// Hands `g`, the whole gradient of `t`, to the op that made it, and adds what comes back for
/// the inputs marked in `needs` to `grads`.
fn propagate(
    grads: &mut HashMap<TensorId, Tensor>,
    (op, inputs): (&dyn BackwardOp, &[Tensor]),
    t: &Tensor,
    g: &Tensor,
    needs: &[bool],
) -> Result<()> {
    if !needs.iter().any(|&n| n) {
        return Ok(());
    }
    let input_grads = op.backward(inputs, t, g, needs)?;
    for ((input, ig), &need) in inputs.iter().zip(input_grads).zip(needs) {
        if let (true, Some(ig)) = (need, ig) {
            check_grad_shape(op.name(), input, &ig)?;
            accumulate(grads, input, ig)?;
        }
    }
    Ok(())
}

fn run_backward(seeds: Vec<(Tensor, Tensor)>, pass: Pass) -> Result<WeightGradWork> {
    let _guard = NoGradGuard::new();
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    let roots: Vec<Tensor> = seeds.iter().map(|(t, _)| t.clone()).collect();
    for (t, g) in seeds {
        seed(&mut grads, &t, g)?;
    }
    let mut work = WeightGradWork::default();
    for t in topo_order(&roots, pass) {
        let Some(g) = grads.remove(&t.id()) else { continue };
        match &t.0.grad {
            GradInfo::None => {}
            GradInfo::Leaf { grad, .. } => {
                // Summed from a copy of the slot, so a failed sum leaves the gradient as it was.
                let mut slot = grad.lock().expect("grad lock poisoned");
                let sum = owned_gradient(sum_into(slot.clone(), g)?)?;
                check_grad_shape("accumulated gradient", &t, &sum)?;
                *slot = Some(sum);
            }
            GradInfo::Node { .. } => {
                let (op, inputs) = node_parts(&t)?;
                let needs: Vec<bool> = inputs.iter().map(|i| pass.visits(i)).collect();
                propagate(&mut grads, (op, inputs), &t, &g, &needs)?;
                if pass == Pass::InputsOnly {
                    let deferred: Vec<bool> = inputs.iter().map(|i| i.requires_grad() && !i.on_input_path()).collect();
                    if deferred.iter().any(|&d| d) {
                        work.items.push((t.clone(), deferred, g));
                    }
                }
            }
        }
    }
    Ok(work)
}

/// Gradients of `output` (seeded with `grad`, the gradient of some loss with respect to it) with
/// respect to each of `targets`, returned instead of accumulated (`torch.autograd.grad`): no
/// variable's gradient changes. The graph is walked only where it leads to a target; a target
/// that depends on another gets its gradient and passes it on. A target the output does not
/// depend on gets `None`.
pub fn grad(output: &Tensor, grad: &Tensor, targets: &[Tensor]) -> Result<Vec<Option<Tensor>>> {
    grad_within(output, grad, targets, &[])
}

/// [`grad`], not walking into the history of `bounds` (tensors made outside a recomputed region:
/// their gradients, when targets, are the region's to return, and the outer backward's to take
/// further).
pub(crate) fn grad_within(
    output: &Tensor,
    grad: &Tensor,
    targets: &[Tensor],
    bounds: &[Tensor],
) -> Result<Vec<Option<Tensor>>> {
    let _guard = NoGradGuard::new();
    let wanted: HashSet<TensorId> = targets.iter().map(Tensor::id).collect();
    let stops: HashSet<TensorId> = bounds.iter().map(Tensor::id).collect();
    let order = topo_order_within(std::slice::from_ref(output), Pass::Full, &stops);
    // Whether a tensor leads to a target: inputs come after their outputs in `order`.
    let mut leads: HashSet<TensorId> = HashSet::new();
    for t in order.iter().rev() {
        let through = !stops.contains(&t.id())
            && matches!(&t.0.grad, GradInfo::Node { inputs, .. } if inputs.iter().any(|i| leads.contains(&i.id())));
        if wanted.contains(&t.id()) || through {
            leads.insert(t.id());
        }
    }
    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    seed(&mut grads, output, grad.clone())?;
    let mut found: HashMap<TensorId, Tensor> = HashMap::new();
    for t in &order {
        if !leads.contains(&t.id()) {
            continue;
        }
        // Every reader of `t` comes before it in `order`: its gradient is whole here.
        let Some(g) = grads.remove(&t.id()) else { continue };
        if wanted.contains(&t.id()) {
            found.insert(t.id(), g.clone());
        }
        if stops.contains(&t.id()) || !matches!(t.0.grad, GradInfo::Node { .. }) {
            continue;
        }
        let (op, inputs) = node_parts(t)?;
        let needs: Vec<bool> = inputs.iter().map(|i| leads.contains(&i.id())).collect();
        propagate(&mut grads, (op, inputs), t, &g, &needs)?;
    }
    Ok(targets.iter().map(|t| found.get(&t.id()).cloned()).collect())
}

impl Tensor {
    /// Backward from a one-element loss: accumulates d(loss)/d(v) into every variable `v` it
    /// depends on.
    pub fn backward(&self) -> Result<()> {
        if self.elem_count() != 1 {
            return Err(Error::Backward(format!(
                "backward() needs a one-element loss, got shape {:?}; use backward_with_grad",
                self.dims()
            )));
        }
        if !self.requires_grad() {
            return Err(Error::Backward("the loss does not depend on any variable".into()));
        }
        let seed = Tensor::ones(self.dims(), self.dtype(), &self.device())?;
        run_backward(vec![(self.clone(), seed)], Pass::Full).map(|_| ())
    }

    /// Backward from a tensor of any shape, given the gradient of some loss with respect to it.
    pub fn backward_with_grad(&self, grad: &Tensor) -> Result<()> {
        if !self.requires_grad() {
            return Err(Error::Backward("the tensor does not depend on any variable".into()));
        }
        run_backward(vec![(self.clone(), grad.clone())], Pass::Full).map(|_| ())
    }

    /// The input-gradient half of a backward (ZeroBubble's "B"): gradients flow only to input
    /// variables now; the returned work computes the weight gradients when run (the "W").
    /// `grad` is the gradient of the loss with respect to `self` (ones for a scalar loss if `None`).
    pub fn backward_split(&self, grad: Option<&Tensor>) -> Result<WeightGradWork> {
        let seed = match grad {
            Some(g) => g.clone(),
            None if self.elem_count() == 1 => Tensor::ones(self.dims(), self.dtype(), &self.device())?,
            None => {
                return Err(Error::Backward(format!(
                    "backward_split(None) needs a one-element loss, got shape {:?}; pass its gradient",
                    self.dims()
                )))
            }
        };
        if !self.requires_grad() {
            return Ok(WeightGradWork::default());
        }
        if !self.on_input_path() {
            // Nothing to send upstream: all of the work is weight work.
            check_grad_shape("seed", self, &seed)?;
            return Ok(WeightGradWork { items: Vec::new(), seeds: vec![(self.clone(), seed)] });
        }
        run_backward(vec![(self.clone(), seed)], Pass::InputsOnly)
    }
}
