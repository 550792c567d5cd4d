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
