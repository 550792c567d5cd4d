//! Helpers shared by the kernels' tests.

/// xorshift64*: tiny deterministic generator for test data.
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (not 0, which xorshift never leaves).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1), on a grid of 2^-23.
    pub(crate) fn next(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub(crate) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.next()).collect()
    }
}

/// Error measured against the element plus the tensor's largest element (gradients are sums whose
/// terms cancel, so a pure element-relative bound is meaningless near zero).
pub(crate) fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= tol * (w.abs() + scale), "{what}[{i}]: {g} vs {w} (err {err:e}, scale {scale:e})");
    }
}

/// The bit patterns of `x`, for comparing results exactly (NaNs and signed zeros included).
pub(crate) fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}
