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

// RMSNorm weight gradient, dw[i] = sum over rows r of dy[r, i] * x[r, i] * rstd[r]: a block of
// 32 channels x blockDim.y row groups. Thread (c, g) sums rows g, g + blockDim.y, ... of its
// channel (a warp reads 32 neighbouring channels of one row, coalesced), then the groups' partial
// sums are added in group order (the bits depend on the launch shape alone). One thread per
// channel summing every row took 148 us for 1024 rows x 256 on an H200. Blocks take channel
// tiles grid-stride (the launch caps its grid). Dynamic shared memory: 33 floats per row group,
// a row of 32 partial sums and one of slack (the writes and the last step's reads both run
// along rows, one bank per lane, so the padding buys nothing; this is the layout the H200 ran).
extern "C" __global__ void rmsnorm_backward_weight_f32(
    const float* x, const float* rstd, const float* dy, float* dw, unsigned rows, unsigned dim) {
    float* part = reinterpret_cast<float*>(dynamic_shared_memory());
    for (unsigned base = blockIdx.x * 32; base < dim; base += gridDim.x * 32) {
        unsigned i = base + threadIdx.x;
        float acc = 0.0f;
        if (i < dim)
            for (unsigned r = threadIdx.y; r < rows; r += blockDim.y)
                acc += dy[(size_t)r * dim + i] * x[(size_t)r * dim + i] * rstd[r];
        part[threadIdx.y * 33 + threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.y == 0 && i < dim) {
            float s = 0.0f;
            for (unsigned g = 0; g < blockDim.y; ++g) s += part[g * 33 + threadIdx.x];
            dw[i] = s;
        }
        __syncthreads();
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
