// Token permutation for expert dispatch: rows of the batch gathered into expert order, and the
// combine that brings each token its weighted expert outputs. The combine gathers per token (CSR
// lists of its dispatched rows, ascending): no atomics, so the same bits on every run. Products
// and sums use __fmul_rn / __fadd_rn so nvcc cannot contract them into FMAs: bit for bit the CPU
// twin's arithmetic.
// CPU twins: whale_kernels::cpu::dispatch::{permute, unpermute, unpermute_weight_grad}.
#include "shared_memory.cuh"

// out [n_rows, dim] = scale[p] * x[rows[p]] (has_scale == 0: a copy; scale is then a dummy).
// Grid-stride over the output elements.
extern "C" __global__ void moe_permute_f32(
    const float* x, const unsigned* rows, const float* scale, int has_scale, float* out, unsigned n_rows,
    unsigned dim) {
    size_t n = (size_t)n_rows * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t p = i / dim;
        float v = x[(size_t)rows[p] * dim + i % dim];
        out[i] = has_scale ? __fmul_rn(scale[p], v) : v;
    }
}

// One block per token: out[t, c] = sum over token t's rows p (token_rows[offsets[t]..offsets[t+1]],
// in that order, from 0) of weight[p] * y[p, c] (has_weight == 0: a plain sum). Threads stride
// over the columns.
extern "C" __global__ void moe_unpermute_f32(
    const float* y, const float* weight, int has_weight, const unsigned* offsets, const unsigned* token_rows,
    float* out, unsigned dim) {
    unsigned t = blockIdx.x, begin = offsets[t], end = offsets[t + 1];
    for (unsigned c = threadIdx.x; c < dim; c += blockDim.x) {
        float acc = 0.0f;
        for (unsigned i = begin; i < end; ++i) {
            unsigned p = token_rows[i];
            float v = y[(size_t)p * dim + c];
            acc = __fadd_rn(acc, has_weight ? __fmul_rn(weight[p], v) : v);
        }
        out[(size_t)t * dim + c] = acc;
    }
}

// One block per dispatched row: dweight[p] = sum over c of dout[rows[p], c] * y[p, c], the f32
// products summed in f64 as the CPU twin does (a block reduction: its order differs from the
// twin's sequential sum, which f64 makes invisible in all but rare last bits). blockDim.x is a
// power of two; the dynamic shared memory holds blockDim.x doubles.
extern "C" __global__ void moe_unpermute_weight_grad_f32(
    const float* dout, const float* y, const unsigned* rows, float* dweight, unsigned dim) {
    double* partials = reinterpret_cast<double*>(dynamic_shared_memory());
    unsigned p = blockIdx.x;
    const float* g = dout + (size_t)rows[p] * dim;
    const float* v = y + (size_t)p * dim;
    double partial = 0.0;
    for (unsigned c = threadIdx.x; c < dim; c += blockDim.x) partial += (double)__fmul_rn(g[c], v[c]);
    partials[threadIdx.x] = partial;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partials[threadIdx.x] += partials[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) dweight[p] = (float)partials[0];
}
