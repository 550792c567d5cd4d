// Token embedding, one thread per output element. Forward gathers table rows; backward adds each
// gradient row into its table row with atomicAdd (repeated ids add up; the order of the adds,
// and so the last bits, may differ from the CPU twin's index order).
// CPU twins: whale_kernels::cpu::embedding::{embedding_forward, embedding_backward}.
extern "C" __global__ void embedding_forward_f32(
    const float* table, const unsigned* ids, float* out, unsigned n_ids, unsigned dim) {
    size_t n = (size_t)n_ids * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        out[i] = table[(size_t)ids[i / dim] * dim + i % dim];
    }
}

// `dtable` must be zeroed first.
extern "C" __global__ void embedding_backward_f32(
    const float* dout, const unsigned* ids, float* dtable, unsigned n_ids, unsigned dim) {
    size_t n = (size_t)n_ids * dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        atomicAdd(&dtable[(size_t)ids[i / dim] * dim + i % dim], dout[i]);
    }
}
