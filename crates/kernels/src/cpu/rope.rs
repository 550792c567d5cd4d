//! Rotary position embedding, in both channel conventions.
//!
//! Interleaved (DeepSeek-V3 reference, GPT-J): pairs `(x[2i], x[2i+1])` are rotated by `pos * theta_i`.
//! Half-rotated (NeoX, HF Llama/Qwen2): pairs `(x[i], x[i + d/2])` are rotated by `pos * theta_i`.

/// `x`, `y`: [outer, seq, heads, d] contiguous; `cos`, `sin`: [seq, d/2], the tables already gathered
/// for the position of each sequence index. `inverse` rotates by the negative angle (the backward).
pub fn rope_interleaved(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    outer: usize,
    seq: usize,
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [f32],
) {
    todo!()
}

/// Same as [`rope_interleaved`] with the half-rotated (NeoX) pairing.
pub fn rope_half(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    outer: usize,
    seq: usize,
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [f32],
) {
    todo!()
}
