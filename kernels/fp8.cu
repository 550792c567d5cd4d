// FP8 quantisation (spec deepseek-v3.md section 4): 1x128 activation tiles and 128x128 weight
// blocks to E4M3 with f32 or power-of-two scales, and dequantisation of either tiling (E4M3 or
// E5M2 codes).
// CPU twins: whale_kernels::cpu::fp8::Fp8Blocks::quantize and ::dequantize. The conversions use
// CUDA's own FP8 intrinsics (an independent implementation of the formats: round to nearest even,
// saturating to 448).
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#define BLOCK 128

// Each quantiser scales a tile for max(amax, min_amax): 1e-4 for activations and weights (the
// reference's clamp, MIN_AMAX), the least that keeps the scale a normal f32 for output gradients
// (GRADIENT_MIN_AMAX), so that only an all-zero tile is guarded there. With pow2 set the scale is
// then rounded up to a power of two (UE8M0 scales: DeepSeek-V3.1's `scale_fmt`, and V3's FP8
// dispatch).

// The least power of two at or above s (positive; the floors keep it a normal f32), its exponent
// read from the bits as the reference's fast_log2_ceil reads it. Twin: cpu::fp8::pow2_ceil.
__device__ __forceinline__ float pow2_ceil(float s) {
    unsigned bits = __float_as_uint(s);
    int exponent = (int)((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0);
    return __uint_as_float((unsigned)(exponent + 127) << 23);
}

// A tile's scale for its amax.
__device__ __forceinline__ float tile_scale(float amax, float min_amax, int pow2) {
    float scale = fmaxf(amax, min_amax) / 448.0f;
    return pow2 ? pow2_ceil(scale) : scale;
}

// One block per 1x128 tile of a row-major [rows, cols] matrix: scale = tile_scale(amax),
// codes = x / scale as E4M3 (saturating). scales: [rows, ceil(cols / 128)].
extern "C" __global__ void fp8_quantize_1x128(
    const float* x, unsigned char* codes, float* scales, unsigned rows, unsigned cols, float min_amax, int pow2) {
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
    float scale = tile_scale(amax[0], min_amax, pow2);
    if (row < rows && col < cols) {
        codes[(size_t)row * cols + col] = (unsigned char)__nv_cvt_float_to_fp8(v / scale, __NV_SATFINITE, __NV_E4M3);
    }
    if (threadIdx.x == 0 && row < rows) scales[row * tiles + tile] = scale;
}

// The 1x128 quantisation of x^T without forming it: x [rows, cols] is read in tiles of 128 rows
// x 32 columns (coalesced along the columns), each column's 128 values are one tile of x^T,
// and the codes are written transposed, codes [cols, ld] (ld >= rows; the launcher zeroes the
// padding, which a GEMM's K may then cover: E4M3 zero codes add nothing) with scales
// [cols, ceil(rows / 128)]: exactly fp8_quantize_1x128 of the transpose (the Wgrad GEMM's
// operands, tiled along the tokens). Grid (ceil(rows / 128), ceil(cols / 32)), 256 threads.
extern "C" __global__ void fp8_quantize_1x128_transposed(
    const float* x, unsigned char* codes, float* scales, unsigned rows, unsigned cols, unsigned ld, float min_amax,
    int pow2) {
    __shared__ float tile[BLOCK][33];
    __shared__ float warp_max[8][32];
    __shared__ float scale[32];
    unsigned r0 = blockIdx.x * BLOCK, c0 = blockIdx.y * 32, tiles = (rows + BLOCK - 1) / BLOCK;
    for (unsigned i = threadIdx.x; i < BLOCK * 32; i += blockDim.x) {
        unsigned r = i / 32, c = i % 32;
        tile[r][c] = (r0 + r < rows && c0 + c < cols) ? x[(size_t)(r0 + r) * cols + c0 + c] : 0.0f;
    }
    __syncthreads();
    // Each warp takes 16 of the 128 rows, lane = column; a max is the same in any order.
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float m = 0.0f;
    for (unsigned r = warp * 16; r < warp * 16 + 16; ++r) m = fmaxf(m, fabsf(tile[r][lane]));
    warp_max[warp][lane] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float amax = 0.0f;
        for (unsigned w = 0; w < 8; ++w) amax = fmaxf(amax, warp_max[w][threadIdx.x]);
        float s = tile_scale(amax, min_amax, pow2);
        scale[threadIdx.x] = s;
        if (c0 + threadIdx.x < cols) scales[(size_t)(c0 + threadIdx.x) * tiles + blockIdx.x] = s;
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < BLOCK * 32; i += blockDim.x) {
        unsigned c = i / BLOCK, r = i % BLOCK;
        if (r0 + r < rows && c0 + c < cols) {
            codes[(size_t)(c0 + c) * ld + r0 + r] =
                (unsigned char)__nv_cvt_float_to_fp8(tile[r][c] / scale[c], __NV_SATFINITE, __NV_E4M3);
        }
    }
}

#define BLOCK_THREADS 256 // threads of a 128x128 block: two rows of 128 columns per step

// One block of BLOCK_THREADS threads per 128x128 block of a row-major [rows, cols] matrix (the
// bottom and right blocks may be partial: their amax covers only the elements that exist, which
// equals zero-padding them). scale = tile_scale(amax), codes = x / scale as E4M3 (saturating).
// scales: [ceil(rows / 128), ceil(cols / 128)], row-major.
extern "C" __global__ void fp8_quantize_128x128(
    const float* x, unsigned char* codes, float* scales, unsigned rows, unsigned cols, float min_amax, int pow2) {
    __shared__ float amax[BLOCK_THREADS];
    unsigned grid_cols = (cols + BLOCK - 1) / BLOCK;
    unsigned bi = blockIdx.x / grid_cols, bj = blockIdx.x % grid_cols;
    unsigned col = bj * BLOCK + threadIdx.x % BLOCK, step = BLOCK_THREADS / BLOCK;
    unsigned r0 = bi * BLOCK + threadIdx.x / BLOCK, r1 = min(rows, (bi + 1) * BLOCK);
    float m = 0.0f;
    if (col < cols) {
        for (unsigned r = r0; r < r1; r += step) m = fmaxf(m, fabsf(x[(size_t)r * cols + col]));
    }
    amax[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = BLOCK_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) amax[threadIdx.x] = fmaxf(amax[threadIdx.x], amax[threadIdx.x + s]);
        __syncthreads();
    }
    float scale = tile_scale(amax[0], min_amax, pow2);
    if (col < cols) {
        for (unsigned r = r0; r < r1; r += step) {
            size_t i = (size_t)r * cols + col;
            codes[i] = (unsigned char)__nv_cvt_float_to_fp8(x[i] / scale, __NV_SATFINITE, __NV_E4M3);
        }
    }
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

// codes [rows, cols] in blocks of block_rows x block_cols with scales [ceil(rows / block_rows),
// ceil(cols / block_cols)] -> out [rows, cols] = decode(code) * scale, one thread per element
// (grid-stride). Every E4M3 and E5M2 value is exact in half precision, so decoding through it
// is exact; e5m2 selects the format.
extern "C" __global__ void fp8_dequantize(
    const unsigned char* codes, const float* scales, float* out, unsigned rows, unsigned cols,
    unsigned block_rows, unsigned block_cols, int e5m2) {
    size_t n = (size_t)rows * cols;
    unsigned grid_cols = (cols + block_cols - 1) / block_cols;
    __nv_fp8_interpretation_t fmt = e5m2 ? __NV_E5M2 : __NV_E4M3;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned r = i / cols, c = i % cols;
        float v = __half2float(__half(__nv_cvt_fp8_to_halfraw(codes[i], fmt)));
        out[i] = v * scales[(r / block_rows) * grid_cols + c / block_cols];
    }
}

// y [cols, rows] = x [rows, cols]^T through 32 x 32 tiles in shared memory (coalesced reads and
// writes; the padding column keeps the transposed reads off one bank), launched on a grid of
// (ceil(cols / 32), ceil(rows / 32)) blocks of 32 x 8 threads: an FP8 weight's codes and its
// scale grid for the Dgrad GEMM (128x128 blocks are square, so both simply transpose). CPU twin:
// whale_kernels::cpu::fp8::transpose.
template <typename T>
__device__ void transpose_tiles(const T* x, T* y, unsigned rows, unsigned cols) {
    __shared__ T tile[32][33];
    unsigned c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (unsigned j = threadIdx.y; j < 32; j += blockDim.y) {
        unsigned r = r0 + j, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[j][threadIdx.x] = x[(size_t)r * cols + c];
    }
    __syncthreads();
    for (unsigned j = threadIdx.y; j < 32; j += blockDim.y) {
        unsigned r = c0 + j, c = r0 + threadIdx.x; // row of y = column of x
        if (r < cols && c < rows) y[(size_t)r * rows + c] = tile[threadIdx.x][j];
    }
}

extern "C" __global__ void fp8_transpose_codes(const unsigned char* x, unsigned char* y, unsigned rows, unsigned cols) {
    transpose_tiles(x, y, rows, cols);
}

extern "C" __global__ void fp8_transpose_scales(const float* x, float* y, unsigned rows, unsigned cols) {
    transpose_tiles(x, y, rows, cols);
}
