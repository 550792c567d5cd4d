#![allow(dead_code)] // each test binary uses a part of the helpers
//! Helpers of the HF parity tests and (gpu_training) of the GPU model tests.

#[path = "../../../kernels/tests/common/emulator.rs"]
pub mod emulator;
pub mod gpu_training;

use std::path::{Path, PathBuf};

use whale_model::IGNORE_INDEX;
use whale_tensor::{Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every element within `atol + rtol * |reference|`; the message names the worst one.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(worst.0 <= 0.0, "{what}: element {} is {} vs reference {}", worst.1, g[worst.1], w[worst.1]);
}

/// Our targets from HF's unshifted labels: the target at position i is `labels[i + 1]`.
pub fn shifted_targets(labels: &Tensor) -> Tensor {
    let (batch, seq) = (labels.dims()[0], labels.dims()[1]);
    let l = labels.to_vec_i64().unwrap();
    let t: Vec<i64> = (0..batch * seq).map(|p| if p % seq + 1 < seq { l[p + 1] } else { IGNORE_INDEX }).collect();
    Tensor::from_vec(t, &[batch, seq], &Device::Cpu).unwrap()
}
