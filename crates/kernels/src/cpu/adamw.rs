//! Fused AdamW step (decoupled weight decay, bias correction), PyTorch's `torch.optim.AdamW` numerics.

/// Hyper-parameters of one step. `step` is 1-based (the count after this update).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// Updates `param`, `m`, `v` in place from `grad`.
pub fn adamw_step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) {
    todo!()
}
