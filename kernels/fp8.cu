// FP8 quantisation (spec deepseek-v3.md section 4): 1x128 tiles to E4M3 with f32 scales.
// CPU twin: whale_kernels::cpu::fp8::Fp8Blocks::quantize. The conversions use CUDA's own E4M3
// intrinsics (an independent implementation of the format: round to nearest even, saturating to
// 448).
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
