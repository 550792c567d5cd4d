//! Fused neural-network ops on the whale-kernels CPU kernels: softmax, log-softmax, RMSNorm,
//! cross-entropy, RoPE, attention, SwiGLU, dropout. Each carries its backward; none cuts the graph.

use whale_kernels::cpu::{attention, cross_entropy, rmsnorm, rope, softmax, swiglu};

use super::{check_float_any_device, check_no_gradient_wanted, check_same_dtype_any_device, check_shape};
use crate::backprop::backward_fn;
use crate::rng::Rng;
use crate::{DType, Error, Result, Tensor};

pub use whale_kernels::cpu::attention::AttnShape;

/// Length of the last dim, or an error for rank 0.
fn last_dim(op: &'static str, t: &Tensor) -> Result<usize> {
    t.dims().last().copied().ok_or_else(|| Error::invalid(op, "rank-0 tensor has no last dim"))
}

/// A plain tensor (no history) from computed gradient values.
fn grad_tensor(values: Vec<f32>, like: &Tensor) -> Tensor {
    Tensor::from_op(values, like.dims(), like.dtype(), &[], crate::backprop::NoBackward)
}

/// How RoPE pairs channels: the DeepSeek-V3 reference's interleaved pairs `(2i, 2i+1)`, or the
/// NeoX/HF-Llama half split `(i, i + d/2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Interleaved,
    HalfRotated,
}

impl Tensor {
    /// Softmax over the last dim.
    pub fn softmax_last_dim(&self) -> Result<Tensor> {
        check_float_any_device("softmax", self)?;
        let d = last_dim("softmax", self)?;
        if self.device().is_cuda() {
            return crate::cuda::nn::softmax_last_dim(self, d, false);
        }
        let mut y = vec![0.0f32; self.elem_count()];
        softmax::softmax_forward(&self.f32_data()?, d, &mut y);
        let back = backward_fn("softmax", move |inputs: &[Tensor], out: &Tensor, g: &Tensor, _: &[bool]| {
            let mut dx = vec![0.0f32; g.elem_count()];
            softmax::softmax_backward(&out.f32_data()?, &g.f32_data()?, d, &mut dx);
            Ok(vec![Some(grad_tensor(dx, &inputs[0]))])
        });
        Ok(Tensor::from_op(y, self.dims(), self.dtype(), &[self], back))
    }

    /// Log-softmax over the last dim.
    pub fn log_softmax_last_dim(&self) -> Result<Tensor> {
        check_float_any_device("log_softmax", self)?;
        let d = last_dim("log_softmax", self)?;
        if self.device().is_cuda() {
            return crate::cuda::nn::softmax_last_dim(self, d, true);
        }
        let mut y = vec![0.0f32; self.elem_count()];
        softmax::log_softmax_forward(&self.f32_data()?, d, &mut y);
        let back = backward_fn("log_softmax", move |inputs: &[Tensor], out: &Tensor, g: &Tensor, _: &[bool]| {
            let mut dx = vec![0.0f32; g.elem_count()];
            softmax::log_softmax_backward(&out.f32_data()?, &g.f32_data()?, d, &mut dx);
            Ok(vec![Some(grad_tensor(dx, &inputs[0]))])
        });
        Ok(Tensor::from_op(y, self.dims(), self.dtype(), &[self], back))
    }

    /// Softmax over any dim (moved to the last position and back).
    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        let last = self.rank().saturating_sub(1);
        self.layout().check_dim("softmax", dim)?;
        if dim == last {
            return self.softmax_last_dim();
        }
        self.transpose(dim, last)?.softmax_last_dim()?.transpose(dim, last)
    }

    /// RMSNorm over the last dim: `x * rsqrt(mean(x^2) + eps) * weight`, `weight`: `[dim]`. In
    /// bf16/f16 the normalised `x` is rounded to the dtype before the weight multiplies it, as
    /// HF's RMSNorm does (`.to(input_dtype)`, then `* weight`: the fixtures' reference); torch's
    /// fused `F.rms_norm`, which DeepSeek's inference code calls, rounds once instead (spec,
    /// discrepancy 10). In f32 it is one fused pass.
    pub fn rms_norm(&self, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("rms_norm", self, weight)?;
        let d = last_dim("rms_norm", self)?;
        check_shape("rms_norm (weight)", weight, &[d])?;
        if eps.is_nan() || eps < 0.0 {
            return Err(Error::invalid("rms_norm", format!("eps must be >= 0, got {eps}")));
        }
        if matches!(dtype, DType::BF16 | DType::F16) {
            let unit = Tensor::ones(&[d], dtype, &self.device())?;
            return self.rms_norm_fused(&unit, d, eps)?.mul(weight);
        }
        self.rms_norm_fused(weight, d, eps)
    }

    /// [`Tensor::rms_norm`] in one pass, `x * rstd * weight` rounded once to the dtype.
    fn rms_norm_fused(&self, weight: &Tensor, d: usize, eps: f32) -> Result<Tensor> {
        let dtype = self.dtype();
        if self.device().is_cuda() {
            return crate::cuda::nn::rms_norm(self, weight, d, eps);
        }
        let rows = self.elem_count() / d.max(1);
        let (mut y, mut rstd) = (vec![0.0f32; self.elem_count()], vec![0.0f32; rows]);
        rmsnorm::rmsnorm_forward(&self.f32_data()?, &weight.f32_data()?, d, eps, &mut y, &mut rstd);
        let back = backward_fn("rms_norm", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let (x, w) = (&inputs[0], &inputs[1]);
            let mut dx = needs[0].then(|| vec![0.0f32; x.elem_count()]);
            let mut dw = needs[1].then(|| vec![0.0f32; d]);
            rmsnorm::rmsnorm_backward(
                &x.f32_data()?,
                &w.f32_data()?,
                &rstd,
                &g.f32_data()?,
                d,
                dx.as_deref_mut(),
                dw.as_deref_mut(),
            );
            Ok(vec![dx.map(|v| grad_tensor(v, x)), dw.map(|v| grad_tensor(v, w))])
        });
        Ok(Tensor::from_op(y, self.dims(), dtype, &[self, weight], back))
    }

    /// Mean cross-entropy of `self` (logits `[rows, vocab]`) against `targets` (`[rows]`, u32 or
    /// i64), skipping rows whose target is `ignore_index`. Fused log-softmax + NLL. When every row
    /// is ignored the loss is 0 with a zero gradient (PyTorch returns NaN there).
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
        check_float_any_device("cross_entropy", self)?;
        if self.rank() != 2 {
            return Err(Error::invalid(
                "cross_entropy",
                format!("logits must be [rows, vocab], got {:?}", self.dims()),
            ));
        }
        let (rows, vocab) = (self.dims()[0], self.dims()[1]);
        check_shape("cross_entropy (targets)", targets, &[rows])?;
        let t = targets.to_vec_i64()?;
        if let Some(&bad) = t.iter().find(|&&t| t != ignore_index && (t < 0 || t as usize >= vocab)) {
            return Err(Error::IndexOutOfRange { op: "cross_entropy (targets)", index: bad, size: vocab });
        }
        if self.device().is_cuda() {
            return crate::cuda::nn::cross_entropy(self, t, ignore_index, vocab);
        }
        let (mut loss, mut lse) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        let count =
            cross_entropy::cross_entropy_forward(&self.f32_data()?, vocab, &t, ignore_index, &mut loss, &mut lse);
        let scale = if count == 0 { 0.0 } else { 1.0 / count as f64 };
        let mean = (loss.iter().map(|&l| l as f64).sum::<f64>() * scale) as f32;
        let back = backward_fn("cross_entropy", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            let x = &inputs[0];
            let dl = vec![(g.to_scalar()? as f64 * scale) as f32; rows];
            let mut dx = vec![0.0f32; x.elem_count()];
            cross_entropy::cross_entropy_backward(&x.f32_data()?, vocab, &t, ignore_index, &lse, &dl, &mut dx);
            Ok(vec![Some(grad_tensor(dx, x))])
        });
        Ok(Tensor::from_op(vec![mean], &[], self.dtype(), &[self], back))
    }

    /// Rotary position embedding of `self` (`[batch, seq, heads, d]`), with `cos`/`sin` tables
    /// `[seq, d/2]` already holding the angle of each sequence position (see spec section 1.3).
    pub fn rope(&self, cos: &Tensor, sin: &Tensor, layout: RopeLayout) -> Result<Tensor> {
        check_float_any_device("rope", self)?;
        if self.rank() != 4 {
            return Err(Error::invalid("rope", format!("expects [batch, seq, heads, d], got {:?}", self.dims())));
        }
        let (b, s, h, d) = (self.dims()[0], self.dims()[1], self.dims()[2], self.dims()[3]);
        if d % 2 != 0 {
            return Err(Error::invalid("rope", format!("head dim {d} is odd")));
        }
        check_shape("rope (cos)", cos, &[s, d / 2])?;
        check_shape("rope (sin)", sin, &[s, d / 2])?;
        check_no_gradient_wanted("rope", "the cos table", cos)?;
        check_no_gradient_wanted("rope", "the sin table", sin)?;
        let (cos, sin) = (cos.to_vec_f32()?, sin.to_vec_f32()?);
        if self.device().is_cuda() {
            return crate::cuda::nn::rope(self, cos, sin, layout);
        }
        let apply = move |x: &[f32], inverse: bool| {
            let mut y = vec![0.0f32; x.len()];
            match layout {
                RopeLayout::Interleaved => rope::rope_interleaved(x, &cos, &sin, b, s, h, d, inverse, &mut y),
                RopeLayout::HalfRotated => rope::rope_half(x, &cos, &sin, b, s, h, d, inverse, &mut y),
            }
            y
        };
        let y = apply(&self.f32_data()?, false);
        let back = backward_fn("rope", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            // A rotation's transpose is the rotation by the opposite angle.
            Ok(vec![Some(grad_tensor(apply(&g.f32_data()?, true), &inputs[0]))])
        });
        Ok(Tensor::from_op(y, self.dims(), self.dtype(), &[self], back))
    }

    /// Scaled dot-product attention, flash-style on CPU (memory O(seq) per query row).
    /// `q`: `[batch, q_heads, q_len, qk_dim]`, `k`: `[batch, kv_heads, kv_len, qk_dim]`,
    /// `v`: `[batch, kv_heads, kv_len, v_dim]` -> `[batch, q_heads, q_len, v_dim]`. With `causal`,
    /// query i sees keys up to `i + kv_len - q_len`.
    pub fn scaled_dot_product_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
        causal: bool,
    ) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("attention", q, k)?;
        check_same_dtype_any_device("attention", q, v)?;
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            if t.rank() != 4 {
                return Err(Error::invalid(
                    "attention",
                    format!("{name} must be [batch, heads, seq, dim], got {:?}", t.dims()),
                ));
            }
        }
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        let shape = AttnShape {
            batch: qd[0],
            q_heads: qd[1],
            kv_heads: kd[1],
            q_len: qd[2],
            kv_len: kd[2],
            qk_dim: qd[3],
            v_dim: vd[3],
            scale,
            causal,
        };
        let consistent = kd[0] == qd[0] && vd[0] == qd[0] && vd[1] == kd[1] && vd[2] == kd[2] && kd[3] == qd[3];
        if !consistent || kd[1] == 0 || qd[1] % kd[1] != 0 {
            return Err(Error::invalid("attention", format!("inconsistent shapes q {qd:?}, k {kd:?}, v {vd:?}")));
        }
        if q.device().is_cuda() {
            return crate::cuda::nn::attention(q, k, v, shape);
        }
        let mut o = vec![0.0f32; shape.batch * shape.q_heads * shape.q_len * shape.v_dim];
        let mut lse = vec![0.0f32; shape.batch * shape.q_heads * shape.q_len];
        // Keys and values are read where they lie: a decode cache's view of its buffers is not
        // copied. The backward (training) reads packed copies.
        let q_packed = q.contiguous()?;
        Tensor::with_f32_rows([&q_packed, k, v], |[(q_data, _), k_rows, v_rows]| {
            attention::attention_forward_strided(&shape, q_data, k_rows, v_rows, &mut o, &mut lse)
        })?;
        let back = backward_fn("attention", move |inputs: &[Tensor], out: &Tensor, g: &Tensor, needs: &[bool]| {
            let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0f32; q.elem_count()], vec![0.0f32; k.elem_count()], vec![0.0f32; v.elem_count()]);
            let (qv, kv, vv) = (q.f32_data()?, k.f32_data()?, v.f32_data()?);
            attention::attention_backward(
                &shape,
                &qv,
                &kv,
                &vv,
                &out.f32_data()?,
                &lse,
                &g.f32_data()?,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            Ok(vec![
                needs[0].then(|| grad_tensor(dq, q)),
                needs[1].then(|| grad_tensor(dk, k)),
                needs[2].then(|| grad_tensor(dv, v)),
            ])
        });
        let out_shape = [shape.batch, shape.q_heads, shape.q_len, shape.v_dim];
        Ok(Tensor::from_op(o, &out_shape, dtype, &[q, k, v], back))
    }

    /// SwiGLU: `silu(gate) * up`, fused.
    pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let dtype = check_same_dtype_any_device("swiglu", gate, up)?;
        check_shape("swiglu (up)", up, gate.dims())?;
        if matches!(dtype, DType::BF16 | DType::F16) {
            // As DeepSeek's and HF's `silu(gate) * up` in the model's dtype: the activation is
            // rounded before the product (one fused pass would round once).
            return gate.silu()?.mul(up);
        }
        if gate.device().is_cuda() {
            return crate::cuda::nn::swiglu(gate, up);
        }
        let mut out = vec![0.0f32; gate.elem_count()];
        swiglu::swiglu_forward(&gate.f32_data()?, &up.f32_data()?, &mut out);
        let back = backward_fn("swiglu", |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let (gate, up) = (&inputs[0], &inputs[1]);
            let mut dg = needs[0].then(|| vec![0.0f32; gate.elem_count()]);
            let mut du = needs[1].then(|| vec![0.0f32; up.elem_count()]);
            swiglu::swiglu_backward(
                &gate.f32_data()?,
                &up.f32_data()?,
                &g.f32_data()?,
                dg.as_deref_mut(),
                du.as_deref_mut(),
            );
            Ok(vec![dg.map(|v| grad_tensor(v, gate)), du.map(|v| grad_tensor(v, up))])
        });
        Ok(Tensor::from_op(out, gate.dims(), dtype, &[gate, up], back))
    }

    /// Inverted dropout: zeroes each element with probability `p` (drawn from `rng`) and scales the
    /// rest by `1/(1-p)`, so the expectation is unchanged.
    pub fn dropout(&self, p: f32, rng: &mut Rng) -> Result<Tensor> {
        check_float_any_device("dropout", self)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("dropout", format!("p must be in [0, 1), got {p}")));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        // In the storage dtype, so the forward and the backward scale by the same value.
        let keep = self.dtype().round_f32(1.0 / (1.0 - p));
        let mask: Vec<f32> = (0..self.elem_count()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
        if self.device().is_cuda() {
            // The same draws as on the CPU, so a seed drops the same elements on every device.
            return self.mul(&Tensor::from_vec(mask, self.dims(), &self.device())?.to_dtype(self.dtype())?);
        }
        let out = super::par_map2(&self.f32_data()?, &mask, |x, m| x * m);
        let mask = Tensor::from_vec(mask, self.dims(), &self.device())?.to_dtype(self.dtype())?;
        let back = backward_fn("dropout", move |_: &[Tensor], _: &Tensor, g: &Tensor, _: &[bool]| {
            Ok(vec![Some(g.mul(&mask)?)])
        });
        Ok(Tensor::from_op(out, self.dims(), self.dtype(), &[self], back))
    }
}

/// Cos/sin tables `[positions, d/2]` for RoPE with `theta_i = base^(-2i/d)` (optionally already
/// YaRN-corrected frequencies passed as `inv_freq`).
pub fn rope_tables(positions: &[usize], inv_freq: &[f32]) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half);
    let mut sin = Vec::with_capacity(positions.len() * half);
    for &p in positions {
        for &f in inv_freq {
            // The angle as the references compute it, an f32 product (DeepSeek-V3's
            // `torch.outer(t, freqs)`, HF's f32 `inv_freq @ position_ids`): far out it differs
            // from the exact angle (by ~1e-3 rad at 100k positions), and checkpoints were trained
            // with theirs. Its cos and sin in f64, rounded once.
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let dev = crate::Device::Cpu;
    Ok((Tensor::from_vec(cos, &[positions.len(), half], &dev)?, Tensor::from_vec(sin, &[positions.len(), half], &dev)?))
}

/// `theta_i = base^(-2i/d)` for `i < d/2`, computed in f64.
pub fn rope_inv_freq(d: usize, base: f64) -> Vec<f32> {
    (0..d / 2).map(|i| base.powf(-(2.0 * i as f64) / d as f64) as f32).collect()
}
