// uses: sm_89
// The block-scaled FP8 GEMM with promotion to f32 every 128 elements of K (spec deepseek-v3.md
// sections 4 and 8.1, DeepGEMM's numerics:
// y[i, j] = sum_kb a_s[i, kb] * b_s[j / b_rows_per_scale, kb] * sum_{k in kb} a[i, k] * b[j, k]).
// CPU twin: whale_kernels::cpu::fp8_gemm::fp8_gemm with Accumulation::F32.
#include <cuda_fp8.h>

#include "mma.cuh"

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

// The same product on the tensor cores (sm_89+: mma.sync m16n8k32 on E4M3 pairs, f32
// accumulators). A block of 256 threads computes a 128 x 128 tile of y; each K step stages a
// 128 x 128 tile of A and of B (exactly one scale block along K) in shared memory, the 8 warps
// (4 along M x 2 along N, 32 x 64 each) accumulate it on the tensor cores into per-block partial
// sums, and those are promoted into f32 totals with the two scales (DeepGEMM's promotion every
// 128 of K). The next K step's tiles are loaded into registers while this one multiplies.
// Needs k % 16 == 0 (16-byte rows); edges in M, N and K are zero-filled.
#define TILE 128
#define ROW_BYTES 144 // 128 + 16 of padding: the 8 rows a fragment load touches hit distinct banks
#define LOADS 4       // 16-byte chunks per thread per operand tile: 128 * 128 / 16 / 256

__device__ __forceinline__ void load_tile(
    uint4 (&regs)[LOADS], const unsigned char* src, unsigned rows, unsigned k, unsigned row0, unsigned k0) {
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        unsigned idx = threadIdx.x + i * 256, r = idx / 8, c = (idx % 8) * 16;
        bool in = row0 + r < rows && k0 + c < k;
        regs[i] = in ? *(const uint4*)(src + (size_t)(row0 + r) * k + k0 + c) : make_uint4(0, 0, 0, 0);
    }
}

__device__ __forceinline__ void store_tile(unsigned char* tile, const uint4 (&regs)[LOADS]) {
    #pragma unroll
    for (int i = 0; i < LOADS; ++i) {
        unsigned idx = threadIdx.x + i * 256, r = idx / 8, c = (idx % 8) * 16;
        *(uint4*)(tile + r * ROW_BYTES + c) = regs[i];
    }
}

// Where accumulator r of fragment (i, j) lies in a warp's 32 x 64 corner for lane (g = lane / 4,
// t = lane % 4): c0, c1 are row g, columns 2t and 2t + 1 of the 16 x 8 fragment; c2, c3 row g + 8.
__device__ __forceinline__ unsigned frag_row(int i, unsigned g, int r) { return i * 16 + g + (r / 2) * 8; }
__device__ __forceinline__ unsigned frag_col(int j, unsigned t, int r) { return j * 8 + t * 2 + r % 2; }

// A warp's accumulators: 2 x 8 fragments of 16 x 8, four floats per thread each.
typedef float Accumulators[2][8][4];

__device__ __forceinline__ void zero(Accumulators& x) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) x[i][j][r] = 0.0f;
}

extern "C" __global__ void __launch_bounds__(256, 1) fp8_gemm_mma(
    const unsigned char* a, const float* a_scales, unsigned a_rows_per_scale,
    const unsigned char* b, const float* b_scales, unsigned b_rows_per_scale,
    float* y, unsigned m, unsigned n, unsigned k) {
#if __CUDA_ARCH__ >= 890 || defined(WHALE_HOST_EMULATION)
    __shared__ __align__(16) unsigned char sa[TILE * ROW_BYTES];
    __shared__ __align__(16) unsigned char sb[TILE * ROW_BYTES];
    __shared__ float scale_a[TILE], scale_b[TILE];
    unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    unsigned wm = (warp % 4) * 32, wn = (warp / 4) * 64; // this warp's corner in the tile
    unsigned row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE, kb = (k + TILE - 1) / TILE;
    Accumulators total, partial;
    zero(total);
    uint4 next_a[LOADS], next_b[LOADS];
    load_tile(next_a, a, m, k, row0, 0);
    load_tile(next_b, b, n, k, col0, 0);
    for (unsigned blk = 0; blk < kb; ++blk) {
        store_tile(sa, next_a);
        store_tile(sb, next_b);
        if (threadIdx.x < TILE) {
            unsigned r = row0 + threadIdx.x;
            scale_a[threadIdx.x] = r < m ? a_scales[(r / a_rows_per_scale) * kb + blk] : 0.0f;
        } else {
            unsigned c = col0 + threadIdx.x - TILE;
            scale_b[threadIdx.x - TILE] = c < n ? b_scales[(c / b_rows_per_scale) * kb + blk] : 0.0f;
        }
        __syncthreads();
        if (blk + 1 < kb) { // in flight while the tensor cores work on this block
            load_tile(next_a, a, m, k, row0, (blk + 1) * TILE);
            load_tile(next_b, b, n, k, col0, (blk + 1) * TILE);
        }
        zero(partial);
        #pragma unroll
        for (unsigned k0 = 0; k0 < TILE; k0 += 32) {
            unsigned fa[2][4], fb[8][2];
            #pragma unroll
            for (int i = 0; i < 2; ++i) {
                const unsigned char* p = sa + (wm + i * 16 + g) * ROW_BYTES + k0 + t * 4;
                fa[i][0] = *(const unsigned*)p;
                fa[i][1] = *(const unsigned*)(p + 8 * ROW_BYTES);
                fa[i][2] = *(const unsigned*)(p + 16);
                fa[i][3] = *(const unsigned*)(p + 8 * ROW_BYTES + 16);
            }
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                const unsigned char* p = sb + (wn + j * 8 + g) * ROW_BYTES + k0 + t * 4;
                fb[j][0] = *(const unsigned*)p;
                fb[j][1] = *(const unsigned*)(p + 16);
            }
            #pragma unroll
            for (int i = 0; i < 2; ++i)
                #pragma unroll
                for (int j = 0; j < 8; ++j) mma_m16n8k32_e4m3(partial[i][j], fa[i], fb[j]);
        }
        // Promotion: each block's partial sums times its two scales.
        #pragma unroll
        for (int i = 0; i < 2; ++i)
            #pragma unroll
            for (int j = 0; j < 8; ++j)
                #pragma unroll
                for (int r = 0; r < 4; ++r)
                    total[i][j][r] += partial[i][j][r] * scale_a[wm + frag_row(i, g, r)] * scale_b[wn + frag_col(j, t, r)];
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i)
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                unsigned gr = row0 + wm + frag_row(i, g, r), gc = col0 + wn + frag_col(j, t, r);
                if (gr < m && gc < n) y[(size_t)gr * n + gc] = total[i][j][r];
            }
#else
    __trap(); // the launcher takes fp8_gemm_promoted below sm_89
#endif
}
