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

/// Whether criterion's FILTER argument (its one positional argument, a regex over benchmark ids)
/// may select a benchmark whose id starts with `prefix`: no filter, a plain one that the prefix
/// contains or that contains the prefix, or one with regex syntax (not judged here). A bench
/// target's printed extras (tables, training curves) run only then, so `cargo xtask bench NAME`
/// does not pay for every target's extras.
pub fn filter_may_select(prefix: &str) -> bool {
    // criterion's options that take a value (the next argument, unless given as `--opt=value`).
    const VALUED: [&str; 16] = [
        "--color",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--format",
        "--profile-time",
        "--load-baseline",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--plotting-backend",
        "--output-format",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if VALUED.contains(&a.as_str()) {
            i += 1;
        } else if !a.starts_with('-') {
            filter = Some(a.as_str());
        }
        i += 1;
    }
    match filter {
        None => true,
        Some(f) if f.chars().any(|c| "\\.^$*+?()[]{}|".contains(c)) => true,
        Some(f) => prefix.contains(f) || f.contains(prefix) || f.starts_with(prefix),
    }
}
