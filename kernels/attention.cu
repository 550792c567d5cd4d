// Attention forward with an online softmax (flash-style: no score matrix is stored), one block
// per query row; the block computes each key's score with a reduction and every thread owns a
// strided slice of the output. Grouped-query heads (kv_heads dividing q_heads) and bottom-right
// causal masking cover training attention and MLA decode over the latent cache (MQA: one KV
// head whose key is [c ; k_pe] and whose value is c, spec deepseek-v3.md 1.5 and 8.2).
// q [batch, q_heads, q_len, qk], k [batch, kv_heads, kv_len, qk], v [batch, kv_heads, kv_len, vd];
// o [batch, q_heads, q_len, vd], lse [batch, q_heads, q_len].
// CPU twins: whale_kernels::cpu::attention::attention_forward and attention_backward.
#include "common.cuh"

#define MAX_SLICE 8 // output values per thread: v_dim <= 8 * blockDim.x

// Keys query i sees: j < i + 1 + kv_len - q_len under bottom-right causal masking (none when that
// is not positive: a query block longer than the keys starts with fully masked rows).
__device__ inline unsigned visible_keys(unsigned i, unsigned q_len, unsigned kv_len, int causal) {
    if (!causal) return kv_len;
    unsigned end = i + 1 + kv_len;
    return end > q_len ? min(kv_len, end - q_len) : 0;
}

// First query that sees key j (the inverse of visible_keys); q_len when none does.
__device__ inline unsigned first_query(unsigned j, unsigned q_len, unsigned kv_len, int causal) {
    if (!causal) return 0;
    return j + q_len > kv_len ? min(q_len, j + q_len - kv_len) : 0;
}

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
    unsigned last = visible_keys(i, q_len, kv_len, causal);
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

// Attention backward, pass 1: one block per query row recomputes its probabilities from the
// forward's lse and writes dq and D_i = dot(dO_i, O_i) (delta [batch, q_heads, q_len], pass 2's
// input). dS_ij = P_ij (dP_ij - D_i) with dP_ij = dot(dO_i, v_j); dq_i = scale * sum_j dS_ij k_j.
// Each thread owns a strided slice of dq: qk <= 8 * blockDim.x.
extern "C" __global__ void attention_backward_dq_f32(
    const float* q, const float* k, const float* v, const float* o, const float* lse, const float* d_o,
    float* dq, float* delta,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    extern __shared__ float shared[];
    unsigned row = blockIdx.x; // (b, h, i)
    unsigned i = row % q_len, bh = row / q_len, h = bh % q_heads, b = bh / q_heads;
    unsigned kvh = h / (q_heads / kv_heads);
    const float* qr = q + (size_t)row * qk;
    const float* orow = o + (size_t)row * vd;
    const float* dor = d_o + (size_t)row * vd;
    const float* kb = k + ((size_t)b * kv_heads + kvh) * kv_len * qk;
    const float* vb = v + ((size_t)b * kv_heads + kvh) * kv_len * vd;
    float part = 0.0f;
    for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += dor[d] * orow[d];
    float D = block_sum(part, shared);
    if (threadIdx.x == 0) delta[row] = D;
    float L = lse[row];
    float acc[MAX_SLICE];
    for (int t = 0; t < MAX_SLICE; ++t) acc[t] = 0.0f;
    unsigned last = visible_keys(i, q_len, kv_len, causal);
    for (unsigned j = 0; j < last; ++j) {
        // The forward's products in the forward's order: the same score.
        part = 0.0f;
        for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qr[d] * kb[(size_t)j * qk + d];
        float s = scale * block_sum(part, shared);
        part = 0.0f;
        for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += dor[d] * vb[(size_t)j * vd + d];
        float dp = block_sum(part, shared);
        float ds = expf(s - L) * (dp - D);
        for (int t = 0; t < MAX_SLICE; ++t) {
            unsigned d = threadIdx.x + t * blockDim.x;
            if (d < qk) acc[t] += ds * kb[(size_t)j * qk + d];
        }
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < qk) dq[(size_t)row * qk + d] = scale * acc[t];
    }
}

// Attention backward, pass 2: one block per key row (b, kv head, j) walks every query of the query
// heads that read its KV head and writes dk_j = scale * sum_i dS_ij q_i and dv_j = sum_i P_ij dO_i;
// each key row has one writer, so no atomics. Each thread owns strided slices of dk and dv:
// qk, vd <= 8 * blockDim.x.
extern "C" __global__ void attention_backward_dkv_f32(
    const float* q, const float* k, const float* v, const float* d_o, const float* lse, const float* delta,
    float* dk, float* dv,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    extern __shared__ float shared[];
    unsigned row = blockIdx.x; // (b, kv head, j)
    unsigned j = row % kv_len, bkv = row / kv_len, kvh = bkv % kv_heads, b = bkv / kv_heads;
    unsigned group = q_heads / kv_heads;
    const float* kr = k + (size_t)row * qk;
    const float* vr = v + (size_t)row * vd;
    float acc_k[MAX_SLICE], acc_v[MAX_SLICE];
    for (int t = 0; t < MAX_SLICE; ++t) acc_k[t] = acc_v[t] = 0.0f;
    unsigned first = first_query(j, q_len, kv_len, causal);
    for (unsigned h = kvh * group; h < (kvh + 1) * group; ++h) {
        size_t head = ((size_t)b * q_heads + h) * q_len;
        for (unsigned i = first; i < q_len; ++i) {
            const float* qi = q + (head + i) * qk;
            const float* doi = d_o + (head + i) * vd;
            float part = 0.0f;
            for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qi[d] * kr[d];
            float s = scale * block_sum(part, shared);
            part = 0.0f;
            for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += doi[d] * vr[d];
            float dp = block_sum(part, shared);
            float p = expf(s - lse[head + i]);
            float ds = p * (dp - delta[head + i]);
            for (int t = 0; t < MAX_SLICE; ++t) {
                unsigned d = threadIdx.x + t * blockDim.x;
                if (d < qk) acc_k[t] += ds * qi[d];
                if (d < vd) acc_v[t] += p * doi[d];
            }
        }
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < qk) dk[(size_t)row * qk + d] = scale * acc_k[t];
        if (d < vd) dv[(size_t)row * vd + d] = acc_v[t];
    }
}
