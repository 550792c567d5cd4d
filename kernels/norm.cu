// Row-wise kernels, one block per row of `dim` elements; the block reduces in shared memory.
// CPU twins: whale_kernels::cpu::rmsnorm::rmsnorm_forward and cpu::softmax::softmax_forward.

// Sum of `v` over the block (blockDim.x a power of two, at most 1024), returned to every thread.
__device__ float block_sum(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    float total = shared[0];
    __syncthreads();
    return total;
}

__device__ float block_max(float v, float* shared) {
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

// y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), per row; rstd is saved for backward.
extern "C" __global__ void rmsnorm_forward_f32(
    const float* x, const float* w, float* y, float* rstd, unsigned dim, float eps) {
    extern __shared__ float shared[];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    float r = rsqrtf(block_sum(ss, shared) / (float)dim + eps);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = xr[i] * r * w[i];
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

// Softmax of each row, shifted by the row max.
extern "C" __global__ void softmax_forward_f32(const float* x, float* y, unsigned dim) {
    extern __shared__ float shared[];
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* yr = y + (size_t)blockIdx.x * dim;
    float m = -INFINITY;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) m = fmaxf(m, xr[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) s += expf(xr[i] - m);
    s = block_sum(s, shared);
    for (unsigned i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = expf(xr[i] - m) / s;
}
