// Rotary position embedding over x [outer, seq, heads, d] with tables cos, sin [seq, d/2]; one
// thread per rotated pair. `interleaved`: pairs (2i, 2i+1) (DeepSeek-V3's reference); otherwise
// (i, i + d/2) (NeoX, HF Llama/Qwen2). `sign` = -1 rotates back (the backward).
// CPU twins: whale_kernels::cpu::rope::{rope_interleaved, rope_half}.
extern "C" __global__ void rope_f32(
    const float* x, const float* cos, const float* sin, float* y,
    unsigned outer, unsigned seq, unsigned heads, unsigned d, int interleaved, float sign) {
    unsigned half = d / 2;
    size_t pairs = (size_t)outer * seq * heads * half;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        unsigned i = p % half;
        size_t head = p / half;
        unsigned pos = (head / heads) % seq;
        float c = cos[pos * half + i], s = sign * sin[pos * half + i];
        size_t base = head * d;
        size_t a = base + (interleaved ? 2 * i : i), b = base + (interleaved ? 2 * i + 1 : i + half);
        float x0 = x[a], x1 = x[b];
        y[a] = x0 * c - x1 * s;
        y[b] = x0 * s + x1 * c;
    }
}
