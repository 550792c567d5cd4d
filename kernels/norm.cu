// Row-wise kernels, one block per row of `dim` elements; the block reduces in shared memory.
// CPU twins: whale_kernels::cpu::rmsnorm (forward, backward) and cpu::softmax (forward, backward).

#include "common.cuh"
#include "shared_memory.cuh"

// y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), per row; rstd is saved for backward.
extern "C" __global__ void rmsnorm_forward_f32(
    const float* x, const float* w, float* y, float* rstd, unsigned dim, float eps) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss, shared) / (float)dim + eps);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * r * w[i];
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// A row's max m and sum of exp(x - m), reduced over the block (every thread gets both).
__device__ inline void row_max_and_exp_sum(const float* xr, unsigned dim, float* shared, float& m, float& s) {
    m = -INFINITY;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, shared);
    s = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) s += expf(xr[i] - m);
    s = block_sum(s, shared);
}

// Softmax of each row, shifted by the row max.
extern "C" __global__ void softmax_forward_f32(const float* x, float* y, unsigned dim) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float m, s;
    row_max_and_exp_sum(xr, dim, shared, m, s);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = expf(xr[i] - m) / s;
}

// Log-softmax per row: y = (x - max) - ln(sum exp(x - max)) (CPU twin:
// cpu::softmax::log_softmax_forward, which subtracts in the same order).
extern "C" __global__ void log_softmax_forward_f32(const float* x, float* y, unsigned dim) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float m, s;
    row_max_and_exp_sum(xr, dim, shared, m, s);
    float log_sum = logf(s);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = (xr[i] - m) - log_sum;
}

// Log-softmax backward per row from the output: dx = dy - exp(y) * sum(dy).
extern "C" __global__ void log_softmax_backward_f32(const float* y, const float* dy, float* dx, unsigned dim) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    size_t base = (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) s += dy[base + i];
    s = block_sum(s, shared);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) dx[base + i] = dy[base + i] - expf(y[base + i]) * s;
}

// RMSNorm input gradient per row: g = w * dy, c = rstd^2 * mean(g * x), dx = rstd * (g - x * c).
extern "C" __global__ void rmsnorm_backward_input_f32(
    const float* x, const float* w, const float* rstd, const float* dy, float* dx, unsigned dim) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    size_t base = (size_t)blockIdx.x * dim;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) dot += w[i] * dy[base + i] * x[base + i];
    float c = r * r * (block_sum(dot, shared) / (float)dim);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = w[i] * dy[base + i];
        dx[base + i] = r * (g - x[base + i] * c);
    }
}

// RMSNorm weight gradient: one thread per channel sums dy * x * rstd over the rows, in row order
// (a grid-stride loop: the launch caps its grid, and channels past it are visited again).
extern "C" __global__ void rmsnorm_backward_weight_f32(
    const float* x, const float* rstd, const float* dy, float* dw, unsigned rows, unsigned dim) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < dim; i += gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (unsigned r = 0; r < rows; ++r) acc += dy[(size_t)r * dim + i] * x[(size_t)r * dim + i] * rstd[r];
        dw[i] = acc;
    }
}

// Softmax backward per row: dx = y * (dy - sum(dy * y)).
extern "C" __global__ void softmax_backward_f32(const float* y, const float* dy, float* dx, unsigned dim) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    size_t base = (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) s += dy[base + i] * y[base + i];
    s = block_sum(s, shared);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) dx[base + i] = y[base + i] * (dy[base + i] - s);
}

// Fused cross-entropy (llm.c style), one block per row of `vocab` logits: loss = (max - x_t) +
// ln(sum exp(x - max)), lse saved; rows whose target is `ignore` get loss 0.
extern "C" __global__ void cross_entropy_forward_f32(
    const float* logits, const long long* targets, long long ignore, float* loss, float* lse, unsigned vocab) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(x[i] - m);
    float log_sum = logf(block_sum(s, shared));
    if (threadIdx.x == 0) {
        long long t = targets[blockIdx.x];
        lse[blockIdx.x] = m + log_sum;
        loss[blockIdx.x] = t == ignore ? 0.0f : (m - x[t]) + log_sum;
    }
}

// dlogits = dloss * (softmax - onehot(target)), zero for ignored rows.
extern "C" __global__ void cross_entropy_backward_f32(
    const float* logits, const long long* targets, long long ignore, const float* lse, const float* dloss,
    float* dlogits, unsigned vocab) {
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float* dx = dlogits + (size_t)blockIdx.x * vocab;
    long long t = targets[blockIdx.x];
    float d = dloss[blockIdx.x], l = lse[blockIdx.x];
    for (unsigned i = threadIdx.x; i < vocab; i += blockDim.x) {
        dx[i] = t == ignore ? 0.0f : d * (expf(x[i] - l) - (i == (unsigned long long)t ? 1.0f : 0.0f));
    }
}
