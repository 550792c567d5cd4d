//! Activation recomputation: a checkpointed region gives the plain graph's gradients bit for bit,
//! in a full and in a split backward, and refuses what it cannot recompute.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use whale_tensor::backprop::grad;
use whale_tensor::checkpoint::recomputations;
use whale_tensor::testing::{assert_gradients, randn};
use whale_tensor::{checkpoint, no_grad, Result, Tensor};

/// `rms_norm(x) * norm -> @ w -> silu * (x @ w) + y`: an input used twice, captured weights
/// (`norm`, `w`), an argument (`y`); counts its runs.
fn block(
    norm: &Tensor,
    w: &Tensor,
    runs: &Arc<AtomicUsize>,
) -> impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static {
    let (norm, w, runs) = (norm.clone(), w.clone(), runs.clone());
    move |a: &[Tensor]| {
        runs.fetch_add(1, Ordering::Relaxed);
        let h = a[0].rms_norm(&norm, 1e-6)?.matmul(&w)?;
        h.silu()?.mul(&a[0].matmul(&w)?)?.add(&a[1])
    }
}

struct Setup {
    norm: Tensor,
    w: Tensor,
    x: Tensor,
    y: Tensor,
}

fn setup() -> Setup {
    Setup {
        norm: randn(&[8], 1).variable(),
        w: randn(&[8, 8], 2).variable(),
        x: randn(&[2, 5, 8], 3).input_variable(),
        y: randn(&[2, 5, 8], 4).input_variable(),
    }
}

fn loss(out: &Tensor) -> Tensor {
    out.sqr().unwrap().mean_all().unwrap()
}

/// The gradients of `norm`, `w`, `x`, `y`, taken out.
fn take(s: &Setup) -> [Vec<f32>; 4] {
    [&s.norm, &s.w, &s.x, &s.y].map(|t| t.take_grad().expect("a gradient").to_vec_f32().unwrap())
}

#[test]
fn a_recomputed_region_gives_the_bits_of_the_plain_graph() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let f = block(&s.norm, &s.w, &runs);
    let plain_out = f(&[s.x.clone(), s.y.clone()]).unwrap();
    loss(&plain_out).backward().unwrap();
    let plain = take(&s);

    runs.store(0, Ordering::Relaxed);
    let out = checkpoint("block", &[&s.x, &s.y], block(&s.norm, &s.w, &runs)).unwrap();
    assert_eq!(out.to_vec_f32().unwrap(), plain_out.to_vec_f32().unwrap());
    assert_eq!(runs.load(Ordering::Relaxed), 1, "the forward runs the region once");
    loss(&out).backward().unwrap();
    assert_eq!(runs.load(Ordering::Relaxed), 2, "the backward runs it again");
    assert_eq!(take(&s), plain);
}

#[test]
fn a_split_backward_recomputes_for_each_half_and_defers_the_weights() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    loss(&block(&s.norm, &s.w, &runs)(&[s.x.clone(), s.y.clone()]).unwrap()).backward().unwrap();
    let plain = take(&s);

    runs.store(0, Ordering::Relaxed);
    let out = checkpoint("block", &[&s.x, &s.y], block(&s.norm, &s.w, &runs)).unwrap();
    let work = loss(&out).backward_split(None).unwrap();
    assert_eq!(runs.load(Ordering::Relaxed), 2, "forward, then the B pass");
    assert!(s.x.grad().is_some() && s.y.grad().is_some(), "the B pass gives the inputs' gradients");
    assert!(s.w.grad().is_none() && s.norm.grad().is_none(), "and leaves the weights' for later");
    work.run().unwrap();
    assert_eq!(runs.load(Ordering::Relaxed), 3, "the W pass recomputes once more");
    assert_eq!(take(&s), plain);
}

#[test]
fn gradients_through_a_checkpoint_match_finite_differences() {
    // Weights as arguments and captured, checkpoints nested.
    let captured = randn(&[4, 4], 5).variable();
    assert_gradients(&[randn(&[3, 4], 6), randn(&[4, 4], 7)], |a| {
        let c = captured.clone();
        checkpoint("outer", &[&a[0], &a[1]], move |a| {
            let h = a[0].matmul(&a[1])?.tanh()?;
            let c = c.clone();
            checkpoint("inner", &[&h], move |h| h[0].matmul(&c)?.silu())?.mul(&a[0])
        })
    });
    // The captured weight's gradient (the check above left its own there), against the plain graph's.
    captured.zero_grad();
    let x = randn(&[3, 4], 8).input_variable();
    let plain = x.matmul(&captured).unwrap().silu().unwrap();
    plain.sum_all().unwrap().backward().unwrap();
    let want = captured.take_grad().unwrap().to_vec_f32().unwrap();
    let c = captured.clone();
    checkpoint("c", &[&x], move |x| x[0].matmul(&c)?.silu()).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(captured.take_grad().unwrap().to_vec_f32().unwrap(), want);
}

#[test]
fn without_gradients_it_is_the_function() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let out = no_grad(|| checkpoint("block", &[&s.x, &s.y], block(&s.norm, &s.w, &runs))).unwrap();
    assert!(!out.requires_grad());
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    // Constant inputs and no captured weight: no history either.
    let c = checkpoint("c", &[&randn(&[3], 9)], |a| a[0].exp()).unwrap();
    assert!(!c.requires_grad());
    // A captured weight alone makes the output require a gradient.
    let w = randn(&[3], 10).variable();
    let w2 = w.clone();
    let out = checkpoint("w", &[&randn(&[3], 11)], move |a| a[0].mul(&w2)).unwrap();
    out.sum_all().unwrap().backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec_f32().unwrap(), randn(&[3], 11).to_vec_f32().unwrap());
}

#[test]
fn what_cannot_be_recomputed_is_an_error_naming_the_region() {
    // A function that changes between runs.
    let x = randn(&[2, 3], 12).input_variable();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let out = checkpoint("shifty", &[&x], move |a| {
        let n = c.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            a[0].exp()
        } else {
            a[0].sum(1)
        }
    })
    .unwrap();
    let err = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint `shifty`") && err.contains("same each time"), "{err}");

    // A variable made inside the region would lose its gradient.
    let err = checkpoint("own", &[&x], |a| a[0].mul(&randn(&[2, 3], 13).variable())).unwrap_err().to_string();
    assert!(err.contains("checkpoint `own`") && err.contains("variable of its own"), "{err}");

    // A captured weight written in place between the forward and the backward.
    let w = randn(&[3], 14).variable();
    let w2 = w.clone();
    let out = checkpoint("stale", &[&x], move |a| a[0].mul(&w2)).unwrap();
    w.assign(&randn(&[3], 15)).unwrap();
    let err = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("`stale`") && err.contains("captured tensor 0") && err.contains("written in place"), "{err}");
}

#[test]
fn captured_tensors_of_every_kind_get_their_gradients() {
    // A weight captured both as it is and as a cast made outside the region (the cast's gradient
    // flows on to the weight through the outer graph), in a full and in a split backward, and an
    // activation on the input path captured rather than passed.
    let w = randn(&[4, 4], 20).variable();
    let x = randn(&[3, 4], 21).input_variable();
    let cast = w.mul_scalar(2.0).unwrap();
    let plain = |x: &Tensor| x.matmul(&w)?.tanh()?.matmul(&cast)?.mul(&x.exp()?);
    plain(&x).unwrap().sum_all().unwrap().backward().unwrap();
    let want = [&w, &x].map(|t| t.take_grad().unwrap().to_vec_f32().unwrap());

    let (w2, cast2) = (w.clone(), cast.clone());
    let region = move |a: &[Tensor]| a[0].matmul(&w2)?.tanh()?.matmul(&cast2);
    let out = checkpoint("both", &[&x], region.clone()).unwrap().mul(&x.exp().unwrap()).unwrap();
    out.sum_all().unwrap().backward().unwrap();
    assert_eq!([&w, &x].map(|t| t.take_grad().unwrap().to_vec_f32().unwrap()), want);

    let out = checkpoint("both", &[&x], region).unwrap().mul(&x.exp().unwrap()).unwrap();
    let work = out.sum_all().unwrap().backward_split(None).unwrap();
    assert!(w.grad().is_none());
    work.run().unwrap();
    assert_eq!([&w, &x].map(|t| t.take_grad().unwrap().to_vec_f32().unwrap()), want);

    // `x` captured: the split's B pass must still reach it through the region.
    let x2 = x.clone();
    let w3 = w.clone();
    let out = checkpoint("captures x", &[], move |_: &[Tensor]| x2.matmul(&w3)?.tanh()).unwrap();
    let work = out.sum_all().unwrap().backward_split(None).unwrap();
    let b_pass = x.grad().expect("the B pass gives the captured input its gradient").to_vec_f32().unwrap();
    work.run().unwrap();
    x.zero_grad();
    x.matmul(&w).unwrap().tanh().unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(b_pass, x.take_grad().unwrap().to_vec_f32().unwrap());
}

#[test]
fn recomputations_are_counted_and_frozen_reads_checked() {
    let x = randn(&[2, 3], 22).input_variable();
    let frozen = randn(&[3], 23);
    let f2 = frozen.clone();
    let before = recomputations();
    let out = checkpoint("frozen", &[&x], move |a: &[Tensor]| a[0].mul(&f2)?.exp()).unwrap();
    out.sum_all().unwrap().backward().unwrap();
    assert!(recomputations() > before, "the backward reran the region");
    // A tensor without a gradient the region reads, written in place before the backward.
    let f3 = frozen.clone();
    let out = checkpoint("frozen", &[&x], move |a: &[Tensor]| a[0].mul(&f3)?.exp()).unwrap();
    frozen.assign(&randn(&[3], 24)).unwrap();
    let err = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint `frozen`") && err.contains("written in place"), "{err}");

    // A rerun that reaches a tensor from outside the forward did not.
    let (w, v) = (randn(&[3], 25).variable(), randn(&[3], 26).variable());
    let runs = Arc::new(AtomicUsize::new(0));
    let (w2, v2, r2) = (w.clone(), v.clone(), runs.clone());
    let out = checkpoint("switches", &[&x], move |a: &[Tensor]| {
        let by = if r2.fetch_add(1, Ordering::Relaxed) == 0 { &w2 } else { &v2 };
        a[0].mul(by)
    })
    .unwrap();
    let err = out.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("checkpoint `switches`") && err.contains("same each time"), "{err}");
}

#[test]
fn grad_returns_gradients_without_accumulating_them() {
    let s = setup();
    let runs = Arc::new(AtomicUsize::new(0));
    let out = block(&s.norm, &s.w, &runs)(&[s.x.clone(), s.y.clone()]).unwrap();
    let l = loss(&out);
    let unrelated = randn(&[3], 16).variable();
    let one = Tensor::ones(&[], l.dtype(), &l.device()).unwrap();
    let got = grad(&l, &one, &[s.w.clone(), s.x.clone(), unrelated.clone()]).unwrap();
    assert!(got[2].is_none(), "no path to an unrelated variable");
    assert!(s.w.grad().is_none() && s.x.grad().is_none(), "nothing accumulated");
    l.backward().unwrap();
    assert_eq!(got[0].as_ref().unwrap().to_vec_f32().unwrap(), s.w.grad().unwrap().to_vec_f32().unwrap());
    assert_eq!(got[1].as_ref().unwrap().to_vec_f32().unwrap(), s.x.grad().unwrap().to_vec_f32().unwrap());

    // A target that depends on another passes its gradient on (torch.autograd.grad): d/dx
    // through h = tanh(x) whether or not h is asked for too.
    let x = randn(&[4], 17).input_variable();
    let h = x.tanh().unwrap();
    let l = h.sqr().unwrap().sum_all().unwrap();
    let one = Tensor::ones(&[], l.dtype(), &l.device()).unwrap();
    let alone = grad(&l, &one, std::slice::from_ref(&x)).unwrap().remove(0).unwrap().to_vec_f32().unwrap();
    let both = grad(&l, &one, &[h.clone(), x.clone()]).unwrap();
    assert_eq!(both[1].as_ref().unwrap().to_vec_f32().unwrap(), alone);
    let dh: Vec<f32> = h.to_vec_f32().unwrap().iter().map(|v| 2.0 * v).collect();
    assert_eq!(both[0].as_ref().unwrap().to_vec_f32().unwrap(), dh);
}
