// Block-wide reductions shared by the row kernels (included, so it is part of every module that
// uses it and of the sources' stamp).
#pragma once

// Sum of `v` over the block (blockDim.x a power of two, at most 1024), returned to every thread.
// `shared` holds blockDim.x values of T.
template <class T>
__device__ inline T block_sum(T v, T* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    T total = shared[0];
    __syncthreads();
    return total;
}

// No index (a thread's empty share of an axis, a slot not yet taken).
#define RANK_NONE 0xffffffffu

// (v, i) ranks before (w, j) in a descending order with first indices first: NaN first (as
// torch.topk and torch.argmax have it), then the larger value, ties (NaNs included) to the lower
// index; RANK_NONE ranks last.
__device__ inline bool ranks_before(float v, unsigned i, float w, unsigned j) {
    if (i == RANK_NONE) return false;
    if (j == RANK_NONE) return true;
    bool v_nan = isnan(v), w_nan = isnan(w);
    if (v_nan != w_nan) return v_nan;
    return (v_nan || v == w) ? i < j : v > w;
}

// Max of `v` over the block, as block_sum.
__device__ inline float block_max(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    float m = shared[0];
    __syncthreads();
    return m;
}
