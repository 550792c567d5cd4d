//! Elementwise ops: unary maps (with their derivatives), binary ops with numpy broadcasting, and
//! `where`/`masked_fill`.

use whale_kernels::cuda::{BinaryOp, UnaryOp};

use super::{check_float_any_device, check_same_dtype, check_same_dtype_any_device, grad_if};
use super::{par_map2, par_map3, par_map_into};
use crate::backprop::backward_fn;
use crate::layout::broadcast_shape;
use crate::{DType, Error, Result, Tensor};

/// sqrt(2/pi), for the tanh form of GELU.
const GELU_C: f32 = 0.797_884_6;

use whale_kernels::cpu::expf::exp_forward;
use whale_kernels::cpu::swiglu::{sigmoid_forward, silu_backward, silu_forward};

/// The backward of an elementwise map from its derivative `df(x, y)`: `dx = dy * df(x, y)`.
fn by_derivative(
    df: impl Fn(f32, f32) -> f32 + Send + Sync + Copy + 'static,
) -> impl Fn(&[f32], &[f32], &[f32]) -> Vec<f32> + Send + Sync + 'static {
    move |x, y, dy| par_map3(x, y, dy, move |x, y, dy| dy * df(x, y))
}

impl Tensor {
    /// `y = f(x)` elementwise, with `dy/dx = df(x, y)`.
    /// `kind` is the same map as a CUDA kernel op code.
    fn unary_op<F, D>(&self, op: (&'static str, UnaryOp), f: F, df: D) -> Result<Tensor>
    where
        F: Fn(f32) -> f32 + Sync,
        D: Fn(f32, f32) -> f32 + Send + Sync + Copy + 'static,
    {
        self.unary_op_kernel(op, |x, y| par_map_into(x, y, f), by_derivative(df))
    }

    /// [`Self::unary_op`] with CPU kernels over whole buffers: `forward(x, y)` writes `y`, and
    /// `backward(x, y, dy)` returns `dx`.
    fn unary_op_kernel<B>(
        &self,
        (name, kind): (&'static str, UnaryOp),
        forward: impl FnOnce(&[f32], &mut [f32]),
        backward: B,
    ) -> Result<Tensor>
    where
        B: Fn(&[f32], &[f32], &[f32]) -> Vec<f32> + Send + Sync + 'static,
    {
        check_float_any_device(name, self)?;
        if self.device().is_cuda() {
            return crate::cuda::unary(self, name, kind);
        }
        let x = self.f32_data()?;
        let mut out = vec![0.0f32; x.len()];
        forward(&x, &mut out);
        let back = backward_fn(name, move |inputs: &[Tensor], output: &Tensor, g: &Tensor, _: &[bool]| {
            let gi = backward(&inputs[0].f32_data()?, &output.f32_data()?, &g.f32_data()?);
            Ok(vec![Some(Tensor::from_op(gi, inputs[0].dims(), inputs[0].dtype(), &[], crate::backprop::NoBackward))])
        });
        Ok(Tensor::from_op(out, self.dims(), self.dtype(), &[self], back))
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary_op(("neg", UnaryOp::Neg), |x| -x, |_, _| -1.0)
    }

    pub fn exp(&self) -> Result<Tensor> {
        self.unary_op_kernel(("exp", UnaryOp::Exp), exp_forward, by_derivative(|_, y| y))
    }

    pub fn log(&self) -> Result<Tensor> {
        self.unary_op(("log", UnaryOp::Log), f32::ln, |x, _| 1.0 / x)
    }

    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary_op(("sqrt", UnaryOp::Sqrt), f32::sqrt, |_, y| 0.5 / y)
    }

    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary_op(("rsqrt", UnaryOp::Rsqrt), |x| 1.0 / x.sqrt(), |x, y| -0.5 * y / x)
    }

    pub fn sqr(&self) -> Result<Tensor> {
        self.unary_op(("sqr", UnaryOp::Sqr), |x| x * x, |x, _| 2.0 * x)
    }

    /// `x^e` for a scalar exponent.
    pub fn powf(&self, e: f32) -> Result<Tensor> {
        // x^0 is constant: its derivative is 0 everywhere, 0 included (0 x 0^-1 would be NaN).
        let grad = move |x: f32, _| if e == 0.0 { 0.0 } else { e * x.powf(e - 1.0) };
        self.unary_op(("powf", UnaryOp::Powf(e)), move |x| x.powf(e), grad)
    }

    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary_op_kernel(("sigmoid", UnaryOp::Sigmoid), sigmoid_forward, by_derivative(|_, y| y * (1.0 - y)))
    }

    pub fn tanh(&self) -> Result<Tensor> {
        self.unary_op(("tanh", UnaryOp::Tanh), f32::tanh, |_, y| 1.0 - y * y)
    }

    /// `max(x, 0)` with NaN kept (as torch.relu; `f32::max` would return 0), and torch's
    /// gradient: zero where `x <= 0`, passed through elsewhere (NaN included).
    pub fn relu(&self) -> Result<Tensor> {
        let f = |x: f32| if x.is_nan() { x } else { x.max(0.0) };
        self.unary_op(("relu", UnaryOp::Relu), f, |x, _| if x <= 0.0 { 0.0 } else { 1.0 })
    }

    /// SiLU (swish): `x * sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary_op_kernel(("silu", UnaryOp::Silu), silu_forward, |x, _, dy| {
            let mut dx = vec![0.0f32; x.len()];
            silu_backward(x, dy, &mut dx);
            dx
        })
    }

    /// GELU in its tanh approximation (GPT-2, llm.c): `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary_op(
            ("gelu", UnaryOp::Gelu),
            |x| 0.5 * x * (1.0 + (GELU_C * (x + 0.044715 * x * x * x)).tanh()),
            |x, _| {
                let u = GELU_C * (x + 0.044715 * x * x * x);
                let t = u.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
            },
        )
    }

    /// Clamps to `[lo, hi]`; the gradient passes where `lo <= x <= hi` (PyTorch's convention).
    pub fn clamp(&self, lo: f32, hi: f32) -> Result<Tensor> {
        if lo > hi || lo.is_nan() || hi.is_nan() {
            return Err(Error::invalid("clamp", format!("empty range [{lo}, {hi}]")));
        }
        self.unary_op(
            ("clamp", UnaryOp::Clamp(lo, hi)),
            move |x| x.clamp(lo, hi),
            move |x, _| if (lo..=hi).contains(&x) { 1.0 } else { 0.0 },
        )
    }

    /// `x * mul + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.unary_op(("affine", UnaryOp::Affine(mul, add)), move |x| x * mul + add, move |_, _| mul)
    }

    pub fn mul_scalar(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    pub fn add_scalar(&self, s: f32) -> Result<Tensor> {
        self.affine(1.0, s)
    }

    /// Broadcasts both operands to a common shape and returns their values as contiguous f32.
    fn broadcast_pair(&self, rhs: &Tensor, op: &'static str) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
        let shape = broadcast_shape(op, self.dims(), rhs.dims())?;
        let a = if self.dims() == shape.as_slice() {
            self.f32_data()?.to_vec()
        } else {
            self.broadcast_as(&shape)?.to_vec_f32()?
        };
        let b = if rhs.dims() == shape.as_slice() {
            rhs.f32_data()?.to_vec()
        } else {
            rhs.broadcast_as(&shape)?.to_vec_f32()?
        };
        Ok((shape, a, b))
    }

    /// `f(a, b)` with broadcasting; `grads(a, b, g, needs)` returns the full-shape gradients, which
    /// are then summed back to each operand's shape.
    fn binary_op<F, G>(&self, rhs: &Tensor, (name, kind): (&'static str, BinaryOp), f: F, grads: G) -> Result<Tensor>
    where
        F: Fn(f32, f32) -> f32 + Sync,
        G: Fn(&Tensor, &Tensor, &Tensor, &[bool]) -> Result<[Option<Tensor>; 2]> + Send + Sync + 'static,
    {
        let dtype = check_same_dtype_any_device(name, self, rhs)?;
        let back = backward_fn(name, move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let [ga, gb] = grads(&inputs[0], &inputs[1], g, needs)?;
            Ok(vec![
                ga.map(|t| t.sum_to_shape(inputs[0].dims())).transpose()?,
                gb.map(|t| t.sum_to_shape(inputs[1].dims())).transpose()?,
            ])
        });
        if self.device().is_cuda() {
            let shape = broadcast_shape(name, self.dims(), rhs.dims())?;
            return crate::cuda::binary((self, rhs), (&shape, dtype), (name, kind), &[self, rhs], back);
        }
        let (shape, out) = if self.dims() == rhs.dims() {
            (self.dims().to_vec(), par_map2(&self.f32_data()?, &rhs.f32_data()?, f))
        } else {
            let (shape, a, b) = self.broadcast_pair(rhs, name)?;
            (shape, par_map2(&a, &b, f))
        };
        Ok(Tensor::from_op(out, &shape, dtype, &[self, rhs], back))
    }

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(
            rhs,
            ("add", BinaryOp::Add),
            |a, b| a + b,
            |_, _, g, n| Ok([grad_if(n[0], || Ok(g.clone()))?, grad_if(n[1], || Ok(g.clone()))?]),
        )
    }

    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(
            rhs,
            ("sub", BinaryOp::Sub),
            |a, b| a - b,
            |_, _, g, n| Ok([grad_if(n[0], || Ok(g.clone()))?, grad_if(n[1], || g.neg())?]),
        )
    }

    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(
            rhs,
            ("mul", BinaryOp::Mul),
            |a, b| a * b,
            |a, b, g, n| Ok([grad_if(n[0], || g.mul(b))?, grad_if(n[1], || g.mul(a))?]),
        )
    }

    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary_op(
            rhs,
            ("div", BinaryOp::Div),
            |a, b| a / b,
            |a, b, g, n| Ok([grad_if(n[0], || g.div(b))?, grad_if(n[1], || g.mul(a)?.div(&b.sqr()?)?.neg())?]),
        )
    }

    /// Elementwise maximum, NaN where either is NaN (as torch.maximum: a NaN must reach the
    /// loss checks, not be replaced by the other side). The gradient is torch's: to the larger
    /// side, half to each on a tie, and whole to both where either is NaN.
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        let max = |a: f32, b: f32| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) };
        self.binary_op(rhs, ("maximum", BinaryOp::Maximum), max, |a, b, g, n| {
            // 0/1 masks: a tie where both `>=` hold; a strict side where only its own does
            // (neither holds for NaN).
            let (ge_ab, ge_ba) = (a.ge(b)?, b.ge(a)?);
            let tie = ge_ab.mul(&ge_ba)?;
            let shared = tie.where_cond(&g.mul_scalar(0.5)?, g)?;
            let (a_less, b_less) = (ge_ba.sub(&tie)?, ge_ab.sub(&tie)?);
            Ok([grad_if(n[0], || a_less.masked_out(&shared))?, grad_if(n[1], || b_less.masked_out(&shared))?])
        })
    }

    /// `where(self, 0, g)` for a 0/1 mask `self` (the gradient routing of `maximum`), on either
    /// device.
    fn masked_out(&self, g: &Tensor) -> Result<Tensor> {
        if g.device().is_cuda() {
            let shape = broadcast_shape("masked", self.dims(), g.dims())?;
            let out = (&shape[..], g.dtype());
            return crate::cuda::binary((self, g), out, ("masked", BinaryOp::Drop), &[], crate::backprop::NoBackward);
        }
        self.where_cond(&g.zeros_like()?, g)
    }

    /// 1.0 where `self >= rhs`, else 0.0 (a mask, not differentiable).
    pub fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("ge", self, rhs)?;
        if self.device().is_cuda() {
            let shape = broadcast_shape("ge", self.dims(), rhs.dims())?;
            let out = (&shape[..], dtype);
            return crate::cuda::binary((self, rhs), out, ("ge", BinaryOp::Ge), &[], crate::backprop::NoBackward);
        }
        let (shape, a, b) = self.broadcast_pair(rhs, "ge")?;
        let out = par_map2(&a, &b, |a, b| if a >= b { 1.0 } else { 0.0 });
        Ok(Tensor::from_op(out, &shape, dtype, &[], crate::backprop::NoBackward))
    }

    /// Picks `on_true` where `self` (the condition, any dtype) is non-zero, else `on_false`; all
    /// three broadcast together.
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("where_cond", on_true, on_false)?;
        let shape = broadcast_shape("where_cond", self.dims(), on_true.dims())?;
        let shape = broadcast_shape("where_cond", &shape, on_false.dims())?;
        let back = |cond_t: Tensor| {
            backward_fn("where_cond", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
                let zeros = g.zeros_like()?;
                Ok(vec![
                    None,
                    grad_if(needs[1], || cond_t.where_cond(g, &zeros)?.sum_to_shape(inputs[1].dims()))?,
                    grad_if(needs[2], || cond_t.where_cond(&zeros, g)?.sum_to_shape(inputs[2].dims()))?,
                ])
            })
        };
        if on_true.device().is_cuda() {
            // A condition of any dtype, as on the CPU: its 0/1 pattern goes up as f32 (a GPU
            // holds only float data).
            let cond = if self.dtype().is_float() { self.detach() } else { self.to_dtype(DType::F32)? };
            let cond = cond.to_device(&on_true.device())?.detach();
            return crate::cuda::select((&cond, on_true, on_false), &shape, back(cond.broadcast_as(&shape)?));
        }
        check_same_dtype("where_cond", on_true, on_false)?;
        let cond = self.broadcast_as(&shape)?.to_vec_f32()?;
        let t = on_true.broadcast_as(&shape)?.to_vec_f32()?;
        let f = on_false.broadcast_as(&shape)?.to_vec_f32()?;
        let out = par_map3(&cond, &t, &f, |c, t, f| if c != 0.0 { t } else { f });
        let cond_t = Tensor::from_vec(cond, &shape, &self.device())?;
        Ok(Tensor::from_op(out, &shape, dtype, &[self, on_true, on_false], back(cond_t)))
    }

    /// `value` where `mask` is non-zero, `self` elsewhere (mask broadcasts to self's shape).
    pub fn masked_fill(&self, mask: &Tensor, value: f32) -> Result<Tensor> {
        check_float_any_device("masked_fill", self)?;
        let fill = Tensor::full(value, &[], self.dtype(), &self.device())?;
        mask.broadcast_as(self.dims())?.where_cond(&fill, self)
    }
}
