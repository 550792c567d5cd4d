//! CUDA kernels run on the CPU: each driver in kernels/emulate/ includes its kernel's `.cu` with
//! `WHALE_HOST_EMULATION`, which swaps shared_memory.cuh's and sm90.cuh's PTX for
//! kernels/emulate/cuda_host.h and sm90_host.h (a fiber per CUDA thread, barriers that must all
//! be reached, cp.async that lands only when waited for, wgmma computed from its descriptors),
//! runs the kernel and compares it with the result computed directly in double. This checks a
//! kernel's own logic (indexing, tiling, swizzles, pipelining, edges) on machines without a GPU;
//! the hardware is the GPU tests' to check (tests/cuda.rs, tests/cuda_train.rs).
//!
//! The GPU tests' own bodies run in emulation too, against the CPU twins: the `*_in_emulation`
//! tests of tests/cuda.rs and tests/cuda_train.rs launch every module's kernels by name through
//! tests/common/emulator.rs (mma.sync from emulate/mma_host.h), and `every_kernel_runs_in_emulation`
//! holds the manifest to that.

mod common;

use std::path::Path;
use std::process::Command;

use common::emulator::{gxx_flags, have_gxx, Arg};
use whale_kernels::cuda::{manifest, Fp8GemmKernel};

#[test]
fn the_wgmma_fp8_gemm_in_host_emulation_matches_the_block_scaled_product() {
    emulate("the_wgmma_fp8_gemm_in_host_emulation_matches_the_block_scaled_product", "fp8_gemm_wgmma");
}

#[test]
fn the_tiled_attention_kernels_in_host_emulation_match_attention_and_its_gradients() {
    emulate("the_tiled_attention_kernels_in_host_emulation_match_attention_and_its_gradients", "attention");
}

/// Builds kernels/emulate/`driver`.cpp with g++ and runs it; its exit status is the verdict.
fn emulate(test: &str, driver: &str) {
    if !have_gxx(test) {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../kernels/emulate/{driver}.cpp"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulate-{driver}"));
    let build = Command::new("g++").args(gxx_flags()).arg("-o").arg(&exe).arg(&src).output().expect("running g++");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(build.status.success(), "g++ {}:\n{}", src.display(), text(&build.stderr));
    let run = Command::new(&exe).output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    println!("{} (host emulation):\n{}", src.display(), text(&run.stdout));
    assert!(run.status.success(), "{}:\n{}{}", src.display(), text(&run.stdout), text(&run.stderr));
}

/// Whether `text` has `word` as a whole identifier.
fn mentions(text: &str, word: &str) -> bool {
    let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    text.match_indices(word)
        .any(|(i, _)| !ident(text[..i].chars().next_back()) && !ident(text[i + word.len()..].chars().next()))
}

/// Every kernel of the manifest runs in emulation somewhere: launched by name from a test
/// (tests/*.rs, tests/common/kernels.rs), called by a standalone driver (kernels/emulate/*.cpp),
/// or, for the FP8 GEMMs, launched by `Fp8GemmKernel::entry` in
/// `every_fp8_gemm_kernel_matches_the_cpu_in_emulation`.
#[test]
fn every_kernel_runs_in_emulation() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |dir: &Path, ext: &str| -> String {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    };
    let tests = read(&here.join("tests"), "rs") + &read(&here.join("tests/common"), "rs");
    let drivers = read(&here.join("../../kernels/emulate"), "cpp");
    let gemms = [Fp8GemmKernel::Simple, Fp8GemmKernel::TensorCore, Fp8GemmKernel::Wgmma].map(|k| k.entry());
    for m in manifest::MODULES {
        for &k in m.kernels {
            let launched = tests.contains(&format!("\"{k}\""));
            let called = mentions(&drivers, k);
            assert!(
                launched || called || gemms.contains(&k),
                "{}: kernel {k} runs in no emulation (tests/common/kernels.rs or kernels/emulate/*.cpp)",
                m.name
            );
        }
    }
}

/// The harness's own guarantees: arguments that do not match the kernel's parameters are refused
/// before the launch, and a kernel that runs past a buffer (here: told it holds more than it
/// does) fails its launch with the thread and block, the test process going on.
#[test]
fn the_emulation_refuses_wrong_arguments_and_catches_overruns() {
    let Some(e) = common::emulator("the_emulation_refuses_wrong_arguments_and_catches_overruns") else { return };
    let (a, b) = (vec![1.0f32; 1000], vec![2.0f32; 1000]);
    let mut out = vec![0.0f32; 1000];
    let grid = common::kernels::grid_for(1000);
    let err = e.launch("add_f32", grid, &mut [Arg::input(&a), Arg::input(&b), Arg::output(&mut out)]).unwrap_err();
    assert!(err.contains("3 arguments for 4 parameters"), "{err}");
    let n = Arg::value(1000u64);
    let err = e.launch("add_f32", grid, &mut [Arg::input(&a), Arg::input(&b), Arg::output(&mut out), n]).unwrap_err();
    assert!(err.contains("argument 3"), "a u64 for a u32: {err}");
    let bytes = vec![0u8; 1000];
    let n = Arg::value(1000u32);
    let err =
        e.launch("add_f32", grid, &mut [Arg::input(&bytes), Arg::input(&b), Arg::output(&mut out), n]).unwrap_err();
    assert!(err.contains("argument 0"), "bytes for floats: {err}");

    // 996 floats end on a 16-byte boundary, against the guard page (the copies round buffers up
    // to 16 bytes, so an overrun of less than that goes unseen).
    let mut short = vec![0.0f32; 996];
    let n = Arg::value(1000u32);
    let err = e.launch("add_f32", grid, &mut [Arg::input(&a), Arg::input(&b), Arg::output(&mut short), n]).unwrap_err();
    assert!(err.contains("segmentation fault") && err.contains("of block (3, 0, 0)"), "{err}");
    assert!(short.iter().all(|&v| v == 3.0), "the elements that exist are written back");
    let n = Arg::value(1000u32);
    e.launch("add_f32", grid, &mut [Arg::input(&a), Arg::input(&b), Arg::output(&mut out), n]).unwrap();
    assert!(out.iter().all(|&v| v == 3.0), "the emulation works after a failed launch");
}
