//! Helpers shared by the GPU test files.
#![allow(dead_code)]

pub mod emulator;
pub mod kernels;

use whale_kernels::cuda::{device_count, Gpu};

#[allow(unused_imports)]
pub use emulator::emulator;
#[allow(unused_imports)]
pub use kernels::Kernels;

/// The GPU, or `None` after saying why the test is skipped. Under `WHALE_EMULATED_GPU` (the
/// child process of `the_gpu_tests_pass_on_the_emulated_driver_in_emulation`) the emulated one.
pub fn gpu(test: &str) -> Option<Gpu> {
    if on_the_emulated_driver() {
        return emulator::emulated_gpu(test);
    }
    if device_count() == 0 {
        eprintln!("{test}: skipped, no CUDA driver or GPU on this machine");
        return None;
    }
    Some(Gpu::new(0).expect("a visible GPU opens"))
}

/// Deterministic values in about [-2, 2].
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect()
}

/// `|got - want| <= tol * (1 + |want|)`, element by element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: GPU {g} vs CPU {w}");
    }
}

/// Attention's log-sum-exps: equal to f32 rounding, and exactly -inf for fully masked rows
/// (causal with more queries than keys, or no keys).
pub fn assert_lse(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what} lse: length");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if b == f32::NEG_INFINITY {
            assert_eq!(a, b, "{what} lse[{i}] of a fully masked row");
        } else {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what} lse[{i}]: GPU {a} vs CPU {b}");
        }
    }
}

/// Whether this process's GPU tests run on the emulated driver.
pub fn on_the_emulated_driver() -> bool {
    std::env::var_os("WHALE_EMULATED_GPU").is_some()
}

/// Runs this test binary's GPU tests (all but the emulation's and the source stamp, and `skip`)
/// in a child process on the emulated driver, one at a time; fails `test` with the child's output
/// if any fails.
pub fn run_gpu_tests_on_the_emulated_driver(test: &str, skip: &[&str]) {
    if emulator::emulator(test).is_none() {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = std::process::Command::new(exe);
    cmd.env("WHALE_EMULATED_GPU", "1").args([
        "--test-threads=1",
        "--skip",
        "in_emulation",
        "--skip",
        "the_embedded_ptx",
    ]);
    for s in skip {
        cmd.args(["--skip", s]);
    }
    let out = cmd.output().expect("running the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "{test}: GPU tests failed on the emulated driver:\n{text}");
    assert!(!text.contains("skipped, no CUDA driver"), "{test}: the child found no emulated GPU:\n{text}");
    assert!(!text.contains("test result: ok. 0 passed"), "{test}: the child ran no GPU test:\n{text}");
}
