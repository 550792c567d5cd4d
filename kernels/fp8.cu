// FP8 (spec deepseek-v3.md section 4): 1x128 tile quantisation to E4M3 with f32 scales, and the
// block-scaled FP8 GEMM with promotion to f32 every 128 elements of K (DeepGEMM's numerics:
// y[i, j] = sum_kb a_s[i, kb] * b_s[j / 128, kb] * sum_{k in kb} a[i, k] * b[j, k]).
// CPU twins: whale_kernels::cpu::fp8::Fp8Blocks::quantize and cpu::fp8_gemm::fp8_gemm with
// Accumulation::F32. The conversions use CUDA's own E4M3 intrinsics (an independent
// implementation of the format: round to nearest even, saturating to 448).
#include <cuda_fp8.h>

#define BLOCK 128

// One block per 1x128 tile of a row-major [rows, cols] matrix: scale = max(amax, 1e-4) / 448,
// codes = x / scale as E4M3 (saturating). scales: [rows, ceil(cols / 128)].
extern "C" __global__ void fp8_quantize_1x128(
    const float* x, unsigned char* codes, float* scales, unsigned rows, unsigned cols) {
    __shared__ float amax[BLOCK];
    unsigned tiles = (cols + BLOCK - 1) / BLOCK;
    unsigned row = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    unsigned col = tile * BLOCK + threadIdx.x;
    float v = (row < rows && col < cols) ? x[(size_t)row * cols + col] : 0.0f;
    amax[threadIdx.x] = fabsf(v);
    __syncthreads();
    for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) amax[threadIdx.x] = fmaxf(amax[threadIdx.x], amax[threadIdx.x + s]);
        __syncthreads();
    }
    float scale = fmaxf(amax[0], 1e-4f) / 448.0f;
    if (row < rows && col < cols) {
        codes[(size_t)row * cols + col] = (unsigned char)__nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3);
    }
    if (threadIdx.x == 0 && row < rows) scales[row * tiles + tile] = scale;
}

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
