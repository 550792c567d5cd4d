//! A finite-difference gradient test for every differentiable op (see `whale_tensor::testing` for
//! the method and why its tolerances are what they are).

// `&[x.clone()]` reads as "these inputs" in every check below; `slice::from_ref` would not.
#![allow(clippy::cloned_ref_to_slice_refs)]

use whale_tensor::testing::{assert_gradients, randn};
use whale_tensor::{rope_inv_freq, rope_tables, Device, Result, Rng, RopeLayout, Tensor};

fn ids(v: &[i64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), &[v.len()], &Device::Cpu).unwrap()
}

/// Values bounded away from 0 (for kinks and poles): |x| in [0.3, 1.3].
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    let x = randn(shape, seed).to_vec_f32().unwrap();
    let v: Vec<f32> = x.iter().map(|&a| a.signum() * (0.3 + a.abs().min(1.0))).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn positive(shape: &[usize], seed: u64) -> Tensor {
    away_from_zero(shape, seed)
        .to_vec_f32()
        .map(|v| v.iter().map(|x| x.abs()).collect::<Vec<_>>())
        .map(|v| Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        .unwrap()
}

macro_rules! unary_grad_test {
    ($name:ident, $input:expr, $f:expr) => {
        #[test]
        fn $name() {
            let f: fn(&Tensor) -> Result<Tensor> = $f;
            assert_gradients(&[$input], |x| f(&x[0]));
        }
    };
}

unary_grad_test!(neg, randn(&[3, 4], 1), |x| x.neg());
unary_grad_test!(exp, randn(&[3, 4], 2), |x| x.exp());
unary_grad_test!(log, positive(&[3, 4], 3), |x| x.log());
unary_grad_test!(sqrt, positive(&[3, 4], 4), |x| x.sqrt());
unary_grad_test!(rsqrt, positive(&[3, 4], 5), |x| x.rsqrt());
unary_grad_test!(sqr, randn(&[3, 4], 6), |x| x.sqr());
unary_grad_test!(powf, positive(&[3, 4], 7), |x| x.powf(2.5));
unary_grad_test!(sigmoid, randn(&[3, 4], 8), |x| x.sigmoid());
unary_grad_test!(tanh, randn(&[3, 4], 9), |x| x.tanh());
unary_grad_test!(relu, away_from_zero(&[3, 4], 10), |x| x.relu());
unary_grad_test!(silu, randn(&[3, 4], 11), |x| x.silu());
unary_grad_test!(gelu, randn(&[3, 4], 12), |x| x.gelu());
unary_grad_test!(clamp, away_from_zero(&[4, 5], 13), |x| x.clamp(-0.8, 0.8));
unary_grad_test!(affine, randn(&[3, 4], 14), |x| x.affine(1.5, -0.5));

#[test]
fn binary_ops_with_broadcasting() {
    let a = randn(&[2, 3, 4], 20);
    let b = positive(&[3, 1], 21);
    assert_gradients(&[a.clone(), b.clone()], |x| x[0].add(&x[1]));
    assert_gradients(&[a.clone(), b.clone()], |x| x[0].sub(&x[1]));
    assert_gradients(&[a.clone(), b.clone()], |x| x[0].mul(&x[1]));
    assert_gradients(&[a.clone(), b.clone()], |x| x[0].div(&x[1]));
    assert_gradients(&[b.clone(), a.clone()], |x| x[0].div(&x[1].add_scalar(3.0)?));
}

#[test]
fn maximum() {
    let a = randn(&[4, 5], 22);
    let b = a.add(&away_from_zero(&[4, 5], 23)).unwrap(); // never within eps of a tie
    assert_gradients(&[a, b], |x| x[0].maximum(&x[1]));
    // Broadcast: [2, 3, 4] against [3, 1], the smaller side's gradient summed over the copies
    // it won (no two values within eps of each other: distinct multiples of 0.1 apart).
    let big = Tensor::from_vec((0..24).map(|i| ((i * 7) % 24) as f32 * 0.1 - 1.15).collect(), &[2, 3, 4], &Device::Cpu)
        .unwrap();
    let small = Tensor::from_vec(vec![-0.5f32, 0.02, 0.61], &[3, 1], &Device::Cpu).unwrap();
    assert_gradients(&[big, small], |x| x[0].maximum(&x[1]));
}

#[test]
fn reductions() {
    let x = randn(&[3, 4, 5], 30);
    for dim in 0..3 {
        assert_gradients(&[x.clone()], |t| t[0].sum(dim));
        assert_gradients(&[x.clone()], |t| t[0].mean_keepdim(dim));
        assert_gradients(&[x.clone()], |t| t[0].max(dim));
        assert_gradients(&[x.clone()], |t| t[0].logsumexp(dim));
    }
    assert_gradients(&[x.clone()], |t| t[0].sum_all());
    assert_gradients(&[x], |t| t[0].mean_all());
}

#[test]
fn matmul_plain_batched_broadcast_and_transposed() {
    let a = randn(&[3, 4], 40);
    let b = randn(&[4, 5], 41);
    assert_gradients(&[a.clone(), b.clone()], |x| x[0].matmul(&x[1]));
    let bt = randn(&[5, 4], 42);
    assert_gradients(&[a.clone(), bt], |x| x[0].matmul(&x[1].t()?));
    let a3 = randn(&[2, 3, 4], 43);
    assert_gradients(&[a3.clone(), b.clone()], |x| x[0].matmul(&x[1]));
    let b3 = randn(&[2, 4, 5], 44);
    assert_gradients(&[a3.clone(), b3], |x| x[0].matmul(&x[1]));
    let b_bcast = randn(&[1, 4, 5], 45);
    assert_gradients(&[a3.clone(), b_bcast], |x| x[0].matmul(&x[1]));
    let a4 = randn(&[2, 2, 3, 4], 46);
    assert_gradients(&[a4, b], |x| x[0].transpose(0, 1)?.matmul(&x[1]));
}

#[test]
fn softmax_and_log_softmax() {
    let x = randn(&[3, 7], 50);
    assert_gradients(&[x.clone()], |t| t[0].softmax_last_dim());
    assert_gradients(&[x.clone()], |t| t[0].log_softmax_last_dim());
    assert_gradients(&[x], |t| t[0].softmax(0));
}

#[test]
fn rms_norm_input_and_weight() {
    let x = randn(&[2, 3, 8], 60);
    let w = randn(&[8], 61);
    assert_gradients(&[x, w], |t| t[0].rms_norm(&t[1], 1e-6));
}

#[test]
fn cross_entropy_with_ignored_rows() {
    let logits = randn(&[5, 7], 70);
    let targets = ids(&[3, -100, 0, 6, -100]);
    assert_gradients(&[logits], |t| t[0].cross_entropy(&targets, -100));
}

#[test]
fn rope_both_layouts() {
    let x = randn(&[2, 5, 3, 8], 80);
    let (cos, sin) = rope_tables(&[0, 1, 2, 7, 30], &rope_inv_freq(8, 10_000.0)).unwrap();
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfRotated] {
        assert_gradients(&[x.clone()], |t| t[0].rope(&cos, &sin, layout));
    }
}

#[test]
fn rope_angles_are_the_references_f32_products() {
    // torch.outer(t, freqs) in f32 (DeepSeek-V3's precompute_freqs_cis, HF's rotary embedding)
    // at position 1000001 and frequency 0.1f32 gives the angle 100000.1015625 and
    // cos -0.99783558 (the exact angle, 100000.1014901..., would give -0.99784034).
    let (cos, _) = rope_tables(&[1_000_001], &[0.1]).unwrap();
    assert_eq!(cos.to_vec_f32().unwrap(), [-0.997_835_6_f32]);
}

#[test]
fn attention_causal_gqa_and_uneven_head_dims() {
    let (b, hq, hk, s, dqk, dv) = (2, 4, 2, 5, 6, 3);
    let q = randn(&[b, hq, s, dqk], 90);
    let k = randn(&[b, hk, s, dqk], 91);
    let v = randn(&[b, hk, s, dv], 92);
    for causal in [true, false] {
        assert_gradients(&[q.clone(), k.clone(), v.clone()], |t| {
            Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.4, causal)
        });
    }
    // Queries at the end of a longer key sequence (a cached prefix).
    let q2 = randn(&[1, 2, 2, dqk], 93);
    let k2 = randn(&[1, 2, 6, dqk], 94);
    let v2 = randn(&[1, 2, 6, dv], 95);
    assert_gradients(&[q2, k2, v2], |t| Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.4, true));
}

#[test]
fn swiglu() {
    assert_gradients(&[randn(&[3, 6], 100), randn(&[3, 6], 101)], |t| Tensor::swiglu(&t[0], &t[1]));
}

#[test]
fn dropout_with_a_fixed_mask() {
    // The same seed each call gives the same mask, so the function is deterministic.
    assert_gradients(&[randn(&[4, 6], 110)], |t| t[0].dropout(0.3, &mut Rng::new(9)));
}

#[test]
fn indexing_ops() {
    let table = randn(&[6, 4], 120);
    let tok = Tensor::from_vec(vec![1i64, 5, 1, 0, 3, 1], &[2, 3], &Device::Cpu).unwrap();
    assert_gradients(&[table.clone()], |t| t[0].embedding(&tok));
    assert_gradients(&[table.clone()], |t| t[0].index_select(1, &ids(&[3, 0, 3])));
    let src = randn(&[6, 3], 121);
    assert_gradients(&[table.clone(), src], |t| t[0].index_add(1, &ids(&[2, 2, 0]), &t[1]));
    let idx = Tensor::from_vec(vec![0i64, 3, 3, 1, 2, 0, 1, 1, 3, 3, 0, 2], &[6, 2], &Device::Cpu).unwrap();
    assert_gradients(&[table.clone()], |t| t[0].gather(1, &idx));
    let src2 = randn(&[6, 2], 122);
    assert_gradients(&[table.clone(), src2], |t| t[0].scatter_add(1, &idx, &t[1]));
    let spread =
        Tensor::from_vec((0..24).map(|i| ((i * 7) % 24) as f32 * 0.1).collect::<Vec<_>>(), &[4, 6], &Device::Cpu)
            .unwrap();
    assert_gradients(&[spread], |t| Ok(t[0].topk(3)?.0));
}

#[test]
fn cat_stack_split_and_where() {
    let a = randn(&[2, 3], 130);
    let b = randn(&[2, 2], 131);
    assert_gradients(&[a.clone(), b.clone()], |t| Tensor::cat(&[t[0].clone(), t[1].clone()], 1));
    assert_gradients(&[a.clone(), a.clone()], |t| Tensor::stack(&[t[0].clone(), t[1].clone()], 1));
    assert_gradients(&[a.clone()], |t| {
        let parts = t[0].split(&[1, 2], 1)?;
        parts[1].mul(&parts[0])
    });
    let cond = Tensor::from_vec(vec![1u32, 0, 1], &[3], &Device::Cpu).unwrap();
    let c = randn(&[2, 3], 132);
    assert_gradients(&[a.clone(), c], |t| cond.where_cond(&t[0], &t[1]));
    // Broadcast operands: each gradient summed back to its own shape.
    let (row, col) = (randn(&[1, 3], 133), randn(&[2, 1], 134));
    assert_gradients(&[row.clone(), col.clone()], |t| cond.where_cond(&t[0], &t[1]));
    let cond2 = Tensor::from_vec(vec![1u32, 0, 0, 1, 1, 0], &[2, 3], &Device::Cpu).unwrap();
    assert_gradients(&[row, a.clone()], |t| cond2.where_cond(&t[0], &t[1]));
    assert_gradients(&[a], |t| t[0].masked_fill(&cond, -5.0));
}

#[test]
fn views() {
    let x = randn(&[2, 3, 4], 140);
    assert_gradients(&[x.clone()], |t| t[0].transpose(0, 2));
    assert_gradients(&[x.clone()], |t| t[0].permute(&[1, 2, 0])?.contiguous());
    assert_gradients(&[x.clone()], |t| t[0].narrow(2, 1, 2));
    assert_gradients(&[x.clone()], |t| t[0].reshape(&[6, 4]));
    assert_gradients(&[x.clone()], |t| t[0].transpose(1, 2)?.reshape(&[2, 12]));
    assert_gradients(&[x.clone()], |t| t[0].unsqueeze(1)?.squeeze(1));
    assert_gradients(&[randn(&[3, 1], 141)], |t| t[0].broadcast_as(&[2, 3, 4]));
    assert_gradients(&[x], |t| t[0].chunk(2, 2)?[1].exp());
}

#[test]
fn grouped_matmul_with_an_empty_group() {
    let x = randn(&[6, 4], 150);
    let (w0, w1, w2) = (randn(&[3, 4], 151), randn(&[3, 4], 152), randn(&[3, 4], 153));
    assert_gradients(&[x, w0, w1, w2], |t| Tensor::grouped_matmul(&t[0], &[2, 0, 4], &t[1..]));
}

#[test]
fn fused_ops_on_strided_inputs() {
    // Views that are not contiguous (a permutation, a transpose, row-strided halves): the fused
    // ops read them through their strides or copy them first, and the gradients land back in
    // the layout of the input they belong to.
    let (cos, sin) = rope_tables(&[0, 1, 2, 7, 30], &rope_inv_freq(8, 10_000.0)).unwrap();
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfRotated] {
        assert_gradients(&[randn(&[2, 8, 3, 5], 160)], |t| t[0].permute(&[0, 3, 2, 1])?.rope(&cos, &sin, layout));
    }
    assert_gradients(&[randn(&[8, 6], 161), randn(&[8], 162)], |t| t[0].t()?.rms_norm(&t[1], 1e-6));
    assert_gradients(&[randn(&[3, 12], 163)], |t| Tensor::swiglu(&t[0].narrow(1, 0, 6)?, &t[0].narrow(1, 6, 6)?));
    let targets = ids(&[3, -100, 0, 6, 2]);
    assert_gradients(&[randn(&[7, 5], 164)], |t| t[0].t()?.cross_entropy(&targets, -100));
    let (q, k, v) = (randn(&[2, 5, 3, 4], 165), randn(&[2, 5, 3, 4], 166), randn(&[2, 5, 3, 2], 167));
    assert_gradients(&[q, k, v], |t| {
        let heads = |x: &Tensor| x.transpose(1, 2);
        Tensor::scaled_dot_product_attention(&heads(&t[0])?, &heads(&t[1])?, &heads(&t[2])?, 0.5, true)
    });
}

#[test]
fn attention_rows_with_no_key_to_attend() {
    // Causal, 5 queries at the end of 3 keys: the first two see none, output zeros and pass no
    // gradient; the rest as usual.
    let (q, k, v) = (randn(&[1, 2, 5, 4], 170), randn(&[1, 2, 3, 4], 171), randn(&[1, 2, 3, 2], 172));
    let out = Tensor::scaled_dot_product_attention(&q, &k, &v, 0.5, true).unwrap().to_vec_f32().unwrap();
    assert!(out.chunks(10).all(|head| head[..4].iter().all(|&x| x == 0.0)), "{out:?}");
    assert_gradients(&[q, k, v], |t| Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.5, true));
}

#[test]
fn max_sends_the_gradient_to_the_first_of_tied_maxima() {
    let x = Tensor::from_vec(vec![1.0f32, 3.0, 3.0, 2.0, 5.0, 5.0], &[2, 3], &Device::Cpu).unwrap().variable();
    x.max(1).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
}
