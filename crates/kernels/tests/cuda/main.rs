//! The CUDA kernels: the embedded PTX is current (checked on every machine, no nvcc needed), and
//! on a machine with a GPU every kernel, through its launcher in crates/kernels/src/cuda, agrees
//! with its CPU twin (this file; the training path's kernels in train.rs). Without a GPU those
//! tests print that they were skipped and why, and run in CI on the emulated driver instead
//! (`the_gpu_tests_pass_on_the_emulated_driver_in_emulation`).

mod attention;
#[path = "../common/mod.rs"]
mod common;
mod train;

use common::{assert_close, gpu, run_gpu_tests_on_the_emulated_driver, values};
use std::path::Path;

use half::bf16;

use whale_kernels::cpu::adamw::{adamw_step, AdamWStep};
use whale_kernels::cpu::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
use whale_kernels::cpu::dispatch::{permute, unpermute, unpermute_weight_grad, DispatchPlan};
use whale_kernels::cpu::embedding::{embedding_backward, embedding_forward};
use whale_kernels::cpu::fp8::{transpose, Fp8Blocks, Fp8Format, ScaleFormat, GRADIENT_MIN_AMAX, MIN_AMAX};
use whale_kernels::cpu::fp8_gemm::{fp8_gemm, Accumulation};
use whale_kernels::cpu::matmul::{matmul_reference, MatRef};
use whale_kernels::cpu::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use whale_kernels::cpu::rope::{rope_half, rope_interleaved};
use whale_kernels::cpu::softmax::{log_softmax_backward, log_softmax_forward, softmax_backward, softmax_forward};
use whale_kernels::cpu::swiglu::{swiglu_backward, swiglu_forward};
use whale_kernels::cuda::cudarc;
use whale_kernels::cuda::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use whale_kernels::cuda::cudarc::nvrtc::Ptx;
use whale_kernels::cuda::{
    manifest, source_hash, BinaryOp, Fp8GemmKernel, Fp8View, GemmShape, Gpu, MidReduction, Strided, UnaryOp,
    WGMMA_SHARED_BYTES,
};

#[test]
fn the_embedded_ptx_was_built_from_the_current_sources() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
    let hash = source_hash(&dir).unwrap();
    assert_eq!(
        hash,
        manifest::SOURCE_HASH,
        "kernels/*.cu changed since the PTX was generated: run `cargo xtask build-kernels`"
    );
    assert!(!manifest::MODULES.is_empty());
    for m in manifest::MODULES {
        let hopper = if m.sm_90a { "sm_90a" } else { "sm_90" };
        let ada = m.sm_89.map(|ptx| ("sm_89", ptx));
        for (arch, ptx) in [(hopper, m.sm_90), ("sm_80", m.sm_80)].into_iter().chain(ada) {
            assert!(ptx.contains(&format!(".target {arch}\n")), "{}: {arch} PTX has the wrong target", m.name);
            for k in m.kernels {
                assert!(ptx.contains(&format!(".entry {k}(")), "{}: {k} is missing from its {arch} PTX", m.name);
            }
        }
    }
}

/// Ada (sm_89) runs the FP8 GEMM on its tensor cores: the module of the `mma.sync` kernel has
/// an sm_89 build, in which the kernel is the real one (in the sm_80 build its body traps).
#[test]
fn ada_gpus_get_the_fp8_tensor_core_gemm() {
    let module = manifest::MODULES.iter().find(|m| m.kernels.contains(&"fp8_gemm_mma")).unwrap();
    let ada = module.sm_89.expect("an sm_89 build of the FP8 mma GEMM");
    // The E4M3 mma exists from sm_89 (PTX ISA: mma.sync ... .e4m3); sm_80's build has none.
    assert!(ada.contains("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32"), "FP8 mma in the sm_89 PTX");
    assert!(!module.sm_80.contains(".e4m3.e4m3"), "no FP8 mma in the sm_80 PTX");
    assert!(Fp8GemmKernel::TensorCore.runs_on((8, 9), 128));
    // Only that module is built for sm_89: the others' sm_80 PTX serves Ada.
    let with_ada: Vec<&str> = manifest::MODULES.iter().filter(|m| m.sm_89.is_some()).map(|m| m.name).collect();
    assert_eq!(with_ada, [module.name]);
}

/// AdamW promises the CPU twin's bits, so nvcc must not fuse the decayed weight and the update
/// into one FMA (by default it did: one rounding where torch and the CPU round twice). The
/// emulated driver, built without contraction, cannot see that; the PTX can: no FMA adds a
/// quotient (the update `step * m / denom`), and an add.rn does.
#[test]
fn the_adamw_ptx_adds_the_update_with_its_own_rounding() {
    let adamw = manifest::MODULES.iter().find(|m| m.name == "adamw").unwrap();
    for ptx in [adamw.sm_90, adamw.sm_80] {
        let mut quotients = std::collections::HashSet::new();
        let mut rounded_adds = 0;
        for line in ptx.lines() {
            let words: Vec<&str> =
                line.split(|c: char| c.is_whitespace() || c == ',' || c == ';').filter(|w| !w.is_empty()).collect();
            match words.as_slice() {
                ["div.rn.f32", dst, ..] => {
                    quotients.insert(dst.to_string());
                }
                ["fma.rn.f32", _, _, _, addend] => assert!(!quotients.contains(*addend), "contracted: {line}"),
                ["add.rn.f32", _, a, b] => rounded_adds += [a, b].iter().any(|r| quotients.contains(**r)) as usize,
                _ => {}
            }
        }
        assert!(rounded_adds >= 2, "each AdamW kernel adds its update with add.rn.f32");
    }
}

/// Every kernel of the manifest has a launcher: its name appears in crates/kernels/src/cuda.
#[test]
fn every_kernel_has_a_launcher() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda");
    let launchers: String = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs") && !p.ends_with("manifest.rs"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for m in manifest::MODULES {
        for k in m.kernels {
            assert!(
                launchers.contains(&format!("\"{k}\"")),
                "{}: kernel {k} has no launcher in {}",
                m.name,
                dir.display()
            );
        }
    }
}

/// Every GPU test of this binary, on the emulated driver (kernels/emulate/driver.cpp): the
/// launchers of crates/kernels/src/cuda as they are (their launch shapes, argument lists and
/// buffer handling), cudarc and all, over the host emulation of the kernels. Each runs in a child
/// process, which loads the driver in place of a GPU's. Between them they launch every kernel of
/// the manifest.
#[test]
fn the_gpu_tests_pass_on_the_emulated_driver_in_emulation() {
    // Left out: the large attention shapes (minutes of fibers);
    // `attention_kernels_match_the_cpu_on_small_shapes` runs every attention kernel instead, and
    // tests/emulate.rs holds the tiled ones to double-precision references on larger shapes.
    let skip = ["attention_forward_matches", "attention_backward_matches"];
    let test = "the_gpu_tests_pass_on_the_emulated_driver_in_emulation";
    let Some(launched) = run_gpu_tests_on_the_emulated_driver(test, &[], &skip) else { return };
    let missing: Vec<&str> =
        manifest::MODULES.iter().flat_map(|m| m.kernels).copied().filter(|k| !launched.contains(*k)).collect();
    assert!(missing.is_empty(), "{test}: no GPU test launched {missing:?}");

    // Again, for the kernels that stage operands with cp.async (tiled attention, the wgmma
    // GEMM), with copies landing as soon as they are issued: a stage refilled before every thread
    // has read it (a write-after-read race) shows.
    let eager = [("WHALE_EMULATED_EAGER_COPIES", "1")];
    let only = ["attention::", "the_wgmma_fp8_gemm"];
    common::emulator::run_gpu_tests_on_the_emulated_driver_with(test, &only, &skip, &eager);
}

/// The emulated driver's own guarantees (kernels/emulate/driver.cpp), which the other tests rely
/// on to catch a launcher's mistakes: a kernel running past a buffer fails its launch, naming the
/// thread and block; a pointer argument into no allocation (a freed one), a copy past an
/// allocation, a grid taller than the hardware's and more than 48 KB of shared memory without
/// the function's leave are refused, as a GPU's driver refuses the last two; the GPU works on
/// after each. Runs only on the emulated driver.
#[test]
fn the_emulated_driver_catches_overruns_and_stray_pointers() {
    let test = "the_emulated_driver_catches_overruns_and_stray_pointers";
    if !common::on_the_emulated_driver() {
        // Not a GPU test: on a GPU there is nothing for it to check (gpu-check.sh leaves it out).
        eprintln!("{test}: runs only on the emulated driver (the_gpu_tests_pass_on_the_emulated_driver_in_emulation)");
        return;
    }
    let Some(g) = gpu(test) else { return };
    let last_error = || common::emulator::emulated_driver_last_error().expect("the emulated driver");
    let elementwise = manifest::MODULES.iter().find(|m| m.name == "elementwise").expect("elementwise.cu");
    let add = g.ctx.load_module(Ptx::from_src(elementwise.sm_90)).unwrap().load_function("add_f32").unwrap();
    let cfg = LaunchConfig { grid_dim: (4, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (a, b, n) = (up(&g, &[1.0f32; 1000]), up(&g, &[2.0f32; 1000]), 1000u32);

    // 996 floats end on a 16-byte boundary, against the guard page (allocations are rounded up to
    // 16 bytes, so an overrun of less than that goes unseen).
    let mut short = uninit(&g, 996);
    let mut l = g.stream.launch_builder(&add);
    l.arg(&a).arg(&b).arg(&mut short).arg(&n);
    // SAFETY: the overrun faults inside the emulation, which turns it into the launch's error.
    assert!(unsafe { l.launch(cfg) }.is_err(), "an overrun is a failed launch");
    let err = last_error();
    assert!(err.contains("segmentation fault") && err.contains("of block (3, 0, 0)"), "{err}");
    assert!(down(&g, &short).iter().all(|&v| v == 3.0), "the elements that exist are written");

    // A freed buffer, passed by its address.
    let mut out = uninit(&g, 1000);
    let freed = uninit(&g, 1000).device_ptr(&g.stream).0;
    let mut l = g.stream.launch_builder(&add);
    l.arg(&a).arg(&freed).arg(&mut out).arg(&n);
    // SAFETY: the driver refuses the launch before the kernel runs.
    assert!(unsafe { l.launch(cfg) }.is_err(), "a freed buffer is refused");
    assert!(last_error().contains("add_f32: argument 1"), "{}", last_error());

    // A copy that runs past its allocation.
    let end = out.device_ptr(&g.stream).0 + 3996;
    // SAFETY: the driver checks the range before copying.
    let copied = unsafe { cudarc::driver::result::memcpy_htod_sync(end, &[0.0f32; 2]) };
    assert!(copied.is_err(), "a copy past the allocation is refused");
    assert!(last_error().contains("not inside one allocation"), "{}", last_error());

    // A grid taller than 65535 blocks.
    let mut l = g.stream.launch_builder(&add);
    l.arg(&a).arg(&b).arg(&mut out).arg(&n);
    let tall = LaunchConfig { grid_dim: (1, 65536, 1), ..cfg };
    // SAFETY: refused before the kernel runs.
    assert!(unsafe { l.launch(tall) }.is_err(), "a grid of 65536 rows is refused");
    assert!(last_error().contains("a grid of (1, 65536, 1) blocks"), "{}", last_error());

    // The wgmma GEMM's shared memory, from a fresh load of its module: no leave yet.
    let module = manifest::MODULES.iter().find(|m| m.kernels.contains(&"fp8_gemm_wgmma")).expect("wgmma module");
    let wgmma = g.ctx.load_module(Ptx::from_src(module.sm_90)).unwrap().load_function("fp8_gemm_wgmma").unwrap();
    let mut l = g.stream.launch_builder(&wgmma);
    let (z8, z32, u) = (g.stream.alloc_zeros::<u8>(16).unwrap(), g.stream.alloc_zeros::<f32>(16).unwrap(), 1u32);
    l.arg(&z8).arg(&z32).arg(&u).arg(&z8).arg(&z32).arg(&u).arg(&mut out).arg(&u).arg(&u).arg(&u);
    let big = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: WGMMA_SHARED_BYTES as u32 };
    // SAFETY: refused before the kernel runs.
    assert!(unsafe { l.launch(big) }.is_err(), "shared memory past 48 KB without leave is refused");
    assert!(last_error().contains("above the 49152 its attribute allows"), "{}", last_error());

    let mut l = g.stream.launch_builder(&add);
    l.arg(&a).arg(&b).arg(&mut out).arg(&n);
    // SAFETY: three buffers of 1000 floats.
    unsafe { l.launch(cfg) }.unwrap();
    assert!(down(&g, &out).iter().all(|&v| v == 3.0), "the GPU works after the failures");
}

#[test]
fn elementwise_kernels_match_the_cpu() {
    let Some(g) = gpu("elementwise_kernels_match_the_cpu") else { return };
    let (a, b) = (values(1000, 1), values(1000, 2));
    let add: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let mul: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    assert_eq!(g.add(&a, &b).unwrap(), add);
    assert_eq!(g.mul(&a, &b).unwrap(), mul);
    let mut sw = vec![0.0; 1000];
    swiglu_forward(&a, &b, &mut sw);
    // expf on the GPU and exp on the CPU differ in the last bits.
    assert_close("swiglu", &g.swiglu_forward(&a, &b).unwrap(), &sw, 1e-6);
}

#[test]
fn row_kernels_match_the_cpu() {
    let Some(g) = gpu("row_kernels_match_the_cpu") else { return };
    for dim in [7, 256, 1000] {
        let rows = 5;
        let (x, w) = (values(rows * dim, 3), values(dim, 4));
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
        let (gy, grstd) = g.rmsnorm_forward(&x, &w, dim, 1e-6).unwrap();
        // Sums in another order (a tree in shared memory) and rsqrtf: f32 rounding.
        assert_close("rmsnorm y", &gy, &y, 1e-5);
        assert_close("rmsnorm rstd", &grstd, &rstd, 1e-5);
        let mut s = vec![0.0; rows * dim];
        softmax_forward(&x, dim, &mut s);
        assert_close("softmax", &g.softmax_forward(&x, dim).unwrap(), &s, 1e-5);
    }
}

/// `host` copied to the GPU.
fn up<T: DeviceRepr>(g: &Gpu, host: &[T]) -> CudaSlice<T> {
    g.stream.clone_htod(host).expect("a copy to the GPU")
}

/// `dev` copied to the host.
fn down<T: DeviceRepr + Default + Clone>(g: &Gpu, dev: &CudaSlice<T>) -> Vec<T> {
    g.stream.clone_dtoh(dev).expect("a copy from the GPU")
}

/// `n` floats on the GPU, left as the allocation finds them (NaN on the emulated driver).
fn uninit(g: &Gpu, n: usize) -> CudaSlice<f32> {
    // SAFETY: f32 has no invalid bit patterns, and every test writes what it reads back.
    unsafe { g.stream.alloc::<f32>(n) }.expect("an allocation")
}

/// Log-softmax, which only whale-tensor's backend calls: its device-buffer launchers.
#[test]
fn log_softmax_matches_the_cpu() {
    let Some(g) = gpu("log_softmax_matches_the_cpu") else { return };
    for dim in [7, 256, 1000] {
        let rows = 5;
        let (x, dy) = (values(rows * dim, 22), values(rows * dim, 23));
        let mut y = vec![0.0; rows * dim];
        log_softmax_forward(&x, dim, &mut y);
        let mut gy = uninit(&g, rows * dim);
        g.log_softmax_forward_dev(&up(&g, &x).slice(..), &mut gy, (rows, dim)).unwrap();
        assert_close("log-softmax", &down(&g, &gy), &y, 1e-5);
        let mut dx = vec![0.0; rows * dim];
        log_softmax_backward(&y, &dy, dim, &mut dx);
        let mut gdx = uninit(&g, rows * dim);
        g.log_softmax_backward_dev((&up(&g, &y).slice(..), &up(&g, &dy).slice(..)), &mut gdx, (rows, dim)).unwrap();
        assert_close("log-softmax dx", &down(&g, &gdx), &dx, 1e-5);
    }
}

/// The generic kernels behind whale-tensor's CUDA backend (kernels/tensor.cu), through their
/// device-buffer launchers, against their formulas in f64 (whale-tensor's backend tests hold
/// them to the CPU paths as well).
#[test]
fn tensor_kernels_match_their_formulas() {
    let Some(g) = gpu("tensor_kernels_match_their_formulas") else { return };
    let n = 700;
    let x = values(n, 80);
    let positive: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
    let gelu = |x: f64| 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    // (op, the map in f64, whether it needs x > 0)
    type Map<'a> = &'a dyn Fn(f64) -> f64;
    let ops: [(UnaryOp, Map, bool); 14] = [
        (UnaryOp::Neg, &|x| -x, false),
        (UnaryOp::Exp, &|x| x.exp(), false),
        (UnaryOp::Log, &|x| x.ln(), true),
        (UnaryOp::Sqrt, &|x| x.sqrt(), true),
        (UnaryOp::Rsqrt, &|x| 1.0 / x.sqrt(), true),
        (UnaryOp::Sqr, &|x| x * x, false),
        (UnaryOp::Powf(1.7), &|x| x.powf(1.7), true),
        (UnaryOp::Sigmoid, &sigmoid, false),
        (UnaryOp::Tanh, &|x| x.tanh(), false),
        (UnaryOp::Relu, &|x| x.max(0.0), false),
        (UnaryOp::Silu, &|x| x * sigmoid(x), false),
        (UnaryOp::Gelu, &gelu, false),
        (UnaryOp::Clamp(-0.5, 0.75), &|x| x.clamp(-0.5, 0.75), false),
        (UnaryOp::Affine(3.0, -0.25), &|x| 3.0 * x - 0.25, false),
    ];
    let dg = up(&g, &values(n, 81));
    for (op, f, needs_positive) in ops {
        let x = if needs_positive { &positive } else { &x };
        let dx_in = up(&g, x);
        let mut y = uninit(&g, n);
        g.unary_dev(op, &dx_in.slice(..), &mut y, n).unwrap();
        let want: Vec<f32> = x.iter().map(|&v| f(v as f64) as f32).collect();
        assert_close(&format!("{op:?}"), &down(&g, &y), &want, 1e-6);
        let mut dx = uninit(&g, n);
        g.unary_backward_dev(op, (&dx_in.slice(..), &y.slice(..), &dg.slice(..)), &mut dx, n).unwrap();
        // Central differences in f64 (the kinks of relu and clamp are not among the values).
        let h = 1e-6;
        let want: Vec<f32> = x
            .iter()
            .zip(down(&g, &dg))
            .map(|(&v, gv)| (gv as f64 * (f(v as f64 + h) - f(v as f64 - h)) / (2.0 * h)) as f32)
            .collect();
        assert_close(&format!("{op:?} backward"), &down(&g, &dx), &want, 1e-5);
    }

    // Binary ops over a broadcast: a [4, 5, 6] against b [5, 1] (strides 0 where broadcast), a
    // read transposed from its [6, 5, 4] storage.
    let shape = [4usize, 5, 6];
    let (a, b) = (values(120, 82), values(5, 83).iter().map(|v| v + 3.0).collect::<Vec<_>>());
    let mask: Vec<f32> = (0..120).map(|i| (i % 3 == 0) as u8 as f32).collect();
    let (da, db, dmask) = (up(&g, &a), up(&g, &b), up(&g, &mask));
    let strided = Strided::new(&shape, (&[1, 4, 20], 0), (&[0, 1, 0], 0)).unwrap();
    let at = |i: usize| a[i / 30 + (i / 6 % 5) * 4 + (i % 6) * 20];
    type Op<'a> = &'a dyn Fn(f32, f32) -> f32;
    let ops: [(BinaryOp, Op); 6] = [
        (BinaryOp::Add, &|x, z| x + z),
        (BinaryOp::Sub, &|x, z| x - z),
        (BinaryOp::Mul, &|x, z| x * z),
        (BinaryOp::Div, &|x, z| x / z),
        (BinaryOp::Maximum, &|x, z| x.max(z)),
        (BinaryOp::Ge, &|x, z| (x >= z) as u8 as f32),
    ];
    for (op, f) in ops {
        let mut out = uninit(&g, 120);
        g.binary_dev(op, (&da, &db), &strided, &mut out, 120).unwrap();
        let want: Vec<f32> = (0..120).map(|i| f(at(i), b[i / 6 % 5])).collect();
        assert_eq!(down(&g, &out), want, "{op:?}");
    }
    // where(mask, b, 0) and where(mask, 0, b), the mask read contiguously.
    let masked = Strided::new(&shape, (&[30, 6, 1], 0), (&[0, 1, 0], 0)).unwrap();
    for (op, keep) in [(BinaryOp::Keep, true), (BinaryOp::Drop, false)] {
        let mut out = uninit(&g, 120);
        g.binary_dev(op, (&dmask, &db), &masked, &mut out, 120).unwrap();
        let want: Vec<f32> = (0..120).map(|i| if (mask[i] != 0.0) == keep { b[i / 6 % 5] } else { 0.0 }).collect();
        assert_eq!(down(&g, &out), want, "{op:?}");
    }

    // The strided copy makes the transposed view contiguous; the strided write puts it back.
    let mut copy = uninit(&g, 120);
    g.strided_copy_dev(&da, &strided, &mut copy, 120).unwrap();
    assert_eq!(down(&g, &copy), (0..120).map(at).collect::<Vec<_>>(), "strided copy");
    let write = Strided::new(&shape, (&[30, 6, 1], 0), (&[1, 4, 20], 0)).unwrap();
    let mut back = uninit(&g, 120);
    g.strided_write_dev(&copy.slice(..), &write, &mut back, 120).unwrap();
    assert_eq!(down(&g, &back), a, "strided write");
    // bf16 storage is written as its bits, and only in the window: positions 2..4 of dim 1 of a
    // [4, 6, 3] buffer from a contiguous [4, 2, 3] source (a decode cache's append).
    let buffer: Vec<bf16> = (0..72).map(|i| bf16::from_f32(-(i as f32))).collect();
    let src: Vec<bf16> = values(24, 84).iter().map(|&v| bf16::from_f32(v)).collect();
    let window = Strided::new(&[4, 2, 3], (&[6, 3, 1], 0), (&[18, 3, 1], 6)).unwrap();
    let mut dbuf = up(&g, &buffer);
    g.strided_write_dev(&up(&g, &src).slice(..), &window, &mut dbuf, 24).unwrap();
    let mut want = buffer.clone();
    for (i, &v) in src.iter().enumerate() {
        want[i / 6 * 18 + 6 + i % 6] = v;
    }
    assert_eq!(down(&g, &dbuf), want, "strided write of bf16 bits");
    let mut filled = uninit(&g, 300);
    g.fill_dev(&mut filled, 300, 2.5).unwrap();
    assert!(down(&g, &filled).iter().all(|&v| v == 2.5), "fill");
    let mut selected = uninit(&g, 120);
    g.select_dev((&dmask.slice(..), &da.slice(..), &copy.slice(..)), &mut selected, 120).unwrap();
    let copied = down(&g, &copy);
    let want: Vec<f32> = (0..120).map(|i| if mask[i] != 0.0 { a[i] } else { copied[i] }).collect();
    assert_eq!(down(&g, &selected), want, "select");

    // Reductions over the middle axis of [outer, n, inner], each against its definition: the
    // one-thread kernels on a short axis (a NaN for argmax, a row of -inf for logsumexp), the
    // block-per-output ones on long axes (ties far apart, two NaNs, all -inf, a +inf).
    let check_mid = |r: &[f32], (outer, mid, inner): (usize, usize, usize)| {
        let dr = up(&g, r);
        let column = |o: usize, i: usize| (0..mid).map(move |j| r[(o * mid + j) * inner + i]);
        for reduction in [None, Some(MidReduction::Argmax), Some(MidReduction::LogSumExp)] {
            let mut dy = uninit(&g, outer * inner);
            match reduction {
                None => g.sum_mid_dev(&dr.slice(..), &mut dy, (outer, mid, inner)),
                Some(red) => g.reduce_mid_dev(red, &dr.slice(..), &mut dy, (outer, mid, inner)),
            }
            .unwrap();
            let y = down(&g, &dy);
            for o in 0..outer {
                for i in 0..inner {
                    let got = y[o * inner + i];
                    let want = match reduction {
                        None => column(o, i).map(f64::from).sum::<f64>() as f32,
                        Some(MidReduction::Argmax) => {
                            let mut best = 0;
                            for (j, v) in column(o, i).enumerate() {
                                if v.is_nan() {
                                    best = j;
                                    break;
                                }
                                if v > column(o, i).nth(best).unwrap() {
                                    best = j;
                                }
                            }
                            best as f32
                        }
                        Some(MidReduction::LogSumExp) => {
                            let m = column(o, i).fold(f32::NEG_INFINITY, f32::max);
                            if m.is_infinite() {
                                if column(o, i).any(f32::is_nan) {
                                    f32::NAN
                                } else {
                                    m
                                }
                            } else {
                                m + column(o, i).map(|v| ((v - m) as f64).exp()).sum::<f64>().ln() as f32
                            }
                        }
                    };
                    let ok = match reduction {
                        Some(MidReduction::LogSumExp) if want.is_finite() => {
                            (got - want).abs() <= 1e-6 * (1.0 + want.abs())
                        }
                        // The sum in f64 in another order on a long axis: one ulp at most.
                        None if mid >= 4096 => {
                            (i64::from(got.to_bits() as i32) - i64::from(want.to_bits() as i32)).abs() <= 1
                        }
                        _ => got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    };
                    assert!(ok, "{reduction:?} of [{outer}, {mid}, {inner}] at [{o}, {i}]: {got} vs {want}");
                }
            }
        }
    };
    let (outer, mid, inner) = (3usize, 50usize, 7usize);
    let mut r = values(outer * mid * inner, 84);
    r[(mid + 9) * inner + 2] = f32::NAN; // outer 1, j 9, inner 2
    for j in 0..mid {
        r[(2 * mid + j) * inner + 4] = f32::NEG_INFINITY;
    }
    check_mid(&r, (outer, mid, inner));
    // A vocabulary's logits per row (contiguous): the maximum tied at 17 and 4000 (the first
    // wins), two NaNs (the first wins); and three long columns of few outputs: all -inf, a +inf,
    // plain values.
    let mut rows = values(2 * 5000, 86);
    (rows[17], rows[4000]) = (9.0, 9.0);
    (rows[5000 + 3000], rows[5000 + 4500]) = (f32::NAN, f32::NAN);
    check_mid(&rows, (2, 5000, 1));
    let mut cols = values(9001 * 3, 87);
    for j in 0..9001 {
        cols[j * 3] = f32::NEG_INFINITY;
    }
    cols[5 * 3 + 1] = f32::INFINITY;
    check_mid(&cols, (1, 9001, 3));

    // Long axes of contiguous values, or of few outputs, take the sum with a block per output,
    // and very long axes of few outputs with several blocks per output and a second pass (a
    // whole tensor: 73 runs, the last shorter than the others; contiguous and strided runs of
    // several outputs): f64 partial sums added in another order than the CPU's, so its
    // f32 result, or one ulp off it where the exact sum lies within f64 rounding of an f32 boundary.
    for (outer, mid, inner) in
        [(3usize, 5000usize, 1usize), (1, 9001, 3), (1, 1_200_000, 1), (3, 40_000, 1), (2, 50_001, 3)]
    {
        let x = values(outer * mid * inner, 85);
        let mut dy = uninit(&g, outer * inner);
        g.sum_mid_dev(&up(&g, &x).slice(..), &mut dy, (outer, mid, inner)).unwrap();
        let y = down(&g, &dy);
        for o in 0..outer {
            for i in 0..inner {
                let want = (0..mid).map(|j| f64::from(x[(o * mid + j) * inner + i])).sum::<f64>() as f32;
                let got = y[o * inner + i];
                let ulps = (i64::from(got.to_bits() as i32) - i64::from(want.to_bits() as i32)).abs();
                assert!(ulps <= 1, "wide sum of [{outer}, {mid}, {inner}] at [{o}, {i}]: {got} vs {want}");
            }
        }
    }
}

#[test]
fn adamw_matches_the_cpu() {
    let Some(g) = gpu("adamw_matches_the_cpu") else { return };
    let n = 5000;
    let (p0, grad, m0, mut v0) = (values(n, 5), values(n, 6), values(n, 7), values(n, 8));
    v0.iter_mut().for_each(|x| *x = x.abs());
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 3 };
    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
    adamw_step(&mut p, &grad, &mut m, &mut v, &hp);
    let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
    g.adamw_step(&mut p2, &grad, &mut m2, &mut v2, &hp).unwrap();
    assert_eq!((bits(&p2), bits(&m2), bits(&v2)), (bits(&p), bits(&m), bits(&v)), "adamw");

    // bf16 moments: the CPU widens them, takes the f32 step and rounds them back.
    let narrow = |x: &[f32]| x.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let (mb, vb) = (narrow(&m0), narrow(&v0));
    let widen = |x: &[bf16]| x.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let (mut p, mut m, mut v) = (p0.clone(), widen(&mb), widen(&vb));
    adamw_step(&mut p, &grad, &mut m, &mut v, &hp);
    let (mut p2, mut m2, mut v2) = (p0, mb, vb);
    g.adamw_step_bf16(&mut p2, &grad, &mut m2, &mut v2, &hp).unwrap();
    assert_eq!(bits(&p2), bits(&p), "adamw with bf16 moments: parameters");
    assert_eq!((m2, v2), (narrow(&m), narrow(&v)), "adamw with bf16 moments: moments");
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn fp8_kernels_match_the_cpu() {
    let Some(g) = gpu("fp8_kernels_match_the_cpu") else { return };
    let (cpu, wq) = fp8_kernels(&g);
    check_fp8_gemm(&g, &cpu, &wq, Fp8GemmKernel::Simple);
    // An empty sum (the Wgrad of an expert that got no tokens, K = 0): zeros, as on the CPU.
    let empty = |rows: usize| Fp8Blocks::quantize(&[], rows, 0, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
    let want = fp8_gemm(&empty(5), &empty(7), Accumulation::F32);
    assert_eq!(want, vec![0.0; 35]);
    for kernel in [Fp8GemmKernel::Simple, Fp8GemmKernel::TensorCore, Fp8GemmKernel::Wgmma] {
        if g.runs_fp8_gemm(kernel, 0) {
            assert_eq!(g.fp8_gemm_with(&empty(5), &empty(7), kernel).unwrap(), want, "{kernel:?} with K = 0");
        }
    }
}

/// A product taller than a grid's 65535 row tiles (the simple kernel's 16-row tiles: 1,048,560
/// rows; an A100's forward over 2^20 tokens) runs in chunks of rows, one launch each: its launch
/// failed before. Both chunks, the seam included, against the CPU.
#[test]
fn an_fp8_gemm_taller_than_a_grid_runs_in_row_chunks() {
    let Some(g) = gpu("an_fp8_gemm_taller_than_a_grid_runs_in_row_chunks") else { return };
    let (m, n, k) = (1_048_560 + 48, 16, 16);
    let a = Fp8Blocks::quantize(&values(m * k, 21), m, k, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
    let b = Fp8Blocks::quantize(&values(n * k, 22), n, k, (128, 128), Fp8Format::E4M3, ScaleFormat::F32);
    check_fp8_gemm(&g, &a, &b, Fp8GemmKernel::Simple);
}

/// The activation quantisation (straight and transposed, with f32 and power-of-two scales) and
/// the weight transpose against the CPU twins; returns the CPU's quantized activations (f32
/// scales) and weight for the GEMM check.
fn fp8_kernels(g: &Gpu) -> (Fp8Blocks, Fp8Blocks) {
    // Ragged: 130 rows (two weight blocks), K = 300 (three tiles, one partial).
    let (m, n, kk) = (33, 130, 300);
    let x: Vec<f32> = values(m * kk, 9).iter().enumerate().map(|(i, v)| v * (1 + i % 5) as f32).collect();
    // Output gradients far below the activations' 1e-4 floor, and an all-zero tile: scaled by
    // their own amax (the zero tile by the floor).
    let mut tiny: Vec<f32> = x.iter().map(|v| v * 1e-9).collect();
    tiny[..128].fill(0.0);
    for sf in [ScaleFormat::F32, ScaleFormat::Ue8m0] {
        let cpu = Fp8Blocks::quantize(&x, m, kk, (1, 128), Fp8Format::E4M3, sf);
        let got = g.fp8_quantize_1x128(&x, (m, kk), (MIN_AMAX, sf)).unwrap();
        assert_eq!(bits(&got.scales), bits(&cpu.scales), "tile scales, {sf:?}");
        assert_eq!(got.codes, cpu.codes, "E4M3 codes (CUDA's converter against ours), {sf:?}");
        let floor = (Fp8Format::E4M3, sf);
        let want = Fp8Blocks::quantize_with_min_amax(&tiny, (m, kk), (1, 128), floor, GRADIENT_MIN_AMAX);
        let got = g.fp8_quantize_1x128(&tiny, (m, kk), (GRADIENT_MIN_AMAX, sf)).unwrap();
        assert_eq!((got.codes, bits(&got.scales)), (want.codes.clone(), bits(&want.scales)), "gradient tiles, {sf:?}");
        assert!(want.scales[1] < 1e-9 && want.scales[0] == GRADIENT_MIN_AMAX / 448.0, "{:?}", &want.scales[..2]);
    }
    // A power-of-two scale from the bits: amax / 448 one ulp above 2^-20 takes 2^-19 (an f32
    // log2 would give 2^-20, and the largest value would saturate).
    let above = f32::from_bits(2f32.powi(-20).to_bits() + 1) * 448.0;
    let edge: Vec<f32> = (0..256).map(|i| if i % 128 == 5 { -above } else { above / 3.0 }).collect();
    let got = g.fp8_quantize_1x128(&edge, (2, 128), (MIN_AMAX, ScaleFormat::Ue8m0)).unwrap();
    assert_eq!(got.scales, [2f32.powi(-19); 2], "UE8M0 scales just above a power of two");
    let w = values(n * kk, 10);
    let wq = Fp8Blocks::quantize(&w, n, kk, (128, 128), Fp8Format::E4M3, ScaleFormat::F32);
    // Wgrad's operands: a transpose tiled 1x128 along the tokens, quantized without forming it
    // (short and tall: partial tiles along both edges).
    let cases =
        [(m, kk, x.clone(), MIN_AMAX), (300, 40, values(300 * 40, 11), MIN_AMAX), (m, kk, tiny, GRADIENT_MIN_AMAX)];
    for ((rows, cols, v, floor), sf) in cases.iter().flat_map(|c| [(c, ScaleFormat::F32), (c, ScaleFormat::Ue8m0)]) {
        let (rows, cols, floor) = (*rows, *cols, *floor);
        let want = Fp8Blocks::quantize_with_min_amax(
            &transpose(v, rows, cols),
            (cols, rows),
            (1, 128),
            (Fp8Format::E4M3, sf),
            floor,
        );
        let got = g.fp8_quantize_transposed(v, (rows, cols), (floor, sf), 1).unwrap();
        assert_eq!(
            (&got.codes, bits(&got.scales)),
            (&want.codes, bits(&want.scales)),
            "[{rows}, {cols}] transposed 1x128 quantisation (amax floor {floor:e}, {sf:?} scales)"
        );
        // Padded to 16 tokens (the Wgrad GEMM's K on the tensor cores): each row the same codes
        // then zeros, the same scales.
        let ld = rows.next_multiple_of(16);
        let padded = g.fp8_quantize_transposed(v, (rows, cols), (floor, sf), 16).unwrap();
        let want_codes: Vec<u8> =
            want.codes.chunks(rows).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(0, ld - rows))).collect();
        assert_eq!((padded.rows, padded.cols), (cols, ld));
        assert_eq!((padded.codes, padded.scales), (want_codes, want.scales), "[{rows}, {cols}] padded to {ld}, {sf:?}");
    }
    let (gt, ct) = (g.fp8_transpose(&wq).unwrap(), wq.transpose());
    assert_eq!((gt.codes, gt.scales, gt.rows, gt.cols), (ct.codes, ct.scales, ct.rows, ct.cols), "weight transpose");
    (Fp8Blocks::quantize(&x, m, kk, (1, 128), Fp8Format::E4M3, ScaleFormat::F32), wq)
}

/// An FP8 GEMM kernel against the CPU twin. The block partial sums run in another order than
/// the CPU's, so the simple and `mma.sync` kernels agree to f32 rounding of the largest output
/// (1e-5 of it; `mma.sync` passed that on an H200). Hopper's wgmma accumulates E4M3 products in
/// a limited-precision register (DeepSeek-V3's report, 3.5.2: aligned to the largest product's
/// exponent and truncated to 14 bits; the accumulator keeps 13 mantissa bits), which promotion
/// every 128 of K confines to a block. The bound is what the emulated driver's model of that
/// register (emu::hopper_fp8_step) allows, not a documented property of the hardware: per k32
/// step, 32 products each short of a 2^-13-relative quantum of the largest plus 2^-13 of the
/// accumulator in and out, 4 steps a block, at most (2^-8 + 2^-10) of the block's sum of
/// |products|, so 2^-7 of the scaled sum of |products| over the blocks (the model reaches about
/// 1% of it on these shapes, other readings of the report's "14 bits" up to 4%).
/// A layout mistake is far above it; so is a wrong scale or a missed product in most shapes,
/// and the `exact` cases (operands every accumulator sums exactly) want the CPU's bits from every
/// kernel, which catches those in all.
fn check_fp8_gemm(g: &Gpu, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel) {
    check_fp8_gemm_within(g, a, b, kernel, false)
}

fn check_fp8_gemm_within(g: &Gpu, a: &Fp8Blocks, b: &Fp8Blocks, kernel: Fp8GemmKernel, exact: bool) {
    let want = fp8_gemm(a, b, Accumulation::F32);
    let got = g.fp8_gemm_with(a, b, kernel).unwrap();
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert_eq!(got.len(), want.len());
    let n = b.rows;
    let abs = |q: &Fp8Blocks| Fp8Blocks { codes: q.codes.iter().map(|c| c & 0x7f).collect(), ..q.clone() };
    let limited = kernel == Fp8GemmKernel::Wgmma && !exact;
    let abs_sums = if limited { fp8_gemm(&abs(a), &abs(b), Accumulation::F32) } else { vec![0.0; got.len()] };
    let bound = |i: usize| if exact { 0.0 } else { 1e-5 * scale + abs_sums[i] / 128.0 };
    let off = |i: usize| {
        let d = (got[i] - want[i]).abs();
        d.is_nan() || d > bound(i)
    };
    if limited {
        // How close the wgmma kernel came to its bound (the emulated driver's model, or the GPU).
        let most = |f: &dyn Fn(usize) -> f32| (0..got.len()).map(f).fold(0.0f32, f32::max);
        let used = most(&|i| (got[i] - want[i]).abs() / bound(i));
        let relative = most(&|i| (got[i] - want[i]).abs()) / scale;
        eprintln!(
            "fp8 gemm {kernel:?} [{}, {}] x [{n}, {}]: the largest error is {relative:.1e} of the largest output, \
             {used:.3} of its bound",
            a.rows, a.cols, b.cols
        );
    }
    let wrong: Vec<usize> = (0..got.len()).filter(|&i| off(i)).collect();
    if wrong.is_empty() {
        return;
    }
    // Which rows and columns are wrong, folded onto the 128 x 128 tile: a layout mistake (a
    // swizzle, a fragment map) shows as a pattern there, read from a single GPU run.
    let fold = |f: &dyn Fn(usize) -> usize| {
        let mut v: Vec<usize> = wrong.iter().map(|&i| f(i) % 128).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    // Just past the bound: accumulation precision (a hardware less precise than the model);
    // order 1 of the largest output, or any error on exact operands: a layout mistake.
    let worst = wrong.iter().map(|&i| (got[i] - want[i]).abs()).fold(0.0f32, f32::max) / scale;
    let examples: Vec<String> =
        wrong.iter().take(4).map(|&i| format!("[{}, {}] got {} vs CPU {}", i / n, i % n, got[i], want[i])).collect();
    panic!(
        "fp8 gemm {kernel:?} of [{}, {}] x [{n}, {}]{}: {} of {} outputs differ by more than their bound; \
         the largest error is {worst:e} of the largest output {scale}; e.g. {}; rows mod 128: {:?}; \
         columns mod 128: {:?}",
        a.rows,
        a.cols,
        b.cols,
        if exact { " (exact operands)" } else { "" },
        wrong.len(),
        got.len(),
        examples.join(", "),
        fold(&|i| i / n),
        fold(&|i| i % n)
    );
}

#[test]
fn the_tensor_core_fp8_gemm_matches_the_cpu() {
    check_fp8_gemm_kernel("the_tensor_core_fp8_gemm_matches_the_cpu", Fp8GemmKernel::TensorCore);
}

#[test]
fn the_wgmma_fp8_gemm_matches_the_cpu() {
    check_fp8_gemm_kernel("the_wgmma_fp8_gemm_matches_the_cpu", Fp8GemmKernel::Wgmma);
}

/// A tensor-core FP8 GEMM kernel against the CPU twin where this GPU runs it: whole tiles,
/// ragged M/N/K edges (K a multiple of 16 but not of 128), 1x128 and 128x128 weight scales, more
/// K blocks than the wgmma kernel's pipeline stages, and magnitudes spread over the tiles so that
/// every scale matters.
fn check_fp8_gemm_kernel(test: &str, kernel: Fp8GemmKernel) {
    let Some(g) = gpu(test) else { return };
    // An sm_90 driver that would not load the compute_90a module is a failure, not a skip.
    assert!(kernel.runs_on(g.arch, 128) == g.runs_fp8_gemm(kernel, 128), "{test}: {:?}", g.unloaded_modules());
    if !g.runs_fp8_gemm(kernel, 128) {
        eprintln!("{test}: skipped, sm_{}{} does not run the {kernel:?} kernel", g.arch.0, g.arch.1);
        return;
    }
    fp8_gemm_shapes(&g, kernel);
}

/// Whole tiles, ragged M / N / K edges (K a multiple of 16 but not of 128), per-row and
/// per-128-row B scales, more K blocks than the wgmma kernel's pipeline stages.
fn fp8_gemm_shapes(g: &Gpu, kernel: Fp8GemmKernel) {
    let shapes =
        [(128, 128, 256, 128), (200, 300, 400, 128), (33, 130, 144, 1), (1, 257, 512, 128), (130, 140, 880, 128)];
    for (m, n, k, b_rows) in shapes {
        let x: Vec<f32> = values(m * k, 31).iter().enumerate().map(|(i, v)| v * (1 + i % 7) as f32).collect();
        let w: Vec<f32> = values(n * k, 32).iter().enumerate().map(|(i, v)| v / (1 + (i / 977) % 5) as f32).collect();
        let a = Fp8Blocks::quantize(&x, m, k, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
        let b = Fp8Blocks::quantize(&w, n, k, (b_rows, 128), Fp8Format::E4M3, ScaleFormat::F32);
        check_fp8_gemm(g, &a, &b, kernel);
    }
    // Ragged edges (K = 880 and 144, 16 past a multiple of 32), and K = 640: five whole blocks,
    // more than the wgmma ring's four stages.
    for (m, n, k, b_rows) in [(130, 140, 880, 128), (33, 130, 144, 1), (64, 200, 640, 128)] {
        let (a, b) = (exact_operand(m, k, 1, 33), exact_operand(n, k, b_rows, 34));
        check_fp8_gemm_within(g, &a, &b, kernel, true);
    }
}

/// Operands that every accumulator sums exactly: values +-0.5, +-1 and +-2 and scales 0.5 to 4,
/// powers of two all, so each product is a multiple of 1/4 up to 4, a block's partial sum (at
/// most 128 x 4) needs 11 significant bits, and the scaled sums over 7 blocks fit an f32. Any
/// accumulation order and precision then gives the CPU's bits: an error is a layout mistake.
fn exact_operand(rows: usize, k: usize, rows_per_scale: usize, seed: u32) -> Fp8Blocks {
    let pick = |v: f32, of: &[f32]| of[((v + 2.0) * 1000.0) as usize % of.len()];
    let codes = values(rows * k, seed)
        .iter()
        .map(|&v| Fp8Format::E4M3.encode_saturating(pick(v, &[0.5, 1.0, 2.0, -0.5, -1.0, -2.0])))
        .collect();
    let grid = rows.div_ceil(rows_per_scale) * k.div_ceil(128);
    let scales = values(grid, seed + 1).iter().map(|&v| pick(v, &[0.5, 1.0, 2.0, 4.0])).collect();
    Fp8Blocks::from_parts(codes, scales, (rows, k), (rows_per_scale, 128), Fp8Format::E4M3).unwrap()
}

/// A kernel this GPU cannot run for a shape is an error naming it, not a launch.
#[test]
fn an_fp8_gemm_kernel_the_gpu_cannot_run_is_an_error() {
    let Some(g) = gpu("an_fp8_gemm_kernel_the_gpu_cannot_run_is_an_error") else { return };
    let a = Fp8Blocks::quantize(&values(2 * 100, 1), 2, 100, (1, 128), Fp8Format::E4M3, ScaleFormat::F32);
    let err = g.fp8_gemm_with(&a, &a, Fp8GemmKernel::Wgmma).unwrap_err().to_string();
    assert!(err.contains("Wgmma") && err.contains("k = 100"), "{err}");
    // Codes one byte into their buffer: the tensor-core kernels' 16-byte loads refuse them, the
    // simple kernel reads them (exact operands: its sum order may differ from the CPU's).
    let a = exact_operand(2, 128, 1, 35);
    let op = g.upload_fp8(&a).unwrap();
    let shifted = up(&g, &[&[0u8][..], &a.codes].concat());
    let view = Fp8View { codes: shifted.slice(1..), ..op.view() };
    let mut y = g.stream.alloc_zeros::<f32>(4).unwrap();
    for kernel in [Fp8GemmKernel::TensorCore, Fp8GemmKernel::Wgmma] {
        if g.runs_fp8_gemm(kernel, 128) {
            let err = g.fp8_gemm_dev(&view, &op.view(), &mut y, kernel).unwrap_err().to_string();
            assert!(err.contains("16-byte aligned"), "{kernel:?}: {err}");
        }
    }
    g.fp8_gemm_dev(&view, &op.view(), &mut y, Fp8GemmKernel::Simple).unwrap();
    assert_eq!(down(&g, &y), fp8_gemm(&a, &a, Accumulation::F32), "the simple kernel reads any offset");
}

#[test]
fn backward_kernels_match_the_cpu() {
    let Some(g) = gpu("backward_kernels_match_the_cpu") else { return };
    let n = 999;
    let (gate, up, dout) = (values(n, 11), values(n, 12), values(n, 13));
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&gate, &up, &dout, Some(&mut dg), Some(&mut du));
    let (gdg, gdu) = g.swiglu_backward(&gate, &up, &dout).unwrap();
    assert_close("swiglu dgate", &gdg, &dg, 1e-5);
    assert_close("swiglu dup", &gdu, &du, 1e-5);

    // The weight gradient sums a column over the rows in 32 row groups: fewer rows than groups
    // with a ragged channel tile, and rows past the groups (not a multiple) of a narrow row.
    for (rows, dim) in [(6, 300), (1000, 40)] {
        let (x, w, dy) = (values(rows * dim, 14), values(dim, 15), values(rows * dim, 16));
        let (mut y, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
        rmsnorm_forward(&x, &w, dim, 1e-6, &mut y, &mut rstd);
        let (mut dx, mut dw) = (vec![0.0; rows * dim], vec![0.0; dim]);
        rmsnorm_backward(&x, &w, &rstd, &dy, dim, Some(&mut dx), Some(&mut dw));
        let (gdx, gdw) = g.rmsnorm_backward(&x, &w, &rstd, &dy).unwrap();
        assert_close("rmsnorm dx", &gdx, &dx, 1e-5);
        assert_close("rmsnorm dweight", &gdw, &dw, 1e-5);
    }
    let (rows, dim) = (6, 300);
    let (x, dy) = (values(rows * dim, 14), values(rows * dim, 16));

    let mut s = vec![0.0; rows * dim];
    softmax_forward(&x, dim, &mut s);
    let mut ds = vec![0.0; rows * dim];
    softmax_backward(&s, &dy, dim, &mut ds);
    assert_close("softmax dx", &g.softmax_backward(&s, &dy, dim).unwrap(), &ds, 1e-5);
}

#[test]
fn cross_entropy_matches_the_cpu() {
    let Some(g) = gpu("cross_entropy_matches_the_cpu") else { return };
    cross_entropy(&g);
    assert!(
        g.cross_entropy_forward(&[0.0; 9 * 1000], 1000, &[5000; 9], -100).is_err(),
        "an out-of-range target is an error"
    );
}

fn cross_entropy(g: &Gpu) {
    let (rows, vocab) = (9, 1000);
    let logits: Vec<f32> = values(rows * vocab, 17).iter().map(|v| 4.0 * v).collect();
    let targets: Vec<i64> = (0..rows as i64).map(|r| if r == 4 { -100 } else { (r * 97) % vocab as i64 }).collect();
    let (mut loss, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    cross_entropy_forward(&logits, vocab, &targets, -100, &mut loss, &mut lse);
    let (gl, glse) = g.cross_entropy_forward(&logits, vocab, &targets, -100).unwrap();
    assert_close("cross entropy loss", &gl, &loss, 1e-5);
    assert_close("cross entropy lse", &glse, &lse, 1e-5);
    let dloss = values(rows, 18);
    let mut dx = vec![0.0; rows * vocab];
    cross_entropy_backward(&logits, vocab, &targets, -100, &lse, &dloss, &mut dx);
    assert_close(
        "cross entropy dlogits",
        &g.cross_entropy_backward(&logits, vocab, &targets, -100, &lse, &dloss).unwrap(),
        &dx,
        1e-5,
    );
}

#[test]
fn rope_matches_the_cpu_both_ways_and_both_pairings() {
    let Some(g) = gpu("rope_matches_the_cpu_both_ways_and_both_pairings") else { return };
    let (outer, seq, heads, d) = (2, 5, 3, 16);
    let x = values(outer * seq * heads * d, 19);
    let angles: Vec<f32> = (0..seq * d / 2).map(|i| (i / (d / 2)) as f32 * 0.37 / (1 + i % (d / 2)) as f32).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    for interleaved in [true, false] {
        for inverse in [false, true] {
            let mut y = vec![0.0; x.len()];
            let f = if interleaved { rope_interleaved } else { rope_half };
            f(&x, &cos, &sin, outer, seq, heads, d, inverse, &mut y);
            let got = g.rope(&x, &cos, &sin, (outer, seq, heads, d), interleaved, inverse).unwrap();
            assert_close(&format!("rope interleaved={interleaved} inverse={inverse}"), &got, &y, 1e-6);
        }
    }
}

#[test]
fn embedding_matches_the_cpu() {
    let Some(g) = gpu("embedding_matches_the_cpu") else { return };
    embedding(&g);
    assert!(g.embedding_forward(&[0.0; 50 * 64], 64, &[50]).is_err(), "an id past the table is an error");
}

fn embedding(g: &Gpu) {
    let (rows, dim) = (50, 64);
    let table = values(rows * dim, 20);
    let ids: Vec<u32> = (0..37).map(|i| (i * 7 % rows) as u32).chain([3, 3, 3]).collect();
    let mut out = vec![0.0; ids.len() * dim];
    embedding_forward(&table, dim, &ids, &mut out);
    assert_eq!(g.embedding_forward(&table, dim, &ids).unwrap(), out);
    let dout = values(ids.len() * dim, 21);
    let mut dt = vec![0.0; rows * dim];
    embedding_backward(&dout, dim, &ids, &mut dt);
    // atomicAdd adds repeated ids in any order: f32 rounding.
    assert_close("embedding dtable", &g.embedding_backward(&dout, dim, &ids, rows * dim).unwrap(), &dt, 1e-6);
}

#[test]
fn bf16_storage_rounds_as_the_cpu() {
    let Some(g) = gpu("bf16_storage_rounds_as_the_cpu") else { return };
    // Ties (the low 16 bits exactly 0x8000) both ways, subnormals, the overflow edge, infinities.
    let mut x: Vec<f32> =
        [0x3f80_8000u32, 0x3f81_8000, 0xbf80_8000, 0x0000_8000, 0x0001_7fff, 0x7f7f_ffff, 0x7f80_0000]
            .into_iter()
            .map(f32::from_bits)
            .collect();
    x.extend(values(10_000, 70).iter().map(|v| v * 1e3));
    x.extend((0..10_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) & 0x7f7f_ffff)));
    let (bits, back) = g.round_trip_bf16(&x).unwrap();
    for (i, (&v, (&b, &w))) in x.iter().zip(bits.iter().zip(&back)).enumerate() {
        assert_eq!(b.to_bits(), bf16::from_f32(v).to_bits(), "[{i}] {v:e}: bits");
        assert_eq!(w, b.to_f32(), "[{i}] {v:e}: widened");
    }
}

#[test]
fn token_dispatch_matches_the_cpu_bit_for_bit() {
    let Some(g) = gpu("token_dispatch_matches_the_cpu_bit_for_bit") else { return };
    // 7168 wide as in DeepSeek-V3 (narrower on the emulated driver, which runs a fiber per thread).
    let dim = if common::on_the_emulated_driver() { 200 } else { 7168 };
    let plan = token_dispatch(&g, dim);
    let x = values(plan.n_tokens() * dim, 60);
    assert!(g.moe_permute(&x[dim..], dim, &plan, None).is_err(), "too few tokens is an error");
}

/// 300 tokens, top-6 of 64 experts (a few tokens with fewer: as expert parallelism leaves them),
/// rows of `dim`: permute, combine and the combine's weight gradient against the CPU twins.
fn token_dispatch(g: &Gpu, dim: usize) -> DispatchPlan {
    let (tokens, experts, top_k) = (300, 64, 6);
    let assignments: Vec<(usize, usize)> = (0..tokens)
        .flat_map(|t| (0..if t % 17 == 0 { 2 } else { top_k }).map(move |j| (t, (t * 13 + j * 11) % experts)))
        .collect();
    let plan = DispatchPlan::new(&assignments, tokens, experts).unwrap();
    let lists = (&plan.token_offsets[..], &plan.token_rows[..]);
    let x = values(tokens * dim, 60);
    let (scale, weight) = (values(plan.len(), 61), values(plan.len(), 62));
    let mut want = vec![0.0; plan.len() * dim];
    permute(&x, dim, &plan.rows, None, &mut want);
    assert_eq!(g.moe_permute(&x, dim, &plan, None).unwrap(), want, "permute");
    permute(&x, dim, &plan.rows, Some(&scale), &mut want);
    assert_eq!(g.moe_permute(&x, dim, &plan, Some(&scale)).unwrap(), want, "scaled permute");
    let y = values(plan.len() * dim, 63);
    let mut combined = vec![0.0; tokens * dim];
    unpermute(&y, dim, Some(&weight), lists, &mut combined);
    assert_eq!(g.moe_unpermute(&y, dim, &plan, Some(&weight)).unwrap(), combined, "weighted combine");
    unpermute(&y, dim, None, lists, &mut combined);
    assert_eq!(g.moe_unpermute(&y, dim, &plan, None).unwrap(), combined, "plain combine");
    let dout = values(tokens * dim, 64);
    let mut dw = vec![0.0; plan.len()];
    unpermute_weight_grad(&dout, &y, dim, &plan.rows, &mut dw);
    // Both sum the f32 products in f64, in other orders: the bound is relative to the sum of
    // |products| (about 7e3 at 7168 wide), not to the possibly tiny result; f64 keeps the
    // difference far below it (the final rounding to f32 aside, about 1e-16 of it).
    let got = g.moe_unpermute_weight_grad(&dout, &y, dim, &plan).unwrap();
    for (p, (&a, &b)) in got.iter().zip(&dw).enumerate() {
        let t = plan.rows[p] as usize;
        let magnitude: f32 = (0..dim).map(|c| (dout[t * dim + c] * y[p * dim + c]).abs()).sum();
        assert!(
            (a - b).abs() <= 1e-6 * magnitude,
            "weight grad [{p}]: GPU {a} vs CPU {b} (sum of |products| {magnitude})"
        );
    }
    plan
}

/// Row-major `[rows, cols]` operand (or its transpose) for the CPU oracle.
fn mat(data: &[f32], offset: usize, cols: usize, transposed: bool) -> MatRef<'_> {
    let (row_stride, col_stride) = if transposed { (1, cols as isize) } else { (cols as isize, 1) };
    MatRef { data, offset, row_stride, col_stride }
}

/// The CPU oracle of a [`GemmShape`] product, batch by batch.
fn gemm_reference(s: &GemmShape, a: &[f32], b: &[f32]) -> Vec<f32> {
    (0..s.batch)
        .flat_map(|i| {
            let lhs = mat(a, i * s.m * s.k, s.k, false);
            let rhs = mat(b, i * s.k * s.n, if s.b_transposed { s.k } else { s.n }, s.b_transposed);
            matmul_reference(s.m, s.n, s.k, lhs, rhs)
        })
        .collect()
}

#[test]
fn cublas_matmul_matches_the_cpu_in_f32_and_bf16() {
    let Some(g) = gpu("cublas_matmul_matches_the_cpu_in_f32_and_bf16") else { return };
    let shapes = [
        GemmShape::new(37, 53, 71),
        GemmShape::linear(64, 48, 200),
        GemmShape { batch: 3, m: 17, n: 9, k: 33, b_transposed: false },
        GemmShape { batch: 2, m: 8, n: 24, k: 16, b_transposed: true },
    ];
    for s in shapes {
        let a = values(s.batch * s.m * s.k, 11);
        let b = values(s.batch * s.k * s.n, 12);
        let want = gemm_reference(&s, &a, &b);
        // Plain f32 GEMM (no TF32): only the summation order differs.
        assert_close(&format!("f32 {s:?}"), &g.matmul(&s, &a, &b).unwrap(), &want, 1e-5);
        // bf16 operands, f32 accumulation, a bf16 result: within one bf16 rounding of the f32
        // product of the same (bf16-rounded) operands.
        let (ah, bh): (Vec<bf16>, Vec<bf16>) =
            (a.iter().map(|&x| bf16::from_f32(x)).collect(), b.iter().map(|&x| bf16::from_f32(x)).collect());
        let (ar, br): (Vec<f32>, Vec<f32>) =
            (ah.iter().map(|x| x.to_f32()).collect(), bh.iter().map(|x| x.to_f32()).collect());
        let want = gemm_reference(&s, &ar, &br);
        let got: Vec<f32> = g.matmul(&s, &ah, &bh).unwrap().iter().map(|x| x.to_f32()).collect();
        assert_close(&format!("bf16 {s:?}"), &got, &want, 1.0 / 128.0);
    }
    let bad = g.matmul(&GemmShape::new(2, 2, 2), &[0.0f32; 3], &[0.0; 4]);
    assert!(bad.unwrap_err().to_string().contains("expected 4"), "a short operand is a shape error");
}

#[test]
fn grouped_gemm_matches_one_matmul_per_expert() {
    let Some(g) = gpu("grouped_gemm_matches_one_matmul_per_expert") else { return };
    let (n, k) = (24, 40);
    let groups = [5, 0, 17, 1, 9];
    let rows: usize = groups.iter().sum();
    let (x, w) = (values(rows * k, 21), values(groups.len() * n * k, 22));
    let got = g.grouped_matmul(&x, &groups, &w, (n, k)).unwrap();
    let mut start = 0;
    for (e, &r) in groups.iter().enumerate() {
        let want = matmul_reference(r, n, k, mat(&x, start * k, k, false), mat(&w, e * n * k, k, true));
        assert_close(&format!("expert {e}"), &got[start * n..(start + r) * n], &want, 1e-5);
        start += r;
    }
}
