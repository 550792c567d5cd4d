//! FP8 mixed precision (spec deepseek-v3.md section 4.2): fine-grained quantization of tensors and
//! the FP8 linear layer of DeepSeek-V3's recipe, whose three GEMMs run on FP8 operands:
//!
//! - Fprop `y = x W^T`: `x` in 1x128 tiles along the input features, `W` in 128x128 blocks.
//! - Dgrad `dx = dy W`: `dy` in 1x128 tiles along the output features; the same FP8 `W` (its
//!   blocks are square, so its transpose needs no second quantization).
//! - Wgrad `dW = dy^T x`: both re-tiled 128x1, i.e. 1x128 along the tokens; `dW` in f32.
//!
//! Each GEMM is [`fp8_gemm`]: per 128 elements of K a partial sum, then promotion by the two
//! scales into an f32 accumulator. The straight-through gradient is the recipe's: quantization is
//! not differentiated, the GEMMs of the backward pass simply run on quantized operands too.
//!
//! Every tile's scale is its amax / 448; activations and weights floor the amax at 1e-4 (the
//! reference's guard against an all-zero tile), output gradients only at the least that keeps the
//! scale a normal f32 ([`GRADIENT_MIN_AMAX`]): their tiles are often far smaller than 1e-4.

use std::sync::Arc;

use whale_kernels::cpu::fp8::transpose;
pub use whale_kernels::cpu::fp8::{Fp8Blocks, Fp8Format, ScaleFormat, GRADIENT_MIN_AMAX, MIN_AMAX};
use whale_kernels::cpu::fp8_gemm::fp8_gemm;
pub use whale_kernels::cpu::fp8_gemm::{Accumulation, BLOCK};

use crate::backprop::{backward_fn, NoBackward};
use crate::cuda::fp8::Fp8Weight;
use crate::ops::{check_float, check_float_any_device, check_no_gradient_wanted, grad_if};
use crate::{DType, Error, Result, Tensor};

/// How a linear layer's GEMMs run in FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Recipe {
    /// E4M3 for every GEMM input, forward and backward (the recipe's choice).
    pub format: Fp8Format,
    /// The scales of the weights' blocks and the output gradients' tiles.
    pub scale_format: ScaleFormat,
    /// The scales of the input activations' tiles (Fprop's 1x128, Wgrad's re-tiled 128x1):
    /// f32 in V3's training; UE8M0 (powers of two) in V3.1's `scale_fmt: "ue8m0"`, and for
    /// inputs an FP8 dispatch delivered, whose codes Fprop then reads exactly (Wgrad's tiles
    /// along the tokens round them again).
    pub input_scales: ScaleFormat,
    pub accumulation: Accumulation,
}

impl Fp8Recipe {
    /// DeepSeek-V3 on Hopper: E4M3, f32 scales, a ~14-bit accumulator promoted every 128
    /// (emulated element by element: exact, and slow on a CPU).
    pub const DEEPSEEK_V3: Fp8Recipe = Fp8Recipe {
        format: Fp8Format::E4M3,
        scale_format: ScaleFormat::F32,
        input_scales: ScaleFormat::F32,
        accumulation: Accumulation::DEEPSEEK_V3,
    };
    /// The same with an exact f32 partial sum per 128-K block (the reference's Triton kernel;
    /// runs at f32 GEMM speed): the training default.
    pub const F32_ACCUMULATION: Fp8Recipe = Fp8Recipe { accumulation: Accumulation::F32, ..Fp8Recipe::DEEPSEEK_V3 };
}

impl Default for Fp8Recipe {
    fn default() -> Self {
        Fp8Recipe::F32_ACCUMULATION
    }
}

/// A gradient tensor with no history.
fn plain(values: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_op(values, shape, dtype, &[], NoBackward)
}

impl Tensor {
    /// Quantizes a 2-D tensor in `block`s (`(1, 128)` activation tiles, `(128, 128)` weight
    /// blocks): returns the codes (dtype F8E4M3/F8E5M2, same shape) and the f32 scale grid
    /// `[ceil(rows / block.0), ceil(cols / block.1)]` (a value is `code * scale`).
    pub fn quantize_fp8(
        &self,
        block: (usize, usize),
        format: Fp8Format,
        scale_format: ScaleFormat,
    ) -> Result<(Tensor, Tensor)> {
        check_float_any_device("quantize_fp8", self)?;
        check_no_gradient_wanted("quantize_fp8", "the tensor quantized", self)?;
        let [rows, cols] = self.dims()[..] else {
            return Err(Error::invalid("quantize_fp8", format!("needs a 2-D tensor, got {:?}", self.dims())));
        };
        if block.0 == 0 || block.1 == 0 {
            return Err(Error::invalid("quantize_fp8", format!("block {block:?} has a zero edge")));
        }
        if self.device().is_cuda() {
            let fits = matches!(block, (1, BLOCK) | (BLOCK, BLOCK));
            if !fits || format != Fp8Format::E4M3 {
                return Err(Error::invalid(
                    "quantize_fp8",
                    format!(
                        "on a GPU: E4M3 in 1x128 or 128x128 blocks (the recipe's), got {format:?} in {block:?} blocks"
                    ),
                ));
            }
            return crate::cuda::fp8::quantize(self, block.0, (MIN_AMAX, scale_format));
        }
        let q = Fp8Blocks::quantize(&self.f32_data()?, rows, cols, block, format, scale_format);
        let grid = [rows.div_ceil(block.0), cols.div_ceil(block.1)];
        Ok((
            Tensor::from_fp8_codes(q.codes, &[rows, cols], format)?,
            Tensor::from_vec(q.scales, &grid, &self.device())?,
        ))
    }

    /// The blocks of an FP8 tensor and its scale grid, checked against each other.
    pub fn fp8_blocks(codes: &Tensor, scales: &Tensor, block: (usize, usize)) -> Result<Fp8Blocks> {
        let (rows, cols) = check_fp8_grid(codes, scales, block)?;
        let format = codes.dtype().fp8_format().expect("checked FP8 codes");
        Fp8Blocks::from_parts(codes.fp8_codes()?, scales.to_vec_f32()?, (rows, cols), block, format)
            .map_err(|msg| Error::invalid("fp8_blocks", msg))
    }

    /// `code * scale` per block, as f32, on the codes' device.
    pub fn dequantize_fp8(codes: &Tensor, scales: &Tensor, block: (usize, usize)) -> Result<Tensor> {
        check_no_gradient_wanted("dequantize_fp8", "the scale grid", scales)?;
        if codes.device().is_cuda() {
            check_fp8_grid(codes, scales, block)?;
            if scales.device() != codes.device() {
                return Err(Error::DeviceMismatch { op: "dequantize_fp8", lhs: codes.device(), rhs: scales.device() });
            }
            return crate::cuda::fp8::dequantize(codes, scales, block);
        }
        let q = Self::fp8_blocks(codes, scales, block)?;
        Tensor::from_vec(q.dequantize(), codes.dims(), &codes.device())
    }

    /// `x @ W^T` with FP8 Fprop/Dgrad/Wgrad GEMMs: `self` `[..., in]` (any float dtype; the
    /// output keeps it), `weight` `[out, in]` the master weight (its gradient comes back in its
    /// own dtype, f32 for an f32 master). Quantized online, per tile and block, every call.
    pub fn fp8_linear(&self, weight: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
        check_float_any_device("fp8_linear", weight)?;
        let [n, k] = weight.dims()[..] else {
            return Err(Error::invalid("fp8_linear", format!("weight must be [out, in], got {:?}", weight.dims())));
        };
        if self.device().is_cuda() || weight.device().is_cuda() {
            if self.device() != weight.device() {
                return Err(Error::DeviceMismatch { op: "fp8_linear", lhs: self.device(), rhs: weight.device() });
            }
            check_linear_input(self, k, n)?;
            check_gpu_recipe(recipe)?;
            let scales = (recipe.scale_format, recipe.input_scales);
            return crate::cuda::fp8::linear(self, Fp8Weight::Master(weight), (n, k), scales);
        }
        self.fp8_linear_with(Arc::new(weight_blocks(weight, recipe)?), Some(weight), recipe)
    }

    /// `x @ W^T` for a weight that already is FP8 (`codes` `[out, in]`, `scale_inv` its
    /// 128x128-block scale grid, as DeepSeek-V3's checkpoints store them): FP8 inference. The
    /// weight is frozen; a gradient still flows to `x` (through the Dgrad GEMM).
    pub fn fp8_linear_quantized(&self, codes: &Tensor, scale_inv: &Tensor, recipe: &Fp8Recipe) -> Result<Tensor> {
        check_no_gradient_wanted("fp8_linear", "the stored weight's scale_inv", scale_inv)?;
        if self.device().is_cuda() {
            let (n, k) = check_fp8_grid(codes, scale_inv, (BLOCK, BLOCK))?;
            check_linear_input(self, k, n)?;
            check_gpu_recipe(recipe)?;
            if codes.device().is_cuda() && (codes.device() != self.device() || scale_inv.device() != self.device()) {
                return Err(Error::DeviceMismatch { op: "fp8_linear", lhs: self.device(), rhs: codes.device() });
            }
            let (weight, scales) =
                (Fp8Weight::Stored { codes, scales: scale_inv }, (recipe.scale_format, recipe.input_scales));
            return crate::cuda::fp8::linear(self, weight, (n, k), scales);
        }
        let wq = Self::fp8_blocks(codes, scale_inv, (BLOCK, BLOCK))?;
        self.fp8_linear_with(Arc::new(wq), None, recipe)
    }

    fn fp8_linear_with(&self, wq: Arc<Fp8Blocks>, master: Option<&Tensor>, recipe: &Fp8Recipe) -> Result<Tensor> {
        check_float("fp8_linear", self)?;
        let (n, k) = (wq.rows, wq.cols);
        check_linear_input(self, k, n)?;
        // The rows are the leading dims (`elem_count / k` loses them when k is 0).
        let m: usize = self.dims()[..self.rank() - 1].iter().product();
        let recipe = *recipe;
        let xq = Fp8Blocks::quantize(&self.f32_data()?, m, k, (1, BLOCK), recipe.format, recipe.input_scales);
        let y = fp8_gemm(&xq, &wq, recipe.accumulation);
        let mut out_shape = self.dims().to_vec();
        *out_shape.last_mut().expect("rank >= 1") = n;

        let back = backward_fn("fp8_linear", move |inputs: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            let weight = inputs.get(1).filter(|_| needs[1]).map(|w| (w.dims(), w.dtype()));
            let (dx, dw) = cpu_linear_grads(&inputs[0], Some(&wq), g, &recipe, (needs[0], weight))?;
            Ok(std::iter::once(dx).chain(inputs.get(1).map(|_| dw)).collect())
        });
        let inputs: Vec<&Tensor> = std::iter::once(self).chain(master).collect();
        Ok(Tensor::from_op(y, &out_shape, self.dtype(), &inputs, back))
    }
}

/// A tensor kept in FP8 by [`Tensor::fp8_swiglu_mlp`]: E4M3 codes in 1x128 tiles along its last
/// dim, with f32 scales, and what it takes to give it back (rounded).
struct Cached {
    codes: Tensor,
    scales: Tensor,
    dims: Vec<usize>,
    dtype: DType,
}

impl Cached {
    fn of(t: &Tensor) -> Result<Cached> {
        let cols = t.dims()[t.rank() - 1];
        let rows = t.elem_count().checked_div(cols).unwrap_or(0);
        let (codes, scales) = t.reshape(&[rows, cols])?.quantize_fp8((1, BLOCK), Fp8Format::E4M3, ScaleFormat::F32)?;
        Ok(Cached { codes, scales, dims: t.dims().to_vec(), dtype: t.dtype() })
    }

    fn restore(&self) -> Result<Tensor> {
        Tensor::dequantize_fp8(&self.codes, &self.scales, (1, BLOCK))?.reshape(&self.dims)?.to_dtype(self.dtype)
    }
}

impl Tensor {
    /// DeepSeek-V3's MoE expert MLP with its SwiGLU inputs cached in FP8 (TR 3.3.2):
    /// `down(silu(x_gate gateᵀ) * (x_up upᵀ))`, each projection an FP8 linear layer with its
    /// recipe (`recipes`: gate, up, down), `weights` their f32 master weights (gate, up, down).
    /// The output is the plain composition's, bit for bit. The forward keeps neither the two
    /// projections nor the SwiGLU's output, only the projections' E4M3 codes (1x128 tiles, f32
    /// scales, a byte a value): the backward decodes them, takes the SwiGLU's gradient there,
    /// and recomputes the SwiGLU output from them for the down-projection's Wgrad. The gate and
    /// up GEMMs are not run again (their backward needs only `x` and the weights). `x_gate` and
    /// `x_up` may be one tensor; each gets its own gradient.
    pub fn fp8_swiglu_mlp(
        (x_gate, x_up): (&Tensor, &Tensor),
        weights: [&Tensor; 3],
        recipes: [Fp8Recipe; 3],
    ) -> Result<Tensor> {
        let [gate_w, up_w, down_w] = weights;
        // The two projections and the output.
        let mlp = || -> Result<[Tensor; 3]> {
            let gate = x_gate.fp8_linear(gate_w, &recipes[0])?;
            let up = x_up.fp8_linear(up_w, &recipes[1])?;
            let y = Tensor::swiglu(&gate, &up)?.fp8_linear(down_w, &recipes[2])?;
            Ok([gate, up, y])
        };
        let inputs = [x_gate, x_up, gate_w, up_w, down_w];
        if !(crate::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad())) {
            // No backward to come (evaluation, generation): nothing to cache.
            let [_, _, y] = mlp()?;
            return Ok(y);
        }
        let (y, cached) = crate::no_grad(|| -> Result<_> {
            let [gate, up, y] = mlp()?;
            Ok((y, [Cached::of(&gate)?, Cached::of(&up)?]))
        })?;
        let back =
            backward_fn("fp8_swiglu_mlp", move |inputs: &[Tensor], _: &Tensor, grad: &Tensor, needs: &[bool]| {
                let [x_gate, x_up, gate_w, up_w, down_w] = inputs else { unreachable!("five inputs") };
                let needs_projections = needs[..4].iter().any(|&n| n);
                // The SwiGLU again, recorded, at the cached values.
                let (gate, up) = (cached[0].restore()?.input_variable(), cached[1].restore()?.input_variable());
                let h = crate::backprop::enable_grad(|| Tensor::swiglu(&gate, &up))?;
                let (dh, d_down) = linear_grads(&h.detach(), down_w, grad, &recipes[2], (needs_projections, needs[4]))?;
                let mut grads = vec![None, None, None, None, d_down];
                if let Some(dh) = dh {
                    let d = crate::backprop::grad(&h, &dh, &[gate, up])?;
                    let missing =
                        || Error::Backward("fp8_swiglu_mlp: the SwiGLU gave no gradient to its inputs".into());
                    let [d_gate, d_up] = [0, 1].map(|i| d[i].clone().ok_or_else(missing));
                    let (d_gate, d_up) = (d_gate?, d_up?);
                    (grads[0], grads[2]) = linear_grads(x_gate, gate_w, &d_gate, &recipes[0], (needs[0], needs[2]))?;
                    (grads[1], grads[3]) = linear_grads(x_up, up_w, &d_up, &recipes[1], (needs[1], needs[3]))?;
                }
                Ok(grads)
            });
        Ok(Tensor::with_history(y.0.storage.clone(), y.0.layout.clone(), y.dtype(), &inputs, back))
    }
}

/// The FP8 linear layer's gradients for its input `x` (`need.0`) and master `weight` (`need.1`)
/// given the output's gradient, without its forward: [`Tensor::fp8_linear`]'s backward, on
/// either device.
fn linear_grads(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    recipe: &Fp8Recipe,
    (need_x, need_w): (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    if !(need_x || need_w) {
        return Ok((None, None));
    }
    let dw = need_w.then(|| (weight.dims(), weight.dtype()));
    if x.device().is_cuda() {
        let scales = (recipe.scale_format, recipe.input_scales);
        let kept = match need_x {
            true => Some(crate::cuda::fp8::Kept::Blocks(crate::cuda::fp8::weight_blocks(weight, recipe.scale_format)?)),
            false => None,
        };
        return crate::cuda::fp8::linear_grads(x, kept.as_ref(), grad, scales, (need_x, dw));
    }
    let wq = need_x.then(|| weight_blocks(weight, recipe)).transpose()?;
    cpu_linear_grads(x, wq.as_ref(), grad, recipe, (need_x, dw))
}

/// The 128x128 blocks of a master weight `[n, k]` (a checked 2-D float tensor on the CPU), in
/// the recipe's format and weight scales.
fn weight_blocks(weight: &Tensor, recipe: &Fp8Recipe) -> Result<Fp8Blocks> {
    let [n, k] = weight.dims()[..] else { unreachable!("a checked [out, in] weight") };
    Ok(Fp8Blocks::quantize(&weight.f32_data()?, n, k, (BLOCK, BLOCK), recipe.format, recipe.scale_format))
}

/// The FP8 linear layer's backward on the CPU: Dgrad `dx = dy W` (`dy` in 1x128 tiles, the
/// weight's blocks transposed) when `need_x` (which needs `wq`), and Wgrad `dW = dyᵀ x` (both
/// re-tiled along the tokens) when `weight` gives the master weight's shape and dtype, for `x`
/// `[..., k]`, the weight's blocks `wq` `[n, k]` and `dy` `[..., n]`.
fn cpu_linear_grads(
    x: &Tensor,
    wq: Option<&Fp8Blocks>,
    dy: &Tensor,
    recipe: &Fp8Recipe,
    (need_x, weight): (bool, Option<(&[usize], DType)>),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (n, k) = (dy.dims()[dy.rank() - 1], x.dims()[x.rank() - 1]);
    let m: usize = x.dims()[..x.rank() - 1].iter().product();
    let (fmt, sfmt, xfmt) = (recipe.format, recipe.scale_format, recipe.input_scales);
    let dy = dy.f32_data()?;
    let dx = grad_if(need_x, || {
        let wq = wq.ok_or_else(|| Error::invalid("fp8_linear", "the input's gradient needs the weight"))?;
        // Dgrad: [m, n] x [n, k], K = n.
        let dyq = Fp8Blocks::quantize_with_min_amax(&dy, (m, n), (1, BLOCK), (fmt, sfmt), GRADIENT_MIN_AMAX);
        Ok(plain(fp8_gemm(&dyq, &wq.transpose(), recipe.accumulation), x.dims(), x.dtype()))
    })?;
    let dw = match weight {
        Some((dims, dtype)) => {
            // Wgrad: [n, m] x [m, k], K = m (the tokens): both operands tiled along it.
            let dyt = Fp8Blocks::quantize_with_min_amax(
                &transpose(&dy, m, n),
                (n, m),
                (1, BLOCK),
                (fmt, sfmt),
                GRADIENT_MIN_AMAX,
            );
            let xt = Fp8Blocks::quantize(&transpose(&x.f32_data()?, m, k), k, m, (1, BLOCK), fmt, xfmt);
            Some(plain(fp8_gemm(&dyt, &xt, recipe.accumulation), dims, dtype))
        }
        None => None,
    };
    Ok((dx, dw))
}

/// Low-precision communication (spec 4.2, TR 3.3.2): DeepSeek-V3 sends the tokens of an MoE
/// dispatch, and the gradients that come back to the experts in the backward, as E4M3 in 1x128
/// tiles with power-of-two scales. These two ops give a value the rounding of that wire on any
/// number of ranks, so that expert parallelism (which then moves the codes, losslessly: a value
/// already on the grid re-encodes exactly) and one rank compute the same numbers.
impl Tensor {
    /// The values as they arrive from an FP8 dispatch ([`fp8_comm_quantize`] with the
    /// activations' amax floor, 1e-4, and back). The gradient goes straight through (the
    /// dispatch's backward, a combine, stays in high precision).
    pub fn fp8_comm_round(&self) -> Result<Tensor> {
        let values = comm_rounded("fp8_comm_round", self, MIN_AMAX)?;
        let back = backward_fn("fp8_comm_round", |_: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            Ok(vec![grad_if(needs[0], || Ok(g.clone()))?])
        });
        Ok(Tensor::with_history(values.0.storage.clone(), values.0.layout.clone(), self.dtype(), &[self], back))
    }

    /// The values unchanged (no copy); in the backward their gradient is rounded as
    /// [`Tensor::fp8_comm_round`] rounds values, with output gradients' amax floor
    /// ([`GRADIENT_MIN_AMAX`]): the gradient an FP8 combine-backward delivers to the experts.
    pub fn fp8_comm_round_grad(&self) -> Result<Tensor> {
        check_comm_rows("fp8_comm_round_grad", self)?;
        let back = backward_fn("fp8_comm_round_grad", move |_: &[Tensor], _: &Tensor, g: &Tensor, needs: &[bool]| {
            Ok(vec![grad_if(needs[0], || comm_rounded("fp8_comm_round_grad", g, GRADIENT_MIN_AMAX))?])
        });
        Ok(Tensor::with_history(self.0.storage.clone(), self.0.layout.clone(), self.dtype(), &[self], back))
    }
}

/// `x` through the FP8 wire ([`fp8_comm_quantize`] with `min_amax`) and back, on its device:
/// the values, with no history.
fn comm_rounded(op: &'static str, x: &Tensor, min_amax: f32) -> Result<Tensor> {
    let cols = check_comm_rows(op, x)?;
    if x.device().is_cuda() {
        return crate::cuda::fp8::comm_round(op, x, cols, min_amax);
    }
    let values = fp8_comm_quantize(&x.f32_data()?, cols, min_amax).dequantize();
    Ok(plain(values, x.dims(), x.dtype()))
}

/// The FP8 wire of DeepSeek-V3's low-precision communication: `x` (rows of `cols` values) as
/// E4M3 in 1x128 tiles with power-of-two scales (the least power of two at or above
/// `max(amax, min_amax) / 448`). Rounding by it is idempotent: values it gave re-encode exactly,
/// whatever the floor (a smaller one only halves the scale, which E4M3's codes absorb), which is
/// what lets an all-to-all carry them as codes.
pub fn fp8_comm_quantize(x: &[f32], cols: usize, min_amax: f32) -> Fp8Blocks {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let format = (Fp8Format::E4M3, ScaleFormat::Ue8m0);
    Fp8Blocks::quantize_with_min_amax(x, (rows, cols), (1, BLOCK), format, min_amax)
}

/// A float tensor of rank >= 1, whose last dim the tiles run along: that dim.
fn check_comm_rows(op: &'static str, t: &Tensor) -> Result<usize> {
    check_float_any_device(op, t)?;
    let why = "needs a tensor of rank >= 1 (tiles run along the last dim)";
    t.dims().last().copied().ok_or_else(|| Error::invalid(op, why))
}

/// `x` is `[..., k]` for a weight `[n, k]`.
fn check_linear_input(x: &Tensor, k: usize, n: usize) -> Result<()> {
    if x.rank() == 0 || x.dims()[x.rank() - 1] != k {
        return Err(Error::ShapeMismatch { op: "fp8_linear", lhs: x.dims().to_vec(), rhs: vec![n, k] });
    }
    Ok(())
}

/// The GPU's FP8 kernels read E4M3 codes (with f32 or power-of-two scales), and accumulate on the
/// tensor cores with promotion to f32 every 128 of K: the recipe's `Accumulation::F32`. The CPU's
/// emulation of a limited accumulator has no GPU twin (the tensor cores are the real thing), so
/// it is refused rather than silently not followed.
fn check_gpu_recipe(recipe: &Fp8Recipe) -> Result<()> {
    if recipe.accumulation != Accumulation::F32 {
        return Err(Error::invalid(
            "fp8_linear",
            format!(
                "on a GPU the GEMMs accumulate on the tensor cores (Accumulation::F32); {:?} is a CPU emulation",
                recipe.accumulation
            ),
        ));
    }
    if recipe.format != Fp8Format::E4M3 {
        return Err(Error::invalid(
            "fp8_linear",
            format!("on a GPU the recipe must be E4M3 (the kernels' format), got {:?}", recipe.format),
        ));
    }
    Ok(())
}

/// 2-D FP8 codes (their `[rows, cols]`) and a scale grid that fits them in `block`s.
fn check_fp8_grid(codes: &Tensor, scales: &Tensor, block: (usize, usize)) -> Result<(usize, usize)> {
    let op = "fp8_blocks";
    if codes.dtype().fp8_format().is_none() {
        return Err(Error::UnsupportedDType { op, dtype: codes.dtype(), why: "codes must be F8E4M3 or F8E5M2" });
    }
    let [rows, cols] = codes.dims()[..] else {
        return Err(Error::invalid(op, format!("codes must be 2-D, got {:?}", codes.dims())));
    };
    if block.0 == 0 || block.1 == 0 {
        return Err(Error::invalid(op, format!("block {block:?} has a zero edge")));
    }
    let grid = [rows.div_ceil(block.0), cols.div_ceil(block.1)];
    if scales.dims() != grid {
        return Err(Error::invalid(
            op,
            format!("scales have shape {:?}; [{rows}, {cols}] in {block:?} blocks needs {grid:?}", scales.dims()),
        ));
    }
    Ok((rows, cols))
}
