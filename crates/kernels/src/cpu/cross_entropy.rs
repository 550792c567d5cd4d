//! Fused cross-entropy (log-softmax + NLL) with an ignore index, llm.c-style: the backward
//! recomputes softmax from the logits and the saved logsumexp instead of storing probabilities.

/// `logits`: [rows, vocab], `targets`: [rows]. Writes `loss[r] = lse[r] - logits[r, t]` (0 for rows
/// whose target is `ignore_index`) and `lse[r] = logsumexp(logits[r])`. Returns the number of rows
/// not ignored. Targets are validated by the caller (`0 <= t < vocab` or `ignore_index`).
pub fn cross_entropy_forward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    loss: &mut [f32],
    lse: &mut [f32],
) -> usize {
    todo!()
}

/// `dlogits[r] = dloss[r] * (softmax(logits[r]) - onehot(targets[r]))`, zero for ignored rows.
pub fn cross_entropy_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    ignore_index: i64,
    lse: &[f32],
    dloss: &[f32],
    dlogits: &mut [f32],
) {
    todo!()
}
