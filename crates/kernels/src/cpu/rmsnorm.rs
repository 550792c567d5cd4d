//! Fused RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * weight`, row by row.

/// `x`: [rows, dim], `weight`: [dim] -> `y`: [rows, dim], `rstd`: [rows] (saved for backward).
pub fn rmsnorm_forward(x: &[f32], weight: &[f32], dim: usize, eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    todo!()
}

/// Backward of [`rmsnorm_forward`]. `dx` ([rows, dim]) and `dweight` ([dim]) are each optional so the
/// input gradient and the weight gradient can be computed in separate calls (ZeroBubble B/W split).
/// Both are overwritten, not accumulated.
pub fn rmsnorm_backward(
    x: &[f32],
    weight: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dim: usize,
    dx: Option<&mut [f32]>,
    dweight: Option<&mut [f32]>,
) {
    todo!()
}
