// The block-scaled FP8 GEMM with promotion to f32 every 128 elements of K (spec deepseek-v3.md
// sections 4 and 8.1, DeepGEMM's numerics:
// y[i, j] = sum_kb a_s[i, kb] * b_s[j / b_rows_per_scale, kb] * sum_{k in kb} a[i, k] * b[j, k]).
// CPU twin: whale_kernels::cpu::fp8_gemm::fp8_gemm with Accumulation::F32.
#include <cuda_fp8.h>

#define BLOCK 128

__device__ float e4m3_to_f32(unsigned char c) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, __NV_E4M3);
    return __half2float(__half(h));
}

// y [m, n] = A [m, k] (scales [m / a_rows_per_scale.., k/128]) x B [n, k]^T (scales by rows of
// b_rows_per_scale): one thread per output, partial sums per 128-K block promoted to f32.
extern "C" __global__ void fp8_gemm_promoted(
    const unsigned char* a, const float* a_scales, unsigned a_rows_per_scale,
    const unsigned char* b, const float* b_scales, unsigned b_rows_per_scale,
    float* y, unsigned m, unsigned n, unsigned k) {
    unsigned i = blockIdx.y * blockDim.y + threadIdx.y;
    unsigned j = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m || j >= n) return;
    unsigned kb = (k + BLOCK - 1) / BLOCK;
    const unsigned char* ar = a + (size_t)i * k;
    const unsigned char* br = b + (size_t)j * k;
    float out = 0.0f;
    for (unsigned blk = 0; blk < kb; ++blk) {
        float partial = 0.0f;
        unsigned k1 = min(k, (blk + 1) * BLOCK);
        for (unsigned t = blk * BLOCK; t < k1; ++t) partial += e4m3_to_f32(ar[t]) * e4m3_to_f32(br[t]);
        float scale = a_scales[(i / a_rows_per_scale) * kb + blk] * b_scales[(j / b_rows_per_scale) * kb + blk];
        out += partial * scale;
    }
    y[(size_t)i * n + j] = out;
}
