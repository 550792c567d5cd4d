//! SwiGLU: `out = silu(gate) * up`, elementwise.

pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    todo!()
}

/// Each of `dgate` and `dup` is optional (only the requested gradients are computed); overwritten.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dout: &[f32], dgate: Option<&mut [f32]>, dup: Option<&mut [f32]>) {
    todo!()
}
