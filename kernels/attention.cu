// Attention forward with an online softmax (flash-style: no score matrix is stored), one block
// per query row; the block computes each key's score with a reduction and every thread owns a
// strided slice of the output. Grouped-query heads (kv_heads dividing q_heads) and bottom-right
// causal masking cover training attention and MLA decode over the latent cache (MQA: one KV
// head whose key is [c ; k_pe] and whose value is c, spec deepseek-v3.md 1.5 and 8.2).
// q [batch, q_heads, q_len, qk], k [batch, kv_heads, kv_len, qk], v [batch, kv_heads, kv_len, vd];
// o [batch, q_heads, q_len, vd], lse [batch, q_heads, q_len].
// CPU twin: whale_kernels::cpu::attention::attention_forward.
#include "common.cuh"

#define MAX_SLICE 8 // output values per thread: v_dim <= 8 * blockDim.x

extern "C" __global__ void attention_forward_f32(
    const float* q, const float* k, const float* v, float* o, float* lse,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    extern __shared__ float shared[];
    unsigned row = blockIdx.x; // (b, h, i)
    unsigned i = row % q_len, bh = row / q_len, h = bh % q_heads, b = bh / q_heads;
    unsigned kvh = h / (q_heads / kv_heads);
    const float* qr = q + (size_t)row * qk;
    const float* kb = k + ((size_t)b * kv_heads + kvh) * kv_len * qk;
    const float* vb = v + ((size_t)b * kv_heads + kvh) * kv_len * vd;
    unsigned last = causal ? min(kv_len, i + (kv_len - q_len) + 1) : kv_len;
    float acc[MAX_SLICE];
    for (int s = 0; s < MAX_SLICE; ++s) acc[s] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (unsigned j = 0; j < last; ++j) {
        float part = 0.0f;
        for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qr[d] * kb[(size_t)j * qk + d];
        float s = scale * block_sum(part, shared);
        float m_new = fmaxf(m, s);
        float alpha = expf(m - m_new), p = expf(s - m_new);
        l = l * alpha + p;
        for (int t = 0; t < MAX_SLICE; ++t) {
            unsigned d = threadIdx.x + t * blockDim.x;
            if (d < vd) acc[t] = acc[t] * alpha + p * vb[(size_t)j * vd + d];
        }
        m = m_new;
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < vd) o[(size_t)row * vd + d] = l > 0.0f ? acc[t] / l : 0.0f;
    }
    if (threadIdx.x == 0) lse[row] = m + logf(l);
}
