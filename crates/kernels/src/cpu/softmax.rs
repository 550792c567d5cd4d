//! Softmax and log-softmax over the last dimension, row by row, with backward.

/// `x`, `y`: [rows, dim]. Numerically stable (max subtracted).
pub fn softmax_forward(x: &[f32], dim: usize, y: &mut [f32]) {
    todo!()
}

/// `dx = y * (dy - sum(dy * y))` per row, from the forward output `y`.
pub fn softmax_backward(y: &[f32], dy: &[f32], dim: usize, dx: &mut [f32]) {
    todo!()
}

/// `y = x - logsumexp(x)` per row.
pub fn log_softmax_forward(x: &[f32], dim: usize, y: &mut [f32]) {
    todo!()
}

/// `dx = dy - exp(y) * sum(dy)` per row, from the forward output `y`.
pub fn log_softmax_backward(y: &[f32], dy: &[f32], dim: usize, dx: &mut [f32]) {
    todo!()
}
