//! Token permutation for MoE expert dispatch: [`Tensor::moe_permute`] sorts a batch's rows into
//! expert order (the grouped GEMM's input), [`Tensor::moe_unpermute`] brings every token its
//! weighted expert outputs back. The combine gathers per token, so it is deterministic on every
//! device. Kernels: `whale_kernels::cpu::dispatch` and kernels/dispatch.cu.

use std::sync::{Arc, Mutex};

pub use whale_kernels::cpu::dispatch::DispatchPlan;
use whale_kernels::cpu::dispatch::{permute, unpermute, unpermute_weight_grad};
use whale_kernels::cuda::DispatchIndices;

use super::{check_float_any_device, check_same_dtype_any_device};
use crate::backprop::{backward_fn, BackwardOp, NoBackward};
use crate::{Error, Result, Tensor};

/// One MoE call's [`DispatchPlan`], shared by its permute, its combine and their backward, with
/// its indices copied to a GPU at most once.
#[derive(Debug)]
pub struct TokenDispatch {
    pub plan: DispatchPlan,
    /// The plan's indices on GPU `.0`, once a CUDA tensor used them.
    on_gpu: Mutex<Option<(usize, Arc<DispatchIndices>)>>,
}

impl TokenDispatch {
    /// The dispatch of `assignments`, (token, expert) pairs over `n_tokens` tokens and
    /// `n_experts` experts; a pair out of range is an error that names it.
    pub fn new(assignments: &[(usize, usize)], n_tokens: usize, n_experts: usize) -> Result<Arc<TokenDispatch>> {
        let plan =
            DispatchPlan::new(assignments, n_tokens, n_experts).map_err(|msg| Error::invalid("moe_dispatch", msg))?;
        Ok(Arc::new(TokenDispatch { plan, on_gpu: Mutex::new(None) }))
    }

    /// The plan's indices on GPU `ordinal` (copied there on first use).
    pub(crate) fn indices_on(
        &self,
        ordinal: usize,
        upload: impl FnOnce(&DispatchPlan) -> Result<DispatchIndices>,
    ) -> Result<Arc<DispatchIndices>> {
        let mut cached = self.on_gpu.lock().expect("dispatch index lock poisoned");
        if let Some((o, ix)) = &*cached {
            if *o == ordinal {
                return Ok(ix.clone());
            }
        }
        let ix = Arc::new(upload(&self.plan)?);
        *cached = Some((ordinal, ix.clone()));
        Ok(ix)
    }
}

impl Tensor {
    /// `[P, dim]`: row `p` is row `plan.rows[p]` of `self` (`[tokens, dim]`), i.e. the tokens
    /// sorted by expert, each once per expert it goes to. Its backward adds every token's copies.
    pub fn moe_permute(&self, dispatch: &Arc<TokenDispatch>) -> Result<Tensor> {
        let op = "moe_permute";
        check_float_any_device(op, self)?;
        check_rows(op, self, dispatch.plan.n_tokens())?;
        let out = permute_rows(self, dispatch, None)?;
        let d = dispatch.clone();
        let back = backward_fn(op, move |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(combine_rows(g, &d, None)?)])
        });
        Ok(with_history(out, &[self], back))
    }

    /// The combine: `[tokens, dim]` where token `t` gets `sum of weight[p] * self[p]` over its
    /// dispatched rows `p` (ascending, from zero), `self` the experts' outputs (`[P, dim]`) and
    /// `weight` their gate weights in dispatch order (`[P]`). Tokens with no rows get zeros.
    pub fn moe_unpermute(&self, weight: &Tensor, dispatch: &Arc<TokenDispatch>) -> Result<Tensor> {
        let op = "moe_unpermute";
        check_same_dtype_any_device(op, self, weight)?;
        let p = dispatch.plan.len();
        check_rows(op, self, p)?;
        if weight.dims() != [p] {
            return Err(Error::ShapeMismatch { op, lhs: vec![p], rhs: weight.dims().to_vec() });
        }
        let out = combine_rows(self, dispatch, Some(weight))?;
        let d = dispatch.clone();
        let back = backward_fn(op, move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let (y, w) = (&inputs[0], &inputs[1]);
            let dy = if needs[0] { Some(permute_rows(g, &d, Some(w))?) } else { None };
            let dw = if needs[1] { Some(combine_weight_grad(g, y, &d)?) } else { None };
            Ok(vec![dy, dw])
        });
        Ok(with_history(out, &[self, weight], back))
    }
}

fn check_rows(op: &'static str, t: &Tensor, rows: usize) -> Result<()> {
    if t.rank() != 2 || t.dims()[0] != rows {
        return Err(Error::invalid(op, format!("needs [{rows}, dim] rows, got {:?}", t.dims())));
    }
    Ok(())
}

/// `out` with the autograd history of an op on `inputs`.
fn with_history(out: Tensor, inputs: &[&Tensor], back: impl BackwardOp + 'static) -> Tensor {
    let layout = out.layout().clone();
    Tensor::with_history_on(out.0.storage.clone(), layout, out.dtype(), out.device(), inputs, back)
}

/// `scale[p] * x[plan.rows[p]]` (no scale: a copy), without history.
fn permute_rows(x: &Tensor, d: &Arc<TokenDispatch>, scale: Option<&Tensor>) -> Result<Tensor> {
    let dim = x.dims()[1];
    if x.device().is_cuda() {
        return crate::cuda::dispatch::permute(x, d, scale, dim);
    }
    let mut out = vec![0.0f32; d.plan.len() * dim];
    let s = scale.map(Tensor::f32_data).transpose()?;
    permute(&x.f32_data()?, dim, &d.plan.rows, s.as_deref(), &mut out);
    Ok(Tensor::from_op(out, &[d.plan.len(), dim], x.dtype(), &[], NoBackward))
}

/// Every token's sum of `weight[p] * y[p]` over its rows (no weight: a plain sum), without history.
fn combine_rows(y: &Tensor, d: &Arc<TokenDispatch>, weight: Option<&Tensor>) -> Result<Tensor> {
    let dim = y.dims()[1];
    if y.device().is_cuda() {
        return crate::cuda::dispatch::combine(y, d, weight, dim);
    }
    let mut out = vec![0.0f32; d.plan.n_tokens() * dim];
    let w = weight.map(Tensor::f32_data).transpose()?;
    unpermute(&y.f32_data()?, dim, w.as_deref(), (&d.plan.token_offsets, &d.plan.token_rows), &mut out);
    Ok(Tensor::from_op(out, &[d.plan.n_tokens(), dim], y.dtype(), &[], NoBackward))
}

/// `dout[rows[p]] · y[p]` per dispatched row, without history.
fn combine_weight_grad(dout: &Tensor, y: &Tensor, d: &Arc<TokenDispatch>) -> Result<Tensor> {
    let dim = y.dims()[1];
    if y.device().is_cuda() {
        return crate::cuda::dispatch::weight_grad(dout, y, d, dim);
    }
    let mut dw = vec![0.0f32; d.plan.len()];
    unpermute_weight_grad(&dout.f32_data()?, &y.f32_data()?, dim, &d.plan.rows, &mut dw);
    Ok(Tensor::from_op(dw, &[d.plan.len()], y.dtype(), &[], NoBackward))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_gradients, randn};
    use crate::Device;

    // 5 tokens, top-2 of 4 experts; token 4 routed nowhere.
    const ASSIGNMENTS: [(usize, usize); 8] = [(0, 3), (0, 1), (1, 1), (1, 0), (2, 2), (2, 3), (3, 0), (3, 2)];

    #[test]
    fn permute_then_combine_matches_index_select_and_index_add() {
        let d = TokenDispatch::new(&ASSIGNMENTS, 5, 4).unwrap();
        let x = randn(&[5, 6], 1);
        let rows = Tensor::from_vec(d.plan.rows.iter().map(|&r| r as i64).collect(), &[8], &Device::Cpu).unwrap();
        let xp = x.moe_permute(&d).unwrap();
        assert_eq!(xp.to_vec_f32().unwrap(), x.index_select(0, &rows).unwrap().to_vec_f32().unwrap());
        let (y, w) = (randn(&[8, 6], 2), randn(&[8], 3));
        let combined = y.moe_unpermute(&w, &d).unwrap();
        let reference = x.zeros_like().unwrap().index_add(0, &rows, &y.mul(&w.unsqueeze(1).unwrap()).unwrap()).unwrap();
        // The same products added in the same order (each token's rows ascending, from zero).
        assert_eq!(combined.to_vec_f32().unwrap(), reference.to_vec_f32().unwrap());
        assert_eq!(combined.narrow(0, 4, 1).unwrap().to_vec_f32().unwrap(), vec![0.0; 6]);
    }

    #[test]
    fn the_gradients_are_those_of_index_select_mul_and_index_add_to_the_bit() {
        let d = TokenDispatch::new(&ASSIGNMENTS, 5, 4).unwrap();
        let rows = Tensor::from_vec(d.plan.rows.iter().map(|&r| r as i64).collect(), &[8], &Device::Cpu).unwrap();
        let r = randn(&[5, 6], 13);
        let grads = |fused: bool| {
            let (x, w) = (randn(&[5, 6], 10).variable(), randn(&[8], 11).variable());
            let scale = randn(&[8, 6], 12);
            let out = if fused {
                x.moe_permute(&d).unwrap().mul(&scale).unwrap().moe_unpermute(&w, &d).unwrap()
            } else {
                let y = x.index_select(0, &rows).unwrap().mul(&scale).unwrap();
                x.zeros_like().unwrap().index_add(0, &rows, &y.mul(&w.unsqueeze(1).unwrap()).unwrap()).unwrap()
            };
            out.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            [x, w].map(|v| v.grad().unwrap().to_vec_f32().unwrap())
        };
        assert_eq!(grads(true), grads(false));
    }

    #[test]
    fn permute_and_combine_have_finite_difference_gradients() {
        let d = TokenDispatch::new(&ASSIGNMENTS, 5, 4).unwrap();
        let (x, w) = (randn(&[5, 3], 4), randn(&[8], 5));
        let scale = randn(&[8, 3], 6);
        // A per-row nonlinearity between the two, as the experts are.
        assert_gradients(&[x, w], |v| {
            let y = v[0].moe_permute(&d)?.mul(&scale)?.tanh()?;
            y.moe_unpermute(&v[1], &d)?.sqr()?.sum_all()
        });
    }

    #[test]
    fn shapes_that_do_not_fit_the_plan_are_errors() {
        let d = TokenDispatch::new(&ASSIGNMENTS, 5, 4).unwrap();
        let err = randn(&[4, 3], 7).moe_permute(&d).unwrap_err();
        assert!(err.to_string().contains("[5, dim]"), "{err}");
        let err = randn(&[8, 3], 8).moe_unpermute(&randn(&[7], 9), &d).unwrap_err();
        assert!(err.to_string().contains("moe_unpermute"), "{err}");
        let err = TokenDispatch::new(&[(0, 4)], 5, 4).unwrap_err();
        assert!(err.to_string().contains("expert 4"), "{err}");
    }
}
