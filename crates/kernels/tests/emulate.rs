//! CUDA kernels run on the CPU: each driver in kernels/emulate/ includes its kernel's `.cu` with
//! `WHALE_HOST_EMULATION`, which swaps shared_memory.cuh's and sm90.cuh's PTX for
//! kernels/emulate/cuda_host.h and sm90_host.h (a fiber per CUDA thread, barriers that must all
//! be reached, cp.async that lands only when waited for, wgmma computed from its descriptors),
//! runs the kernel and compares it with the result computed directly in double. This checks a
//! kernel's own logic (indexing, tiling, swizzles, pipelining, edges) on machines without a GPU;
//! the hardware is the GPU tests' to check (tests/cuda).
//!
//! The GPU tests themselves run in emulation too, on the emulated driver, against the CPU twins
//! (tests/cuda, `the_gpu_tests_pass_on_the_emulated_driver_in_emulation`), which also checks that
//! they launch every kernel of the manifest.

mod common;

use std::path::Path;
use std::process::Command;

use common::emulator::{gxx_flags, have_gxx};

#[test]
fn the_host_emulation_keeps_cuda_semantics_and_names_failures() {
    emulate("the_host_emulation_keeps_cuda_semantics_and_names_failures", "harness");
}

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
