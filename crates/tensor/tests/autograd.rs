//! Autograd semantics: accumulation, no_grad, detach, the B/W split, determinism.

use whale_tensor::fp8::{Fp8Format, ScaleFormat};
use whale_tensor::optim::{clip_grad_norm, AdamW, AdamWConfig};
use whale_tensor::testing::randn;
use whale_tensor::{no_grad, rope_tables, DType, Device, ParamStore, Result, Rng, RopeLayout, Tensor};

#[test]
fn gradients_accumulate_until_cleared() {
    let w = randn(&[3], 1).variable();
    for _ in 0..2 {
        w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    }
    let want: Vec<f32> = w.to_vec_f32().unwrap().iter().map(|x| 4.0 * x).collect();
    assert_eq!(w.grad().unwrap().to_vec_f32().unwrap(), want);
    w.zero_grad();
    assert!(w.grad().is_none());
}

#[test]
fn no_grad_and_detach_record_nothing() {
    let w = randn(&[3], 1).variable();
    let y = no_grad(|| w.exp().unwrap());
    assert!(!y.requires_grad());
    assert!(!w.exp().unwrap().detach().requires_grad());
    assert!(w.exp().unwrap().requires_grad());
    assert!(y.sum_all().unwrap().backward().is_err());
}

/// A two-layer stage: `x -> rms_norm -> @ w1^T -> silu -> @ w2^T`, the kind of subgraph a
/// pipeline stage runs.
fn stage(x: &Tensor, norm: &Tensor, w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    x.rms_norm(norm, 1e-6)?.matmul(&w1.t()?)?.silu()?.matmul(&w2.t()?)
}

#[test]
fn ops_that_pass_no_gradient_refuse_inputs_that_want_one() {
    // Each of these reads an input as plain data: a variable there would silently keep no
    // gradient. Refused while gradients are recorded; detached (or under no_grad) it is fine.
    let w = randn(&[4, 256], 1).variable();
    let (codes, scales) = w.detach().quantize_fp8((1, 128), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    let (cos, sin) = rope_tables(&[0, 1, 2], &[1.0, 0.5]).unwrap();
    let x = randn(&[1, 3, 2, 4], 2);
    let buffer = Tensor::zeros(&[2, 8], DType::F32, &Device::Cpu).unwrap();
    let src = randn(&[2, 3], 3).variable();
    let attempts: [(&str, &dyn Fn() -> Result<()>); 5] = [
        ("quantize_fp8", &|| w.quantize_fp8((1, 128), Fp8Format::E4M3, ScaleFormat::F32).map(drop)),
        ("dequantize_fp8", &|| Tensor::dequantize_fp8(&codes, &scales.variable(), (1, 128)).map(drop)),
        ("rope", &|| x.rope(&cos.variable(), &sin, RopeLayout::HalfRotated).map(drop)),
        ("rope", &|| x.rope(&cos, &sin.variable(), RopeLayout::Interleaved).map(drop)),
        ("write_window", &|| buffer.write_window(1, 2, &src)),
    ];
    for (op, attempt) in attempts {
        let err = attempt().unwrap_err().to_string();
        assert!(err.contains(op) && err.contains("detach"), "{op}: {err}");
        no_grad(attempt).unwrap();
    }
    buffer.write_window(1, 2, &src.detach()).unwrap();
}

#[test]
fn split_backward_defers_weight_gradients_and_matches_full_backward() {
    let (x0, n0, w10, w20) = (randn(&[2, 3, 8], 1), randn(&[8], 2), randn(&[16, 8], 3), randn(&[8, 16], 4));
    let dy = randn(&[2, 3, 8], 5);

    // Reference: one full backward.
    let (x, n, w1, w2) = (x0.input_variable(), n0.variable(), w10.variable(), w20.variable());
    stage(&x, &n, &w1, &w2).unwrap().backward_with_grad(&dy).unwrap();
    let full: Vec<Vec<f32>> = [&x, &n, &w1, &w2].iter().map(|t| t.grad().unwrap().to_vec_f32().unwrap()).collect();

    // Split: B gives the input gradient and no weight gradients; W then gives the weights'.
    let (x, n, w1, w2) = (x0.input_variable(), n0.variable(), w10.variable(), w20.variable());
    let work = stage(&x, &n, &w1, &w2).unwrap().backward_split(Some(&dy)).unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), full[0]);
    for w in [&n, &w1, &w2] {
        assert!(w.grad().is_none(), "weight gradient computed in the B pass");
    }
    assert_eq!(work.len(), 3, "rms_norm, two matmuls");
    work.run().unwrap();
    for (w, want) in [&n, &w1, &w2].iter().zip(&full[1..]) {
        assert_eq!(&w.grad().unwrap().to_vec_f32().unwrap(), want);
    }
}

#[test]
fn split_backward_of_a_weight_only_graph_is_all_deferred() {
    let ids = Tensor::from_vec(vec![0i64, 2], &[2], &Device::Cpu).unwrap();
    let table = randn(&[3, 4], 1).variable();
    let work = table.embedding(&ids).unwrap().sum_all().unwrap().backward_split(None).unwrap();
    assert!(table.grad().is_none());
    work.run().unwrap();
    assert_eq!(table.grad().unwrap().to_vec_f32().unwrap(), vec![1., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.]);
}

#[test]
fn tied_weights_get_the_sum_of_both_uses() {
    let w = randn(&[4, 4], 1).variable();
    let x = randn(&[2, 4], 2).input_variable();
    let y = x.matmul(&w).unwrap().matmul(&w.t().unwrap()).unwrap().sum_all().unwrap();
    let work = y.backward_split(None).unwrap();
    work.run().unwrap();
    let split = w.grad().unwrap().to_vec_f32().unwrap();
    w.zero_grad();
    x.zero_grad();
    x.matmul(&w).unwrap().matmul(&w.t().unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(split, w.grad().unwrap().to_vec_f32().unwrap());
}

/// A few steps of a small attention + MLP model; returns the final parameters' bits.
fn train_once(seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut params = ParamStore::new();
    let (d, s) = (32, 24);
    let emb = params.normal("embed", &[50, d], 0.1, &mut rng).unwrap();
    let wq = params.normal("wq", &[d, d], 0.1, &mut rng).unwrap();
    let wk = params.normal("wk", &[d, d], 0.1, &mut rng).unwrap();
    let wv = params.normal("wv", &[d, d], 0.1, &mut rng).unwrap();
    let norm = params.constant("norm", &[d], 1.0).unwrap();
    let head = params.normal("head", &[50, d], 0.1, &mut rng).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    for _ in 0..3 {
        let tok: Vec<i64> = (0..2 * s).map(|_| rng.below(50) as i64).collect();
        let ids = Tensor::from_vec(tok.clone(), &[2, s], &Device::Cpu).unwrap();
        let h = emb.embedding(&ids).unwrap().rms_norm(&norm, 1e-6).unwrap();
        let split =
            |w: &Tensor| h.matmul(&w.t().unwrap()).unwrap().reshape(&[2, s, 4, 8]).unwrap().transpose(1, 2).unwrap();
        let a = Tensor::scaled_dot_product_attention(&split(&wq), &split(&wk), &split(&wv), 0.35, true).unwrap();
        let h = h.add(&a.transpose(1, 2).unwrap().reshape(&[2, s, d]).unwrap()).unwrap();
        let h = h.dropout(0.1, &mut rng).unwrap();
        let logits = h.matmul(&head.t().unwrap()).unwrap().reshape(&[2 * s, 50]).unwrap();
        let targets =
            Tensor::from_vec(tok.iter().map(|t| (t + 1) % 50).collect::<Vec<_>>(), &[2 * s], &Device::Cpu).unwrap();
        logits.cross_entropy(&targets, -100).unwrap().backward().unwrap();
        clip_grad_norm(&params, 1.0).unwrap();
        opt.step(&params, 1e-2).unwrap();
        params.zero_grad();
    }
    params.iter().flat_map(|(_, p)| p.to_vec_f32().unwrap()).map(f32::to_bits).collect()
}

#[test]
fn same_seed_same_threads_gives_bit_identical_training() {
    let a = train_once(42);
    assert_eq!(a, train_once(42));
    assert_ne!(a, train_once(43));
}

#[test]
fn bf16_parameters_are_rejected_by_the_f32_optimizer_with_a_clear_error() {
    let mut params = ParamStore::new();
    // `a` comes first in name order: a refused step must not have updated it already.
    let a = params.insert("a", &randn(&[2, 2], 2)).unwrap();
    let w = params.insert("w", &randn(&[2, 2], 1).to_dtype(DType::BF16).unwrap()).unwrap();
    a.mul(&w.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let before = a.to_vec_f32().unwrap();
    let mut opt = AdamW::new(AdamWConfig::default()).unwrap();
    let err = opt.step(&params, 0.1).unwrap_err().to_string();
    assert!(err.contains("`w`") && err.contains("f32"), "{err}");
    assert_eq!((a.to_vec_f32().unwrap(), opt.steps()), (before.clone(), 0), "a refused step changes nothing");
    // A learning rate torch.optim.AdamW would refuse.
    w.zero_grad();
    for lr in [f32::NAN, -1e-3, f32::INFINITY] {
        let err = opt.step(&params, lr).unwrap_err().to_string();
        assert!(err.contains("learning rate"), "{err}");
    }
    assert_eq!((a.to_vec_f32().unwrap(), opt.steps()), (before, 0));
    opt.step(&params, 0.1).unwrap();
    assert_eq!(opt.steps(), 1);
}

#[test]
fn casts_send_gradients_back_in_the_source_dtype() {
    // y = 3 * bf16(x): dy/dx = 3, delivered to the f32 variable as f32.
    let x = randn(&[5], 1).variable();
    let y = x.to_dtype(DType::BF16).unwrap().mul_scalar(3.0).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    y.sum_all().unwrap().backward().unwrap();
    let g = x.grad().unwrap();
    assert_eq!(g.dtype(), DType::F32);
    assert_eq!(g.to_vec_f32().unwrap(), vec![3.0; 5]);
}

#[test]
fn gradients_keep_their_variables_shape_and_bad_calls_are_errors() {
    let w = Tensor::zeros(&[3], DType::F32, &Device::Cpu).unwrap().variable();
    // A gradient of another shape, dtype or device is refused (it had broadcast into [3, 3]).
    for bad in [
        Tensor::zeros(&[3, 1], DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(&[2], DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(&[3], DType::BF16, &Device::Cpu).unwrap(),
    ] {
        let err = w.set_grad(Some(bad)).unwrap_err().to_string();
        assert!(err.contains("set_grad") && err.contains("[3]"), "{err}");
    }
    assert!(w.grad().is_none());
    w.set_grad(Some(Tensor::ones(&[3], DType::F32, &Device::Cpu).unwrap())).unwrap();
    w.sum_all().unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec_f32().unwrap(), [2.0; 3]);
    // backward_with_grad and backward_split(None) refuse what backward() refuses.
    let constant = Tensor::ones(&[2], DType::F32, &Device::Cpu).unwrap();
    assert!(constant.backward_with_grad(&constant).is_err());
    let y = w.mul_scalar(2.0).unwrap();
    assert!(y.backward_split(None).unwrap_err().to_string().contains("one-element"));
    // index_add takes one row of indices, as its backward does.
    let x = Tensor::zeros(&[4, 2], DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::from_vec(vec![0i64, 1, 2, 3], &[2, 2], &Device::Cpu).unwrap();
    let src = Tensor::ones(&[4, 2], DType::F32, &Device::Cpu).unwrap();
    assert!(x.index_add(0, &ids, &src).unwrap_err().to_string().contains("1-D"));
    let empty = Tensor::zeros(&[3, 0], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(empty.to_vec2_f32().unwrap(), vec![Vec::<f32>::new(); 3]);
}

#[test]
fn non_finite_values_follow_torch() {
    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    // maximum propagates NaN (f32::max had dropped it).
    let m = t(vec![nan, 1.0, -2.0, 3.0], &[4]).maximum(&t(vec![0.0, nan, -1.0, 2.0], &[4])).unwrap();
    let m = m.to_vec_f32().unwrap();
    assert!(m[0].is_nan() && m[1].is_nan() && m[2] == -1.0 && m[3] == 3.0, "{m:?}");
    // Its gradient as torch's: to the larger side, half each on a tie, whole to both with a NaN.
    let (a, b) =
        (t(vec![nan, 1.0, -2.0, 3.0, 5.0], &[5]).variable(), t(vec![0.0, nan, -1.0, 2.0, 5.0], &[5]).variable());
    a.maximum(&b).unwrap().mul_scalar(2.0).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(a.grad().unwrap().to_vec_f32().unwrap(), [2.0, 2.0, 0.0, 2.0, 1.0]);
    assert_eq!(b.grad().unwrap().to_vec_f32().unwrap(), [2.0, 2.0, 2.0, 0.0, 1.0]);
    // logsumexp: a +inf row is +inf, with a NaN too NaN, all -inf rows -inf, a NaN among -infs
    // or alone NaN.
    let rows = vec![inf, 0.0, inf, nan, -inf, -inf, nan, -inf, nan, nan];
    let l = t(rows, &[5, 2]).logsumexp(1).unwrap().to_vec_f32().unwrap();
    assert!(l[0] == inf && l[1].is_nan() && l[2] == -inf && l[3].is_nan() && l[4].is_nan(), "{l:?}");
    // d(x^0)/dx is 0, at 0 too.
    let x = t(vec![0.0, 2.0], &[2]).variable();
    x.powf(0.0).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32().unwrap(), [0.0, 0.0]);
}

/// PyTorch's version counter: a value an op's backward may read (an input, the op's own output,
/// or a view sharing their buffer) written in place between the forward and the backward makes
/// the backward an error naming the op, instead of gradients computed from the new values. A
/// write after the backward (the training loop's order) is fine.
#[test]
fn in_place_writes_into_values_a_backward_reads_are_refused() {
    let refused = |r: Result<()>, op: &str, which: &str| {
        let err = r.expect_err("a backward through overwritten values").to_string();
        assert!(err.contains(&format!("op `{op}`")) && err.contains(which), "{err}");
        assert!(err.contains("written in place"), "{err}");
    };
    let x = randn(&[2, 3], 2);
    // An input: the product's gradient for x is w, which an optimizer-like write changed.
    let w = randn(&[2, 3], 1).variable();
    let loss = w.mul(&x).unwrap().sum_all().unwrap();
    w.with_f32_mut(|v| v[0] += 1.0).unwrap();
    refused(loss.backward(), "mul", "input 0");
    assert!(w.grad().is_none(), "nothing accumulated");
    // An op's output (exp's backward reads exp(w)): the first op to reach it in the backward is
    // refused, here the sum over it. Every input counts, whether or not its op's backward reads
    // it: stricter than PyTorch, which checks only the tensors an op saved.
    let e = w.exp().unwrap();
    let loss = e.sum_all().unwrap();
    e.assign(&x).unwrap();
    refused(loss.backward(), "sum", "input 0");
    let e = w.exp().unwrap();
    e.assign(&x).unwrap();
    refused(e.backward_with_grad(&Tensor::ones(&[2, 3], DType::F32, &Device::Cpu).unwrap()), "exp", "output");
    // Through a view: narrowing w shares its buffer, so writing w changes what the view's
    // consumer saved.
    let view = w.narrow(1, 0, 2).unwrap();
    let loss = view.sqr().unwrap().sum_all().unwrap();
    w.assign(&randn(&[2, 3], 3)).unwrap();
    refused(loss.backward(), "sqr", "input 0");
    // The deferred weight gradients of a split backward (a pipeline's W pass) are checked too:
    // an optimizer step between the B and the W pass would otherwise mix two weights' values.
    let a = x.input_variable();
    let loss = a.matmul(&w.t().unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
    let work = loss.backward_split(None).unwrap();
    assert!(!work.is_empty());
    w.with_f32_mut(|v| v[1] -= 1.0).unwrap();
    let err = work.run().expect_err("a W pass through a stepped weight").to_string();
    assert!(err.contains("written in place"), "{err}");
    // A refused in-place update writes nothing and takes no new version: the backward through
    // the bf16 tensor it was refused on still runs.
    let h = randn(&[2, 3], 4).to_dtype(DType::BF16).unwrap().variable();
    let loss = h.sqr().unwrap().sum_all().unwrap();
    assert!(h.with_f32_mut(|v| v.fill(0.0)).is_err());
    loss.backward().unwrap();
    // Forward, backward, write, forward, backward: a training loop's order is fine, and the
    // second gradient is the new weight's.
    w.zero_grad();
    w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    w.with_f32_mut(|v| v.iter_mut().for_each(|v| *v *= 0.5)).unwrap();
    w.zero_grad();
    w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let want: Vec<f32> = w.to_vec_f32().unwrap().iter().map(|v| 2.0 * v).collect();
    assert_eq!(w.grad().unwrap().to_vec_f32().unwrap(), want);
    // A seed gradient of another dtype is cast to its tensor's, as torch does.
    let (p, q) =
        (randn(&[3], 6).to_dtype(DType::BF16).unwrap().variable(), randn(&[3], 7).to_dtype(DType::BF16).unwrap());
    p.mul(&q).unwrap().backward_with_grad(&Tensor::ones(&[3], DType::F32, &Device::Cpu).unwrap()).unwrap();
    let pg = p.grad().unwrap();
    assert_eq!((pg.dtype(), pg.to_vec_f32().unwrap()), (DType::BF16, q.to_vec_f32().unwrap()));
    // Indices are read as the forward read them: rewriting them before the backward (an
    // integer tensor has no gradient to refuse) does not move the gradient to other rows.
    let table = randn(&[4, 2], 5).variable();
    let ids = Tensor::from_vec(vec![1i64, 3], &[2], &Device::Cpu).unwrap();
    let rows = table.index_select(0, &ids).unwrap();
    ids.write_window(0, 0, &Tensor::from_vec(vec![0i64, 0], &[2], &Device::Cpu).unwrap()).unwrap();
    rows.sum_all().unwrap().backward().unwrap();
    assert_eq!(table.grad().unwrap().to_vec_f32().unwrap(), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
}

/// A leaf's gradient is a contiguous buffer of its own (PyTorch's AccumulateGrad copies what it
/// does not solely own): add's backward passes the caller's seed to both inputs and a broadcast's
/// is a stride-0 view, and stored as they were, writing one gradient changed the other and the
/// seed, and in-place updates refused the view.
#[test]
fn leaf_gradients_own_their_buffers() {
    let (a, b) = (randn(&[2, 3], 1).variable(), randn(&[2, 3], 2).variable());
    let seed = randn(&[2, 3], 3);
    a.add(&b).unwrap().backward_with_grad(&seed).unwrap();
    let (ga, gb) = (a.grad().unwrap(), b.grad().unwrap());
    assert!(!ga.same_storage(&seed) && !gb.same_storage(&seed) && !ga.same_storage(&gb));
    ga.with_f32_mut(|v| v.fill(0.0)).unwrap();
    assert_eq!(gb.to_vec_f32().unwrap(), seed.to_vec_f32().unwrap(), "b's gradient is untouched");
    // The gradient of a sum over a broadcast: a full, writable buffer.
    let w = randn(&[3], 4).variable();
    w.broadcast_as(&[4, 3]).unwrap().sum_all().unwrap().backward().unwrap();
    let gw = w.grad().unwrap();
    assert!(gw.is_contiguous());
    assert_eq!(gw.with_f32_mut(|v| v.to_vec()).unwrap(), vec![4.0; 3]);
}
