//! bf16 backward passes against the f32 ones. Every op the model trains with in bf16 has a bf16
//! path of its own (fused kernels that round their outputs and gradients to bf16, RMSNorm and
//! SwiGLU composed where HF's code rounds, means summed in f32, GEMMs on bf16 operands), which the
//! finite-difference tests (f32) do not reach. On bf16-representable inputs, each gradient of
//! the bf16 graph must stay within a few bf16 roundings of the f32 graph's: |g_bf16 - g_f32| <=
//! 2^-5 of the largest |g_f32| of that input (bf16 keeps 8 significant bits, a rounding costs
//! at most 2^-8 of a value; forward outputs, backward intermediates and the gradient itself each
//! round once, and a backward that cancels, as softmax's does, turns a value's rounding into an
//! error against the largest gradient). A wrong factor, a missed term or a gradient routed to
//! the wrong input is an error of order one. (Measured: 0.0016 to 0.0053 of the largest.)

// `&[x.clone()]` reads as "these inputs", as in gradcheck.rs.
#![allow(clippy::cloned_ref_to_slice_refs)]

use whale_tensor::testing::randn;
use whale_tensor::{rope_inv_freq, rope_tables, DType, Device, Result, RopeLayout, Tensor};

/// `t` rounded to bf16 and back: a value both graphs hold exactly.
fn representable(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    representable(randn(shape, seed))
}

/// The gradients of `sum(f(inputs) * r)` for a fixed random cotangent `r`, the inputs given to
/// `f` in `dtype` (leaves of that dtype), the gradients read as f32.
fn gradients(inputs: &[Tensor], dtype: DType, f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Vec<Vec<f32>> {
    let leaves: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(dtype).unwrap().variable()).collect();
    let y = f(&leaves).unwrap();
    assert_eq!(y.dtype(), dtype, "the op keeps its inputs' dtype");
    let r = rand(y.dims(), 999);
    y.to_dtype(DType::F32).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    leaves
        .iter()
        .map(|l| {
            let g = l.grad().expect("every input gets a gradient");
            assert_eq!(g.dtype(), dtype, "a leaf's gradient has its dtype");
            g.to_vec_f32().unwrap()
        })
        .collect()
}

fn check(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let (want, got) = (gradients(inputs, DType::F32, &f), gradients(inputs, DType::BF16, &f));
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let largest = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(largest > 0.0, "{what}: input {i} gets a zero gradient");
        let worst = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max) / largest;
        assert!(worst <= 1.0 / 32.0, "{what}: input {i}'s bf16 gradient is {worst} of the largest off the f32 one");
    }
}

#[test]
fn fused_and_composed_ops_have_bf16_gradients_near_the_f32_ones() {
    let x = rand(&[4, 7, 48], 1);
    let w = representable(rand(&[48], 2).sqr().unwrap().add_scalar(0.5).unwrap());
    check("rms_norm", &[x.clone(), w], |t| t[0].rms_norm(&t[1], 1e-6));
    check("swiglu", &[x.clone(), rand(&[4, 7, 48], 3)], |t| Tensor::swiglu(&t[0], &t[1]));
    check("softmax", &[x.clone()], |t| t[0].softmax_last_dim());
    check("log_softmax", &[x.clone()], |t| t[0].log_softmax_last_dim());
    check("mean", &[x.clone()], |t| t[0].mean(1));
    check("silu", &[x.clone()], |t| t[0].silu());
    let weight = rand(&[32, 48], 4);
    check("linear", &[x.clone(), weight], |t| t[0].matmul(&t[1].t()?));
    let (cos, sin) = rope_tables(&[0, 1, 2, 5, 9, 17, 40], &rope_inv_freq(16, 10_000.0)).unwrap();
    let heads = rand(&[2, 7, 3, 16], 5);
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfRotated] {
        check(&format!("rope {layout:?}"), &[heads.clone()], |t| t[0].rope(&cos, &sin, layout));
    }
    let (q, k, v) = (rand(&[2, 4, 9, 16], 6), rand(&[2, 2, 9, 16], 7), rand(&[2, 2, 9, 8], 8));
    check("attention", &[q, k, v], |t| Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.25, true));
    let ids = Tensor::from_vec(vec![3i64, 0, 3, 7, 1, 9], &[2, 3], &Device::Cpu).unwrap();
    check("embedding", &[rand(&[10, 24], 9)], |t| t[0].embedding(&ids));
}

#[test]
fn cross_entropy_has_a_bf16_gradient_near_the_f32_one() {
    // A scalar loss: its gradient to the logits, over ignored rows too.
    let targets = Tensor::from_vec(vec![3i64, -100, 0, 63, 17, 5], &[6], &Device::Cpu).unwrap();
    let logits = representable(rand(&[6, 64], 10).mul_scalar(3.0).unwrap());
    check("cross_entropy", &[logits], |t| t[0].cross_entropy(&targets, -100));
}
