//! Recomputation ([`whale_model::nn::Recompute`]): recomputed sublayers give the gradients of the
//! plain graph bit for bit, in both model families and every precision, while the graph keeps
//! less memory alive between the forward and the backward.
//!
//! One test in this binary, so the allocator's count is this test's alone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use whale_model::nn::Recompute;
use whale_model::{CausalLm, DeepSeekV3, DeepSeekV3Config, DenseConfig, DenseModel};
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::{DType, Device, Rng, Tensor};

/// The system allocator, counting the bytes live and the most live since the last reset.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One training step's loss and gradients (as bits, by parameter name), and its memory: the
/// bytes the graph holds between the forward and the backward, and the most live at any point
/// of both, each above what was live before the forward.
struct Step {
    loss: u32,
    grads: Vec<(String, Vec<u32>)>,
    held: usize,
    peak: usize,
}

fn step(model: &dyn CausalLm, ids: &Tensor, targets: &Tensor, lengths: &[usize]) -> Step {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let loss = model.train_loss(ids, targets, lengths).unwrap();
    let held = LIVE.load(Ordering::Relaxed) - base;
    loss.backward().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let grads = model
        .params()
        .iter()
        .map(|(name, p)| {
            let g = p.take_grad().unwrap_or_else(|| panic!("{name} got no gradient"));
            (name.to_string(), g.to_vec_f32().unwrap().into_iter().map(f32::to_bits).collect())
        })
        .collect();
    Step { loss: loss.to_scalar().unwrap().to_bits(), grads, held, peak }
}

impl Step {
    /// This step's memory beside `base`'s (called `name`): the bytes held and the peak, with
    /// their ratios.
    fn memory_against(&self, base: &Step, name: &str) -> String {
        let ratio = |a: usize, b: usize| a as f64 / b as f64;
        format!(
            "graph holds {} KiB ({name} {} KiB, {:.2}x), peak {} KiB ({name} {} KiB, {:.2}x)",
            self.held / 1024,
            base.held / 1024,
            ratio(self.held, base.held),
            self.peak / 1024,
            base.peak / 1024,
            ratio(self.peak, base.peak)
        )
    }
}

/// Rows of random tokens, the last row half padding.
fn batch(vocab: usize, rows: usize, seq: usize) -> (Tensor, Tensor, Vec<usize>) {
    let mut rng = Rng::new(7);
    let ids: Vec<i64> = (0..rows * seq).map(|_| rng.below(vocab as u64) as i64).collect();
    let mut lengths = vec![seq; rows];
    lengths[rows - 1] = seq / 2;
    let targets: Vec<i64> = (0..rows * seq)
        .map(|i| {
            let (r, t) = (i / seq, i % seq);
            if t + 1 < lengths[r] {
                ids[i + 1]
            } else {
                whale_model::IGNORE_INDEX
            }
        })
        .collect();
    let t = |v: Vec<i64>| Tensor::from_vec(v, &[rows, seq], &Device::Cpu).unwrap();
    (t(ids), t(targets), lengths)
}

/// `model` with each recompute setting: the same loss and gradient bits as without, and less
/// memory held between forward and backward. Prints the bytes.
fn check(what: &str, model: &mut dyn CausalLm, vocab: usize) {
    let (ids, targets, lengths) = batch(vocab, 6, 40);
    model.set_recompute(Recompute::default());
    let plain = step(model, &ids, &targets, &lengths);
    for setting in ["attention", "mlp", "attention,mlp"] {
        let r: Recompute = setting.parse().unwrap();
        model.set_recompute(r);
        let got = step(model, &ids, &targets, &lengths);
        assert_eq!(got.loss, plain.loss, "{what}, recompute {r}: loss");
        for ((name, a), (_, b)) in got.grads.iter().zip(&plain.grads) {
            assert!(a == b, "{what}, recompute {r}: the gradient of {name} differs");
        }
        println!("{what}, recompute {r}: {}", got.memory_against(&plain, "plain"));
        assert!(got.held < plain.held, "{what}, recompute {r}: held {} bytes, plain {}", got.held, plain.held);
    }
}

#[test]
fn recomputed_sublayers_give_the_same_gradients_and_hold_less() {
    let cfg = DeepSeekV3Config::tiny();
    // "fp8 dispatch": the routed experts on the dispatch's rounding, read in power-of-two tiles;
    // "fp8 swiglu cache": the experts' SwiGLU inputs kept in FP8.
    for precision in ["f32", "bf16", "fp8", "fp8 dispatch", "fp8 swiglu cache"] {
        let mut model = DeepSeekV3::new(cfg.clone(), 3).unwrap();
        if precision != "f32" {
            model.compute_dtype = DType::BF16;
        }
        if precision.starts_with("fp8") {
            model.set_fp8(Some(Fp8Recipe::default()));
        }
        model.set_fp8_dispatch(precision == "fp8 dispatch");
        model.set_fp8_swiglu_cache(precision == "fp8 swiglu cache");
        check(&format!("tiny DeepSeek-V3 ({precision})"), &mut model, cfg.vocab_size);
        assert_eq!(model.duplicate().unwrap().fp8_swiglu_cache(), precision == "fp8 swiglu cache");
        // A copy keeps the setting; an MoE layer's experts (MTP's too) take `mlp`.
        model.set_recompute(Recompute { attention: true, mlp: false });
        assert_eq!(model.duplicate().unwrap().recompute(), model.recompute());
        let experts = |m: &DeepSeekV3| -> Vec<bool> {
            let layers = m.layers.iter().chain(m.mtp.iter().map(|m| &m.block));
            layers.filter_map(|l| l.moe()).map(|moe| moe.recompute_experts).collect()
        };
        assert!(experts(&model).iter().all(|&r| !r));
        model.set_recompute(Recompute { attention: false, mlp: true });
        assert!(experts(&model).iter().all(|&r| r));
        assert!(model.mtp.iter().all(|m| m.block.moe().is_some()), "the tiny preset's MTP block is MoE");
    }
    swiglu_inputs_cached_in_fp8_hold_less(&cfg);

    let student = DenseConfig::student(cfg.vocab_size);
    let mut dense = DenseModel::new(student.clone(), 4).unwrap();
    check("dense student (f32)", &mut dense, student.vocab_size);
    dense.compute_dtype = DType::BF16;
    check("dense student (bf16)", &mut dense, student.vocab_size);

    assert_eq!("none".parse(), Ok(Recompute::default()));
    assert_eq!(" mlp , attention".parse(), Ok(Recompute { attention: true, mlp: true }));
    assert!("norms".parse::<Recompute>().is_err_and(|e| e.contains("`norms`")));
    assert_eq!("attention,mlp".parse::<Recompute>().unwrap().to_string(), "attention,mlp");
}

/// DeepSeek-V3's FP8 cache of its experts' SwiGLU inputs (TR 3.3.2): the same loss (the forward
/// is the same), less held between forward and backward, and gradients within an E4M3 step of
/// the kept activations' (the SwiGLU's gradient and the down-projections' Wgrad are taken at the
/// rounded inputs).
fn swiglu_inputs_cached_in_fp8_hold_less(cfg: &DeepSeekV3Config) {
    let (ids, targets, lengths) = batch(cfg.vocab_size, 6, 40);
    let mut model = DeepSeekV3::new(cfg.clone(), 3).unwrap();
    model.compute_dtype = DType::BF16;
    model.set_fp8(Some(Fp8Recipe::default()));
    let kept = step(&model, &ids, &targets, &lengths);
    model.set_fp8_swiglu_cache(true);
    let cached = step(&model, &ids, &targets, &lengths);
    assert_eq!(cached.loss, kept.loss, "the forward is the same");
    println!("tiny DeepSeek-V3 (fp8), SwiGLU inputs cached in FP8: {}", cached.memory_against(&kept, "kept"));
    assert!(cached.held < kept.held, "held {} bytes, kept {}", cached.held, kept.held);
    let value = |bits: &[u32]| bits.iter().map(|&b| f64::from(f32::from_bits(b))).collect::<Vec<_>>();
    let (mut diff, mut norm) = (0.0, 0.0);
    for ((name, a), (_, b)) in cached.grads.iter().zip(&kept.grads) {
        let (a, b) = (value(a), value(b));
        assert!(a.iter().all(|v| v.is_finite()), "{name}");
        diff += a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        norm += b.iter().map(|y| y * y).sum::<f64>();
    }
    let rel = (diff / norm).sqrt();
    println!("gradients: {rel:.4} from the kept activations' (relative, over all parameters)");
    assert!(rel > 0.0 && rel < 1.0 / 16.0, "{rel}");
}
