//! Shared helpers for Whale's criterion benches.
//!
//! Convention read by `cargo xtask bench`: every benchmark group holds a `whale` function (the
//! framework) and a `baseline` function (the reference it is compared with, in the same run); the
//! summary reports `whale / baseline` per group.

use criterion::Criterion;
use std::time::Duration;
use whale_tensor::{DType, Rng, Tensor};

/// Short, stable settings: 2-core machines run the whole suite in a few minutes.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, DType::F32, &mut Rng::new(seed)).expect("randn")
}

/// Whether criterion runs as a benchmark (`cargo bench`, `cargo xtask bench`) rather than as the
/// one-iteration smoke test `cargo test --all-targets` makes of it; heavy setups (long prefills)
/// shrink in the smoke test so the test suite stays fast.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}
