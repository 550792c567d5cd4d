//! Helpers shared by the GPU test files.
#![allow(dead_code)]

pub mod emulator;

use whale_kernels::cuda::{device_count, Gpu};

#[allow(unused_imports)]
pub use emulator::{on_the_emulated_driver, run_gpu_tests_on_the_emulated_driver};

/// The GPU, or `None` after saying why the test is skipped. Under `WHALE_EMULATED_GPU` (the
/// child process of `the_gpu_tests_pass_on_the_emulated_driver_in_emulation`) the emulated one.
pub fn gpu(test: &str) -> Option<Gpu> {
    if emulator::on_the_emulated_driver() {
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
