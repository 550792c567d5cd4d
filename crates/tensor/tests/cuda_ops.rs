//! One test body per op, run on the CPU always and on a GPU when one is present: the CPU result
//! (values and every input's gradient) is the oracle the CUDA backend must match. Without a GPU
//! the CUDA half prints that it was skipped and why; the CPU half and the device-independent
//! checks still run. In CI the CUDA halves run on the emulated driver instead
//! (`the_ops_run_on_the_emulated_driver_in_emulation`, whale-kernels' tests/common/emulator.rs).

#[allow(dead_code)]
#[path = "../../kernels/tests/common/emulator.rs"]
mod emulator;

use whale_kernels::cpu::fp8::{Fp8Format, ScaleFormat};
use whale_kernels::cuda::Fp8GemmKernel;
use whale_tensor::fp8::Fp8Recipe;
use whale_tensor::{rope_inv_freq, rope_tables, DType, Device, Error, Result, Rng, RopeLayout, Tensor, TokenDispatch};

/// Whether GPU 0 is there: the emulated one in the child process of
/// `the_ops_run_on_the_emulated_driver_in_emulation` (its driver loaded on first use).
fn cuda_available() -> bool {
    if emulator::on_the_emulated_driver() {
        return emulator::emulated_gpu("cuda_ops").is_some();
    }
    Device::cuda_is_available(0)
}

/// Every CUDA half of this file on the emulated driver: whale-tensor's CUDA backend as it is, over
/// whale-kernels' launchers and the host emulation of the kernels.
#[test]
fn the_ops_run_on_the_emulated_driver_in_emulation() {
    emulator::run_gpu_tests_on_the_emulated_driver("the_ops_run_on_the_emulated_driver_in_emulation", &[], &[]);
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &mut Rng::new(seed)).unwrap()
}

/// Positive values (for log, sqrt, rsqrt, powf, div).
fn positive(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, 0.5, 2.0, DType::F32, &mut Rng::new(seed)).unwrap()
}

/// What one device computed: the output and each input's gradient, with their dtypes.
type Computed = (Vec<f32>, Vec<Vec<f32>>, Vec<DType>);

/// `f`'s output and the gradients of `sum(out * r)` for every input, computed on `device`, read
/// back to the host, with the dtypes of the output and of each gradient.
fn run(device: &Device, inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Computed> {
    let vars = inputs.iter().map(|t| Ok(t.to_device(device)?.detach().variable())).collect::<Result<Vec<_>>>()?;
    let out = f(&vars)?;
    assert_eq!(out.device(), *device, "the result stays on the inputs' device");
    let r = randn(out.dims(), 99).to_dtype(out.dtype())?.to_device(device)?;
    out.mul(&r)?.sum_all()?.backward()?;
    let grads = vars
        .iter()
        .map(|v| v.grad().map(|g| g.to_vec_f32()).unwrap_or_else(|| Ok(vec![0.0; v.elem_count()])))
        .collect::<Result<Vec<_>>>()?;
    let dtypes = std::iter::once(out.dtype()).chain(vars.iter().filter_map(|v| v.grad().map(|g| g.dtype()))).collect();
    Ok((out.to_vec_f32()?, grads, dtypes))
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-5 * (1.0 + w.abs()), "{what}[{i}]: CUDA {g} vs CPU {w}");
    }
}

/// The FP8 GEMMs add their block partial sums in another order than the CPU: equal to f32
/// rounding of the largest value (as the kernels' own GPU test checks them).
fn close_to_largest(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let largest = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * largest, "{what}[{i}]: CUDA {g} vs CPU {w} (largest {largest})");
    }
}

/// Runs `f` on the CPU (which must succeed) and, when a GPU is present, on GPU 0, comparing the
/// two.
fn on_every_device(name: &str, inputs: Vec<Tensor>, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
    on_every_device_with(name, inputs, close, f)
}

/// [`on_every_device`] with another comparison of each result.
fn on_every_device_with(
    name: &str,
    inputs: Vec<Tensor>,
    compare: fn(&str, &[f32], &[f32]),
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let (out, grads, dtypes) = run(&Device::Cpu, &inputs, &f).unwrap_or_else(|e| panic!("{name} on the CPU: {e}"));
    if !cuda_available() {
        eprintln!("{name}: CUDA half skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let (gout, ggrads, gdtypes) =
        run(&Device::cuda(0).unwrap(), &inputs, &f).unwrap_or_else(|e| panic!("{name} on CUDA: {e}"));
    assert_eq!(gdtypes, dtypes, "{name}: the dtypes of the output and the gradients");
    compare(&format!("{name} output"), &gout, &out);
    for (i, (g, w)) in ggrads.iter().zip(&grads).enumerate() {
        compare(&format!("{name} grad of input {i}"), g, w);
    }
}

#[test]
fn elementwise_maps() {
    let x = randn(&[7, 33], 1);
    let p = positive(&[7, 33], 2);
    on_every_device("neg", vec![x.clone()], |v| v[0].neg());
    on_every_device("exp", vec![x.clone()], |v| v[0].exp());
    on_every_device("log", vec![p.clone()], |v| v[0].log());
    on_every_device("sqrt", vec![p.clone()], |v| v[0].sqrt());
    on_every_device("rsqrt", vec![p.clone()], |v| v[0].rsqrt());
    on_every_device("sqr", vec![x.clone()], |v| v[0].sqr());
    on_every_device("powf", vec![p.clone()], |v| v[0].powf(1.7));
    on_every_device("sigmoid", vec![x.clone()], |v| v[0].sigmoid());
    on_every_device("tanh", vec![x.clone()], |v| v[0].tanh());
    on_every_device("relu", vec![x.clone()], |v| v[0].relu());
    on_every_device("silu", vec![x.clone()], |v| v[0].silu());
    on_every_device("gelu", vec![x.clone()], |v| v[0].gelu());
    on_every_device("clamp", vec![x.clone()], |v| v[0].clamp(-0.5, 0.7));
    on_every_device("affine", vec![x.clone()], |v| v[0].affine(1.5, -0.25));
    // A strided view goes through the CUDA copy kernel first.
    on_every_device("silu of a transpose", vec![x], |v| v[0].t()?.silu());
}

#[test]
fn broadcasting_binary_ops() {
    let (a, b) = (randn(&[4, 1, 6], 3), randn(&[5, 1], 4));
    let d = positive(&[5, 6], 5);
    on_every_device("add", vec![a.clone(), b.clone()], |v| v[0].add(&v[1]));
    on_every_device("sub", vec![a.clone(), b.clone()], |v| v[0].sub(&v[1]));
    on_every_device("mul", vec![a.clone(), b.clone()], |v| v[0].mul(&v[1]));
    on_every_device("div", vec![a.clone(), d], |v| v[0].div(&v[1]));
    on_every_device("maximum", vec![a.clone(), b.clone()], |v| v[0].maximum(&v[1]));
    on_every_device("ge", vec![a.clone(), b], |v| v[0].ge(&v[1])?.mul(&v[0]));
    on_every_device("add a narrowed view", vec![a], |v| v[0].narrow(2, 1, 4)?.add(&v[0].narrow(2, 2, 4)?));
}

/// [`close`], where a NaN must meet a NaN.
fn close_or_both_nan(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || w.is_infinite() {
            assert!(g.is_nan() == w.is_nan() && (w.is_nan() || g == w), "{what}[{i}]: CUDA {g} vs CPU {w}");
        } else {
            close(what, &[*g], &[*w]);
        }
    }
}

#[test]
fn non_finite_values_as_torch_has_them() {
    let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let (a, b) = (t(vec![nan, 1.0, -2.0, 3.0], &[4]), t(vec![0.0, nan, -1.0, 2.0], &[4]));
    on_every_device_with("maximum with NaN", vec![a, b], close_or_both_nan, |v| v[0].maximum(&v[1]));
    let rows = t(vec![inf, 0.0, inf, nan, -inf, -inf, 1.0, 2.0, nan, -inf, nan, nan], &[6, 2]);
    on_every_device_with("logsumexp of non-finite rows", vec![rows], close_or_both_nan, |v| v[0].logsumexp(1));
    // clamp keeps NaN (as f32::clamp; fmaxf had made it the lower bound), and d(x^0)/dx is 0
    // at 0 too (0 * inf had made it NaN).
    let x = t(vec![nan, -30.0, 0.5, 30.0], &[4]);
    on_every_device_with("clamp with NaN", vec![x], close_or_both_nan, |v| v[0].clamp(-20.0, 20.0));
    on_every_device_with("x^0 at 0", vec![t(vec![0.0, 2.0], &[2])], close_or_both_nan, |v| v[0].powf(0.0));
    // relu keeps NaN (fmaxf and f32::max had made it 0) and passes its gradient, as torch.relu.
    let x = t(vec![nan, -1.0, 0.0, 2.0], &[4]);
    let y = x.relu().unwrap().to_vec_f32().unwrap();
    assert!(y[0].is_nan() && y[1..] == [0.0, 0.0, 2.0], "relu: {y:?}");
    on_every_device_with("relu with NaN", vec![x], close_or_both_nan, |v| v[0].relu());
}

#[test]
fn reductions_and_shapes() {
    let x = randn(&[3, 4, 5], 6);
    on_every_device("sum", vec![x.clone()], |v| v[0].sum(1));
    on_every_device("sum_keepdim", vec![x.clone()], |v| v[0].sum_keepdim(2));
    on_every_device("mean", vec![x.clone()], |v| v[0].mean(0));
    on_every_device("sum_all", vec![x.clone()], |v| v[0].sum_all()?.reshape(&[1]));
    on_every_device("contiguous permute", vec![x.clone()], |v| v[0].permute(&[2, 0, 1])?.contiguous());
    on_every_device("reshape of a transpose", vec![x], |v| v[0].transpose(0, 2)?.reshape(&[20, 3]));
}

#[test]
fn matmuls() {
    let (a, b) = (randn(&[6, 8], 7), randn(&[8, 5], 8));
    on_every_device("matmul", vec![a.clone(), b.clone()], |v| v[0].matmul(&v[1]));
    let w = randn(&[5, 8], 9);
    on_every_device("linear (x wᵀ)", vec![a, w], |v| v[0].matmul(&v[1].t()?));
    let (x, y) = (randn(&[2, 3, 6, 4], 10), randn(&[3, 4, 7], 11));
    on_every_device("batched, broadcast batch", vec![x.clone(), y], |v| v[0].matmul(&v[1]));
    on_every_device("[..., k] @ [k, n]", vec![x, randn(&[4, 9], 12)], |v| v[0].matmul(&v[1]));
}

#[test]
fn fused_nn_ops() {
    let x = randn(&[6, 40], 40);
    on_every_device("softmax", vec![x.clone()], |v| v[0].softmax_last_dim());
    on_every_device("softmax over dim 0", vec![x.clone()], |v| v[0].softmax(0));
    on_every_device("rms_norm", vec![x.clone(), randn(&[40], 41)], |v| v[0].rms_norm(&v[1], 1e-6));
    on_every_device("swiglu", vec![x.clone(), randn(&[6, 40], 42)], |v| Tensor::swiglu(&v[0], &v[1]));
    // Row 2 ignored; the loss is a mean over the other rows.
    let targets = Tensor::from_vec(vec![3i64, 39, -100, 0, 17, 5], &[6], &Device::Cpu).unwrap();
    // Every row ignored: the loss is 0 and so is every gradient (not 0 / 0), on each device.
    let ignored = Tensor::from_vec(vec![-100i64; 6], &[6], &Device::Cpu).unwrap();
    let none = |v: &[Tensor]| v[0].cross_entropy(&ignored, -100)?.reshape(&[1]);
    on_every_device("cross_entropy of ignored rows", vec![x.clone()], none);
    let xv = x.variable();
    let loss = xv.cross_entropy(&ignored, -100).unwrap();
    assert_eq!(loss.to_scalar().unwrap(), 0.0);
    loss.backward().unwrap();
    assert!(xv.grad().unwrap().to_vec_f32().unwrap().iter().all(|&g| g == 0.0));
    on_every_device("cross_entropy", vec![x], |v| v[0].cross_entropy(&targets, -100)?.reshape(&[1]));
    let (cos, sin) = rope_tables(&[0, 1, 2, 5, 9], &rope_inv_freq(8, 10_000.0)).unwrap();
    let q = randn(&[2, 5, 3, 8], 43);
    for layout in [RopeLayout::Interleaved, RopeLayout::HalfRotated] {
        on_every_device("rope", vec![q.clone()], |v| v[0].rope(&cos, &sin, layout));
    }
}

#[test]
fn attention_and_lookups() {
    // Grouped-query heads (4 query heads over 2 KV heads), causal with a longer key sequence.
    let (q, k, v) = (randn(&[2, 4, 5, 16], 50), randn(&[2, 2, 7, 16], 51), randn(&[2, 2, 7, 12], 52));
    on_every_device("attention", vec![q, k, v], |t| {
        Tensor::scaled_dot_product_attention(&t[0], &t[1], &t[2], 0.25, true)
    });
    // Repeated ids: the table's gradient adds their rows up.
    let ids = Tensor::from_vec(vec![3i64, 0, 3, 9, 3, 1], &[2, 3], &Device::Cpu).unwrap();
    on_every_device("embedding", vec![randn(&[10, 6], 53)], |t| t[0].embedding(&ids));
    let rows = Tensor::from_vec(vec![4u32, 4, 0, 2], &[4], &Device::Cpu).unwrap();
    on_every_device("index_select rows", vec![randn(&[5, 3, 2], 54)], |t| t[0].index_select(0, &rows));
    let cols = Tensor::from_vec(vec![2i64, 0, 2], &[3], &Device::Cpu).unwrap();
    on_every_device("index_select, middle dim", vec![randn(&[2, 3, 4], 55)], |t| t[0].index_select(1, &cols));
    on_every_device("index_add, middle dim", vec![randn(&[2, 3, 4], 56), randn(&[2, 3, 4], 57)], |t| {
        t[0].index_add(1, &cols, &t[1])
    });
}

#[test]
fn concatenation_gathers_and_scatters() {
    let (a, b) = (randn(&[2, 3, 4], 60), randn(&[2, 2, 4], 61));
    on_every_device("cat", vec![a.clone(), b], |t| Tensor::cat(&[t[0].clone(), t[1].clone()], 1));
    on_every_device("stack", vec![a.clone(), randn(&[2, 3, 4], 62)], |t| {
        Tensor::stack(&[t[0].clone(), t[1].clone()], 0)
    });
    let idx = Tensor::from_vec(vec![2i64, 0, 3, 3, 1, 0], &[2, 3, 1], &Device::Cpu).unwrap();
    on_every_device("gather", vec![a], |t| t[0].gather(2, &idx));
    let ids = Tensor::from_vec(vec![1i64, 4, 1], &[3], &Device::Cpu).unwrap();
    on_every_device("index_add", vec![randn(&[5, 6], 63), randn(&[3, 6], 64)], |t| t[0].index_add(0, &ids, &t[1]));
    let sizes = [3, 0, 4, 1];
    let ws: Vec<Tensor> = (0..4).map(|e| randn(&[5, 6], 70 + e)).collect();
    let mut inputs = vec![randn(&[8, 6], 65)];
    inputs.extend(ws);
    on_every_device("grouped_matmul", inputs, |t| Tensor::grouped_matmul(&t[0], &sizes, &t[1..]));
}

#[test]
fn moe_token_permutation() {
    // 40 tokens, top-3 of 8 experts, with the weighted combine of expert-like outputs.
    let assignments: Vec<(usize, usize)> =
        (0..40).flat_map(|t| (0..3).map(move |j| (t, (t * 5 + j * 3) % 8))).collect();
    let d = TokenDispatch::new(&assignments, 40, 8).unwrap();
    let (x, w, scale) = (randn(&[40, 24], 40), randn(&[120], 41), randn(&[120, 24], 42));
    on_every_device("moe permute and combine", vec![x, w, scale], |v| {
        let y = v[0].moe_permute(&d)?.mul(&v[2])?.tanh()?;
        y.moe_unpermute(&v[1], &d)
    });
}

#[test]
fn adamw_updates_on_the_gpu_as_on_the_cpu() {
    use whale_tensor::optim::{AdamW, AdamWConfig};
    use whale_tensor::ParamStore;
    const LR: f32 = 0.01;
    // Three steps, then the moments saved and restored into a fresh optimizer for a fourth:
    // the weights and the saved moments.
    /// The weights after training, and the moments saved after three steps.
    type Trained = (Vec<Vec<f32>>, Vec<(String, Tensor)>);
    let train = |device: &Device, moment_dtype: DType| -> Result<Trained> {
        let mut params = ParamStore::new();
        let w = params.insert("w", &randn(&[6, 5], 80).to_device(device)?)?;
        let b = params.insert("b", &randn(&[5], 81).to_device(device)?)?;
        let config = AdamWConfig { moment_dtype, ..AdamWConfig::default() };
        let mut opt = AdamW::new(config)?;
        let step = |opt: &mut AdamW, s: u64| -> Result<()> {
            let x = randn(&[4, 6], 90 + s).to_device(device)?;
            x.matmul(&w)?.add(&b)?.sqr()?.mean_all()?.backward()?;
            opt.step(&params, LR)?;
            w.zero_grad();
            b.zero_grad();
            Ok(())
        };
        for s in 0..3 {
            step(&mut opt, s)?;
        }
        // The moments; each parameter's update count is checked here, on both devices.
        let (saved, counts): (Vec<_>, Vec<_>) =
            opt.state_tensors()?.into_iter().partition(|(n, _)| !n.ends_with(".step"));
        assert!(counts.len() == 2 && counts.iter().all(|(_, t)| t.to_vec_i64().unwrap() == [3]), "{counts:?}");
        let mut resumed = AdamW::new(config)?;
        resumed.load_state(opt.steps(), &saved.iter().chain(&counts).cloned().collect(), &params)?;
        step(&mut resumed, 3)?;
        // A small in-place write goes through the host on a GPU.
        b.with_f32_mut(|v| v[0] += 1.0)?;
        Ok((vec![w.to_vec_f32()?, b.to_vec_f32()?], saved))
    };
    for moment_dtype in [DType::F32, DType::BF16] {
        let (want, want_state) = train(&Device::Cpu, moment_dtype).unwrap();
        assert!(want_state.iter().all(|(_, t)| t.dtype() == moment_dtype), "moments saved in {moment_dtype:?}");
        if !cuda_available() {
            eprintln!("adamw_updates_on_the_gpu_as_on_the_cpu ({moment_dtype:?} moments): CUDA half skipped, no CUDA driver or GPU on this machine");
            continue;
        }
        let (got, got_state) = train(&Device::cuda(0).unwrap(), moment_dtype).unwrap();
        assert!(got_state.iter().all(|(_, t)| t.dtype() == moment_dtype && t.device() == Device::Cpu));
        if moment_dtype == DType::F32 {
            for (g, w) in got.iter().zip(&want) {
                close("AdamW", g, w);
            }
            continue;
        }
        // bf16 moments: where the devices' f32 moments differ in their last bits, a rounding can
        // land one bf16 step apart (2^-8 of m, 2^-9 of v's square root), which moves that step's
        // update by at most lr * 2^-7; four steps bound the weights' drift by 4 * lr * 2^-7.
        for (g, w) in got.iter().zip(&want) {
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= 4.0 * LR / 128.0 + 2e-5 * b.abs(), "AdamW bf16 moments [{i}]: {a} vs {b}");
            }
        }
        for ((name, g), (_, w)) in got_state.iter().zip(&want_state) {
            close_bf16(&format!("moment {name}"), &g.to_vec_f32().unwrap(), &w.to_vec_f32().unwrap());
        }
    }
}

#[test]
fn gradient_norm_and_clipping_on_the_gpu_as_on_the_cpu() {
    use whale_tensor::optim::{clip_grad_norm, grad_norm};
    use whale_tensor::ParamStore;
    /// The norm, clipping to half of it, and the clipped gradients.
    type Clipped = (f64, Vec<Vec<f32>>);
    let run = |device: &Device| -> Result<Clipped> {
        let mut params = ParamStore::new();
        let w = params.insert("w", &randn(&[6, 5], 80).to_device(device)?)?;
        let b = params.insert("b", &randn(&[5], 81).to_device(device)?)?;
        params.insert("unused", &randn(&[3], 82).to_device(device)?)?;
        randn(&[4, 6], 90).to_device(device)?.matmul(&w)?.add(&b)?.sqr()?.sum_all()?.backward()?;
        let norm = grad_norm(&params)?;
        assert_eq!(clip_grad_norm(&params, 0.5 * norm)?, norm, "clipping returns the norm before it");
        Ok((norm, vec![w.grad().expect("w").to_vec_f32()?, b.grad().expect("b").to_vec_f32()?]))
    };
    let (norm, grads) = run(&Device::Cpu).unwrap();
    let clipped = grads.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    assert!((clipped - 0.5 * norm).abs() <= 1e-5 * norm, "clipped to half: {clipped} of {norm}");
    if !cuda_available() {
        eprintln!("gradient_norm_and_clipping_on_the_gpu_as_on_the_cpu: CUDA half skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let (gpu_norm, gpu_grads) = run(&Device::cuda(0).unwrap()).unwrap();
    // Squares and sums in f32 on the GPU against f64 on the CPU: f32 rounding of the norm.
    assert!((gpu_norm - norm).abs() <= 1e-5 * norm, "norm: GPU {gpu_norm} vs CPU {norm}");
    for (g, c) in gpu_grads.iter().zip(&grads) {
        close("clipped gradient", g, c);
    }
}

#[test]
fn selections_and_max_reductions() {
    let x = randn(&[5, 7], 100);
    on_every_device("log_softmax", vec![x.clone()], |v| v[0].log_softmax_last_dim());
    on_every_device("logsumexp", vec![x.clone()], |v| v[0].logsumexp(0));
    on_every_device("max", vec![x.clone()], |v| v[0].max(1));
    on_every_device("topk values", vec![x.clone()], |v| Ok(v[0].topk(3)?.0));
    let cond = Tensor::from_vec(vec![1.0f32, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], &[7], &Device::Cpu).unwrap();
    on_every_device("where_cond", vec![x.clone(), randn(&[5, 1], 101)], |v| cond.where_cond(&v[0], &v[1]));
    on_every_device("masked_fill", vec![x.clone()], |v| v[0].masked_fill(&cond, -3.0));
    // A condition of integers, as the CPU takes it (a GPU holds float data: it goes up as f32).
    let icond = Tensor::from_vec(vec![1i64, 0, 2, 1, 0, 0, -1], &[7], &Device::Cpu).unwrap();
    on_every_device("masked_fill, i64 mask", vec![x.clone()], |v| v[0].masked_fill(&icond, -3.0));
    let idx = Tensor::from_vec(vec![0i64, 2, 2, 4, 1, 0, 3, 3, 2, 1], &[2, 5], &Device::Cpu).unwrap();
    on_every_device("scatter_add", vec![x.clone(), randn(&[2, 5], 102)], |v| {
        v[0].narrow(0, 0, 5)?.narrow(1, 0, 5)?.contiguous()?.scatter_add(0, &idx, &v[1])
    });
    // The same seed drops the same elements on both devices.
    on_every_device("dropout", vec![x.clone()], |v| v[0].dropout(0.3, &mut Rng::new(7)));
    // Index tensors are host data on every device, and argmax agrees exactly.
    let cpu = x.argmax(1).unwrap();
    if cuda_available() {
        let gpu = x.to_device(&Device::cuda(0).unwrap()).unwrap().argmax(1).unwrap();
        assert_eq!(gpu.device(), Device::Cpu);
        assert_eq!(gpu.to_vec_i64().unwrap(), cpu.to_vec_i64().unwrap());
    }
}

/// `to_device` is differentiable both ways: a CPU leaf used on the GPU and a GPU leaf used on the
/// CPU each get their gradient on their own device and in their own dtype, with the values of the
/// same chain run on the CPU alone.
#[test]
fn gradients_flow_back_across_devices() {
    // a is used on `there` (squared), comes back and meets b on the CPU: d/da = 2ab, d/db = a².
    // Each leaf's gradient, read back to the host.
    let grads = |a: &Tensor, b: &Tensor, there: &Device| -> Result<(Tensor, Tensor)> {
        let (a, b) = (a.clone().variable(), b.to_device(there)?.detach().variable());
        let prod = a.to_device(there)?.sqr()?.to_device(&Device::Cpu)?.mul(&b.to_device(&Device::Cpu)?)?;
        prod.sum_all()?.backward()?;
        Ok((a.grad().expect("a's gradient"), b.grad().expect("b's gradient")))
    };
    let (a, b) = (randn(&[3, 4], 110), randn(&[3, 4], 111));
    let (da, db) = grads(&a, &b, &Device::Cpu).unwrap();
    let (av, bv) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
    close("CPU d/da", &da.to_vec_f32().unwrap(), &av.iter().zip(&bv).map(|(x, y)| 2.0 * x * y).collect::<Vec<_>>());
    close("CPU d/db", &db.to_vec_f32().unwrap(), &av.iter().map(|x| x * x).collect::<Vec<_>>());
    if !cuda_available() {
        eprintln!("gradients_flow_back_across_devices: CUDA half skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let gpu = Device::cuda(0).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let (a, b) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
        let (want_a, want_b) = grads(&a, &b, &Device::Cpu).unwrap();
        let (da, db) = grads(&a, &b, &gpu).unwrap();
        assert_eq!((da.device(), db.device()), (Device::Cpu, gpu), "{dtype:?}: each gradient on its leaf's device");
        assert_eq!((da.dtype(), db.dtype()), (dtype, dtype), "{dtype:?}: each gradient in its leaf's dtype");
        let check = if dtype == DType::F32 { close } else { close_bf16 };
        check(&format!("{dtype:?} d/da"), &da.to_vec_f32().unwrap(), &want_a.to_vec_f32().unwrap());
        check(&format!("{dtype:?} d/db"), &db.to_vec_f32().unwrap(), &want_b.to_vec_f32().unwrap());
    }
}

#[test]
fn a_small_mlp_trains_the_same_on_both_devices() {
    // A whole forward and backward through composed ops: x -> silu(x W1ᵀ + b1) W2ᵀ, squared error.
    let inputs =
        [randn(&[16, 12], 20), randn(&[24, 12], 21), randn(&[24], 22), randn(&[3, 24], 23), randn(&[16, 3], 24)];
    on_every_device("mlp loss", inputs.to_vec(), |v| {
        let h = v[0].matmul(&v[1].t()?)?.add(&v[2])?.silu()?;
        let y = h.matmul(&v[3].t()?)?;
        y.sub(&v[4])?.sqr()?.mean_all()?.reshape(&[1])
    });
}

/// bf16 results: each op rounds its f32 result to bf16 on both devices, and where the two f32
/// values differ in their last bits the rounding can land one bf16 step apart (2^-7 of the value
/// at most), which the next op carries on: within 2^-6 of the value, plus 1e-3 of the largest
/// for values that cancel towards zero.
fn close_bf16(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let largest = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= w.abs() / 64.0 + 1e-3 * largest,
            "{what}[{i}]: CUDA {g} vs CPU {w} (largest {largest})"
        );
    }
}

fn bf16(t: Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap()
}

#[test]
fn bf16_tensors_compute_on_the_gpu_as_on_the_cpu() {
    let (x, y) = (bf16(randn(&[6, 40], 60)), bf16(randn(&[6, 40], 61)));
    let w = bf16(randn(&[24, 40], 62).mul_scalar(0.2).unwrap());
    on_every_device_with("bf16 maps and broadcasting", vec![x.clone(), y.clone()], close_bf16, |v| {
        v[0].silu()?.mul(&v[1])?.add(&v[1].sum_keepdim(0)?)?.tanh()
    });
    on_every_device_with("bf16 dropout", vec![x.clone()], close_bf16, |v| v[0].dropout(0.3, &mut Rng::new(7)));
    // cuBLAS's bf16 GEMM (tensor cores) against the CPU's f32 GEMM of the same bf16 values.
    on_every_device_with("bf16 linear", vec![x.clone(), w.clone()], close_bf16, |v| v[0].matmul(&v[1].t()?));
    let norm_w = bf16(positive(&[40], 63));
    on_every_device_with("bf16 rms_norm and softmax", vec![x.clone(), norm_w], close_bf16, |v| {
        v[0].rms_norm(&v[1], 1e-6)?.softmax(1)
    });
    // The model's casts: f32 master weights used in bf16, the gradient arriving back in f32.
    let master = randn(&[24, 40], 64).mul_scalar(0.2).unwrap();
    on_every_device_with("f32 master through bf16", vec![x, master], close_bf16, |v| {
        v[0].matmul(&v[1].to_dtype(DType::BF16)?.t()?)?.to_dtype(DType::F32)
    });
}

#[test]
fn fp8_linear_trains_on_the_gpu_as_on_the_cpu() {
    // 66 tokens, K = 256 (two tiles), N = 160 (a partial weight block); Fprop, Dgrad and Wgrad.
    let (x, w) = (randn(&[2, 33, 256], 50), randn(&[160, 256], 51).mul_scalar(0.1).unwrap());
    let recipe = Fp8Recipe::F32_ACCUMULATION;
    on_every_device_with("fp8 linear", vec![x.clone(), w.clone()], close_to_largest, |v| {
        v[0].fp8_linear(&v[1], &recipe)
    });
    // 64 tokens: Wgrad (K = tokens) on the tensor-core kernel too.
    on_every_device_with("fp8 linear, 64 tokens", vec![randn(&[64, 256], 53), w.clone()], close_to_largest, |v| {
        v[0].fp8_linear(&v[1], &recipe)
    });
    // DeepSeek-V3's recipe proper: bf16 activations into the FP8 GEMMs, an f32 master weight.
    on_every_device_with("fp8 linear, bf16 activations", vec![bf16(x.clone()), w.clone()], close_bf16, |v| {
        v[0].fp8_linear(&v[1], &recipe)
    });
    // A weight stored in FP8 (as a DeepSeek-V3 checkpoint holds it): frozen, gradient to x only,
    // with its codes on the host or on the GPU.
    let (codes, scales) = w.quantize_fp8((128, 128), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    on_every_device_with("fp8 linear, stored weight", vec![x.clone()], close_to_largest, |v| {
        v[0].fp8_linear_quantized(&codes, &scales, &recipe)
    });
    // The MoE expert MLP with its SwiGLU inputs cached in FP8: the backward decodes them on the
    // GPU and runs the FP8 linear layers' backward GEMMs without their forward.
    let (wg, wu, wd) =
        (w.clone(), randn(&[160, 256], 54).mul_scalar(0.1).unwrap(), randn(&[256, 160], 55).mul_scalar(0.1).unwrap());
    on_every_device_with("fp8 swiglu mlp, cached inputs", vec![x.clone(), wg, wu, wd], close_to_largest, |v| {
        Tensor::fp8_swiglu_mlp((&v[0], &v[0]), [&v[1], &v[2], &v[3]], [recipe; 3])
    });
    // Power-of-two scales: V3.1's (every operand) and those of experts reading an FP8 dispatch
    // (their inputs only).
    let ue8m0 = Fp8Recipe { scale_format: ScaleFormat::Ue8m0, input_scales: ScaleFormat::Ue8m0, ..recipe };
    let dispatched = Fp8Recipe { input_scales: ScaleFormat::Ue8m0, ..recipe };
    for (name, r) in [("fp8 linear, UE8M0 scales", ue8m0), ("fp8 linear, UE8M0 input scales", dispatched)] {
        on_every_device_with(name, vec![x.clone(), w.clone()], close_to_largest, |v| v[0].fp8_linear(&v[1], &r));
    }
    if !cuda_available() {
        return;
    }
    let gpu = Device::cuda(0).unwrap();
    let (gc, gs) = (codes.to_device(&gpu).unwrap(), scales.to_device(&gpu).unwrap());
    assert_eq!(gc.dtype(), DType::F8E4M3, "FP8 codes keep their dtype on the GPU");
    let xg = x.to_device(&gpu).unwrap();
    let on_gpu = xg.fp8_linear_quantized(&gc, &gs, &recipe).unwrap().to_vec_f32().unwrap();
    let from_host = xg.fp8_linear_quantized(&codes, &scales, &recipe).unwrap().to_vec_f32().unwrap();
    assert_eq!(on_gpu, from_host, "codes on the GPU or the host: the same product");
    // Codes one byte into their buffer (a view of a flat buffer): the tensor-core kernels load
    // 16 bytes at a time from aligned addresses, so such a view is copied first (the emulated
    // wgmma kernel's cp.async refused it before). The same product on every kernel.
    let mut flat = vec![0u8];
    flat.extend(codes.fp8_codes().unwrap());
    let shifted = Tensor::from_fp8_codes(flat, &[1 + 160 * 256], Fp8Format::E4M3).unwrap().to_device(&gpu).unwrap();
    let shifted = shifted.narrow(0, 1, 160 * 256).unwrap().reshape(&[160, 256]).unwrap();
    let g = gpu.gpu().unwrap();
    let preferred = g.preferred_fp8_gemm_kernel();
    for kernel in [Fp8GemmKernel::Wgmma, Fp8GemmKernel::TensorCore, Fp8GemmKernel::Simple] {
        if !g.runs_fp8_gemm(kernel, 256) {
            continue;
        }
        g.set_fp8_gemm_kernel(kernel);
        let y = xg.fp8_linear_quantized(&shifted, &gs, &recipe).and_then(|y| y.to_vec_f32());
        let aligned = xg.fp8_linear_quantized(&gc, &gs, &recipe).and_then(|y| y.to_vec_f32());
        g.set_fp8_gemm_kernel(preferred);
        assert_eq!(y.unwrap(), aligned.unwrap(), "{kernel:?}: codes at an odd offset");
    }
}

#[test]
fn fp8_quantisation_on_the_gpu_gives_the_cpus_codes() {
    if !cuda_available() {
        eprintln!("fp8_quantisation_on_the_gpu_gives_the_cpus_codes: skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let gpu = Device::cuda(0).unwrap();
    let x = randn(&[130, 300], 52);
    for (block, sf) in [(1, 128), (128, 128)].into_iter().flat_map(|b| [(b, ScaleFormat::F32), (b, ScaleFormat::Ue8m0)])
    {
        let (codes, scales) = x.quantize_fp8(block, Fp8Format::E4M3, sf).unwrap();
        let (gc, gs) = x.to_device(&gpu).unwrap().quantize_fp8(block, Fp8Format::E4M3, sf).unwrap();
        assert_eq!((gc.device(), gc.dtype()), (gpu, DType::F8E4M3));
        assert_eq!(gc.fp8_codes().unwrap(), codes.fp8_codes().unwrap(), "{block:?} codes, {sf:?} scales");
        assert_eq!(gs.to_vec_f32().unwrap(), scales.to_vec_f32().unwrap(), "{block:?} {sf:?} scales");
        let back = Tensor::dequantize_fp8(&gc, &gs, block).unwrap();
        assert_eq!(back.device(), gpu);
        let want = Tensor::dequantize_fp8(&codes, &scales, block).unwrap();
        assert_eq!(back.to_vec_f32().unwrap(), want.to_vec_f32().unwrap(), "{block:?} {sf:?} dequantised");
        assert_eq!(gc.to_device(&Device::Cpu).unwrap().fp8_codes().unwrap(), codes.fp8_codes().unwrap());
        let copy = gc.deep_clone().unwrap();
        assert_eq!((copy.device(), copy.fp8_codes().unwrap()), (gpu, codes.fp8_codes().unwrap()), "a deep clone");
    }
    let err = x.to_device(&gpu).unwrap().quantize_fp8((1, 128), Fp8Format::E5M2, ScaleFormat::F32).unwrap_err();
    assert!(err.to_string().contains("E4M3"), "{err}");
    let (gc, _) = x.to_device(&gpu).unwrap().quantize_fp8((1, 128), Fp8Format::E4M3, ScaleFormat::F32).unwrap();
    let err = gc.exp().unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { .. }), "FP8 codes on a GPU feed only the FP8 ops: {err}");
}

/// The same bits.
fn exact(what: &str, got: &[f32], want: &[f32]) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got), bits(want), "{what}");
}

#[test]
fn fp8_dispatch_rounding_on_the_gpu_as_on_the_cpu() {
    // Rank 3, a partial tile (300 = 2 x 128 + 44), f32 and bf16 tokens: the rounding of the
    // tokens (the gradient straight through), and of a gradient far below the activations' floor.
    let x = randn(&[2, 5, 300], 70);
    for (name, t) in [("f32", x.clone()), ("bf16", bf16(x.clone()))] {
        on_every_device_with(&format!("fp8_comm_round, {name}"), vec![t.clone()], exact, |v| v[0].fp8_comm_round());
        on_every_device_with(&format!("fp8_comm_round_grad, {name}"), vec![t], exact, |v| {
            v[0].fp8_comm_round_grad()?.mul_scalar(1e-9)
        });
    }
}

#[test]
fn ops_without_a_cuda_kernel_say_so() {
    if !cuda_available() {
        eprintln!("ops_without_a_cuda_kernel_say_so: skipped, no CUDA driver or GPU on this machine");
        return;
    }
    let x = randn(&[4, 8], 30).to_device(&Device::cuda(0).unwrap()).unwrap();
    let err = x.to_dtype(DType::F16).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDType { .. }), "f16 stays on the host: {err}");
    let bf16 = x.to_dtype(DType::BF16).unwrap();
    assert_eq!((bf16.dtype(), bf16.device()), (DType::BF16, x.device()));
    let want = randn(&[4, 8], 30).to_dtype(DType::BF16).unwrap();
    assert_eq!(bf16.to_vec_f32().unwrap(), want.to_vec_f32().unwrap(), "bf16 rounding on the GPU and on the host");
    let back = x.to_device(&Device::Cpu).unwrap();
    assert_eq!(back.to_vec_f32().unwrap(), randn(&[4, 8], 30).to_vec_f32().unwrap(), "to_device both ways is exact");
    // Views of part of a GPU buffer are packed there before they cross: the view's values.
    let host = randn(&[4, 8], 30);
    for (name, view, want) in [
        ("a row range", x.narrow(0, 1, 2).unwrap(), host.narrow(0, 1, 2).unwrap()),
        ("a transposed slice", x.t().unwrap().narrow(0, 3, 2).unwrap(), host.t().unwrap().narrow(0, 3, 2).unwrap()),
        ("a bf16 column", bf16.narrow(1, 5, 1).unwrap(), want.narrow(1, 5, 1).unwrap()),
        ("nothing", x.narrow(1, 8, 0).unwrap(), host.narrow(1, 8, 0).unwrap()),
    ] {
        assert_eq!(view.to_vec_f32().unwrap(), want.to_vec_f32().unwrap(), "{name}");
    }
    // A shape a kernel refuses (a strided copy of rank 7) is an invalid argument, not a GPU that
    // is unavailable (it works on).
    let deep = randn(&[2, 1, 2, 1, 2, 1, 2], 31).to_device(&x.device()).unwrap().transpose(0, 6).unwrap();
    let err = deep.contiguous().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // Read back all the same (gathered on the host, as such views always were).
    let deep_host = randn(&[2, 1, 2, 1, 2, 1, 2], 31).transpose(0, 6).unwrap();
    assert_eq!(deep.to_vec_f32().unwrap(), deep_host.to_vec_f32().unwrap());
    assert_eq!(x.sum_all().unwrap().device(), x.device());
}

#[test]
fn a_window_is_written_in_place_on_every_device() {
    // Positions 1..3 of dim 2 of a [2, 3, 5, 4] buffer from a view (a transposed [2, 3, 4, 2]),
    // in f32 and in bf16 (a bf16 model's cache, written as its bits).
    let (dst, src) = (randn(&[2, 3, 5, 4], 80), randn(&[2, 3, 4, 2], 81));
    let mut devices = vec![Device::Cpu];
    if cuda_available() {
        devices.push(Device::cuda(0).unwrap());
    } else {
        eprintln!("write_window: CUDA half skipped, no CUDA driver or GPU on this machine");
    }
    for device in devices {
        for dtype in [DType::F32, DType::BF16] {
            let on = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&device).unwrap().deep_clone().unwrap();
            let (dst, src) = (on(&dst), on(&src).transpose(2, 3).unwrap());
            let (d, s) = (dst.to_vec_f32().unwrap(), src.to_vec_f32().unwrap());
            let mut want = d.clone();
            for bh in 0..6 {
                want[bh * 20 + 4..][..8].copy_from_slice(&s[bh * 8..][..8]);
            }
            let view = dst.narrow(2, 0, 3).unwrap();
            dst.write_window(2, 1, &src).unwrap();
            assert_eq!(dst.to_vec_f32().unwrap(), want, "{device:?} {dtype:?}: only the window changes, to src");
            assert_eq!(
                view.to_vec_f32().unwrap(),
                dst.narrow(2, 0, 3).unwrap().to_vec_f32().unwrap(),
                "{device:?} {dtype:?}: in place"
            );
            // A source that is a window of the destination itself: positions 1..3 move to 0..2.
            dst.write_window(2, 0, &dst.narrow(2, 1, 2).unwrap()).unwrap();
            for bh in 0..6 {
                want.copy_within(bh * 20 + 4..bh * 20 + 12, bh * 20);
            }
            assert_eq!(dst.to_vec_f32().unwrap(), want, "{device:?} {dtype:?}: from its own storage");
            // Refused: past the end, another shape, another dtype, a strided destination.
            assert!(dst.write_window(2, 4, &src).is_err(), "{device:?} {dtype:?}: 4..6 of 5");
            assert!(dst.write_window(1, 0, &src).is_err(), "{device:?} {dtype:?}: shape");
            let other = if dtype == DType::F32 { DType::BF16 } else { DType::F32 };
            assert!(dst.write_window(2, 0, &src.to_dtype(other).unwrap()).is_err(), "{device:?} {dtype:?}: dtype");
            assert!(dst.transpose(0, 1).unwrap().write_window(2, 0, &src.transpose(0, 1).unwrap()).is_err());
        }
    }
    // A contiguous destination whose dimension of one element carries an odd stride (a
    // transposed [2, 5, 1, 4]: strides [20, 4, 4, 1]) is written by its dims, not that stride.
    let odd = randn(&[2, 5, 1, 4], 82).transpose(1, 2).unwrap();
    assert!(odd.is_contiguous());
    let part = randn(&[2, 1, 2, 4], 83);
    let mut expected = odd.to_vec_f32().unwrap();
    for (b, chunk) in part.to_vec_f32().unwrap().chunks(8).enumerate() {
        expected[b * 20 + 4..][..8].copy_from_slice(chunk);
    }
    odd.write_window(2, 1, &part).unwrap();
    assert_eq!(odd.to_vec_f32().unwrap(), expected);
}
