//! Scaled dot-product attention, flash-style: keys are processed in tiles with an online softmax,
//! so nothing of size [q_len, kv_len] is ever held; the backward recomputes the probabilities from
//! the saved per-row logsumexp.

/// Sizes of one attention call. Query head `h` reads key/value head `h / (q_heads / kv_heads)` (GQA;
/// MQA when `kv_heads == 1`). `qk_dim` may differ from `v_dim` (MLA: 192 vs 128).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub qk_dim: usize,
    pub v_dim: usize,
    pub scale: f32,
    /// Query `i` sees keys `j <= i + (kv_len - q_len)` (bottom-right aligned, so a query block at the
    /// end of a cached sequence works).
    pub causal: bool,
}

/// `q`: [batch, q_heads, q_len, qk_dim], `k`: [batch, kv_heads, kv_len, qk_dim],
/// `v`: [batch, kv_heads, kv_len, v_dim] -> `o`: [batch, q_heads, q_len, v_dim], `lse`: [batch, q_heads, q_len].
pub fn attention_forward(shape: &AttnShape, q: &[f32], k: &[f32], v: &[f32], o: &mut [f32], lse: &mut [f32]) {
    todo!()
}

/// Backward of [`attention_forward`]; `dq`, `dk`, `dv` are overwritten.
pub fn attention_backward(
    shape: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    todo!()
}
