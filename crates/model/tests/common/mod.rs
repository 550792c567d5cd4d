#![allow(dead_code)] // each test binary uses a part of the helpers
//! Helpers of the HF parity tests and (gpu_training) of the GPU model tests.

#[path = "../../../kernels/tests/common/emulator.rs"]
pub mod emulator;
pub mod gpu_training;

use std::path::{Path, PathBuf};

use whale_model::generate::{CacheMode, KvCache};
use whale_model::{DeepSeekV3, IGNORE_INDEX};
use whale_tensor::{no_grad, Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Every element within `atol + rtol * |reference|`; the message names the worst one. A NaN on
/// either side is never close (its excess counts as infinite).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    let mut worst = (0.0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        let excess = if excess.is_nan() { f32::INFINITY } else { excess };
        if excess > worst.0 {
            worst = (excess, i);
        }
    }
    assert!(worst.0 <= 0.0, "{what}: element {} is {} vs reference {}", worst.1, g[worst.1], w[worst.1]);
}

/// `model`'s logits for `ids` (`[batch, seq]`) through a decode cache in `mode`: the first
/// `prefill` positions in one forward, then one position at a time, `[batch, seq, vocab]`; and
/// the cache as the last step left it.
pub fn cached_logits(model: &DeepSeekV3, ids: &Tensor, prefill: usize, mode: CacheMode) -> (Tensor, KvCache) {
    let mut cache = KvCache::with_mode(0, mode);
    let seq = ids.dims()[1];
    let mut pieces = Vec::new();
    let mut from = 0;
    for len in std::iter::once(prefill).chain(std::iter::repeat_n(1, seq - prefill)) {
        let chunk = ids.narrow(1, from, len).unwrap().contiguous().unwrap();
        pieces.push(no_grad(|| model.forward_cached(&chunk, &mut cache)).unwrap());
        from += len;
    }
    (Tensor::cat(&pieces, 1).unwrap(), cache)
}

/// Our targets from HF's unshifted labels: the target at position i is `labels[i + 1]`.
pub fn shifted_targets(labels: &Tensor) -> Tensor {
    let (batch, seq) = (labels.dims()[0], labels.dims()[1]);
    let l = labels.to_vec_i64().unwrap();
    let t: Vec<i64> = (0..batch * seq).map(|p| if p % seq + 1 < seq { l[p + 1] } else { IGNORE_INDEX }).collect();
    Tensor::from_vec(t, &[batch, seq], &Device::Cpu).unwrap()
}

/// A decode cache's buffer ([`whale_model::mla::CacheBuffer`]) of `dtype` on `device`: appends
/// are written in place, a full buffer doubles, a clone copies on its first write, a truncated
/// cache overwrites what it dropped. The values are small integers, exact in bf16.
pub fn cache_buffer_appends_in_place(device: &Device, dtype: whale_tensor::DType) {
    use whale_model::mla::CacheBuffer;
    let what = format!("{device:?} {dtype:?}");
    let rows = |start: usize, n: usize| {
        let v: Vec<f32> = (start * 6..(start + n) * 6).map(|x| x as f32).collect();
        // [batch 1, heads 2, n positions, dim 3]: position p, head h, column d holds 6p + 3h + d.
        let t = Tensor::from_vec(v, &[n, 2, 3], &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        t.to_device(device).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap()
    };
    let want = |n: usize| rows(0, n).contiguous().unwrap().to_vec_f32().unwrap();
    let mut c = CacheBuffer::new(rows(0, 3)).unwrap();
    assert_eq!((c.len(), c.capacity()), (3, 3));
    c.append(&rows(3, 1)).unwrap();
    assert_eq!((c.len(), c.capacity()), (4, 6), "{what}: full, the capacity doubles");
    c.append(&rows(4, 2)).unwrap();
    assert_eq!((c.len(), c.capacity()), (6, 6), "{what}: room left, written in place");
    let view = c.view().unwrap();
    assert_eq!((view.dtype(), view.device()), (dtype, *device), "{what}");
    assert_eq!(view.to_vec_f32().unwrap(), want(6), "{what}");
    // A clone shares the buffer until one appends: each then sees only its own positions.
    let mut other = c.clone();
    other.truncate(5);
    other.append(&rows(9, 1)).unwrap();
    c.append(&rows(6, 1)).unwrap();
    assert_eq!(c.view().unwrap().to_vec_f32().unwrap(), want(7), "{what}");
    let expected = Tensor::cat(&[rows(0, 5), rows(9, 1)], 2).unwrap();
    assert_eq!(other.view().unwrap().to_vec_f32().unwrap(), expected.to_vec_f32().unwrap(), "{what}: the clone");
    // A truncated cache overwrites the positions it dropped.
    c.truncate(2);
    c.append(&rows(2, 1)).unwrap();
    assert_eq!(c.view().unwrap().to_vec_f32().unwrap(), want(3), "{what}: after truncation");
}
