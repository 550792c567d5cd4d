// uses: wgmma
// The block-scaled FP8 GEMM of fp8_gemm.cu on Hopper's warpgroup tensor cores (wgmma, sm_90a;
// DeepGEMM's structure without its TMA producer warps): the same interface and numerics,
// y[i, j] = sum_kb a_s[i, kb] * b_s[j / b_rows_per_scale, kb] * sum_{k in kb} a[i, k] * b[j, k].
// CPU twin: whale_kernels::cpu::fp8_gemm::fp8_gemm with Accumulation::F32.
//
// A block of two warpgroups (256 threads) computes a 128 x 128 tile of y; warpgroup w owns rows
// 64w .. 64w + 63. K advances one scale block (128) per step through a ring of STAGES
// shared-memory stages, each holding a 128 x 128 tile of A and of B (K-major, 128-byte swizzled,
// as wgmma reads them) and the 128 + 128 scales of that block, filled by cp.async STAGES - 1
// steps ahead of the tensor cores. Per step each warpgroup issues four m64n128k32 wgmmas into
// block partial sums (the first with scale-d = 0, which zeroes them), waits, and promotes them
// into f32 totals with the two scales: DeepGEMM's promotion every 128 of K, which keeps the
// tensor cores' limited-precision accumulation to one block.
// Needs k % 16 == 0 (16-byte copies); edges in M, N and K are zero-filled.
#include "sm90.cuh"

#define WG_TILE 128                               // rows of A, rows of B and K per stage
#define WG_STAGES 4
#define WG_OPERAND_BYTES (WG_TILE * WG_TILE)      // one E4M3 tile: 16 KB
#define WG_STAGE_BYTES (2 * WG_OPERAND_BYTES)     // A then B
#define WG_SCALES_BYTES (2 * WG_TILE * 4)         // a's then b's scales of a stage
// The launcher's shared_mem_bytes: the stages, their scales, and slack to align the first stage
// to 1024 bytes (the swizzle's period).
#define WG_SMEM_BYTES (1024 + WG_STAGES * (WG_STAGE_BYTES + WG_SCALES_BYTES))

// Issues the copies of K block `blk` into stage buffers `tiles` (shared address, A then B) and
// `scales` (generic pointer, a's 128 then b's 128): each thread copies four 16-byte chunks of
// each operand and one scale.
__device__ __forceinline__ void wg_load_stage(
    unsigned tiles, float* scales, const unsigned char* a, const float* a_scales, unsigned a_rows_per_scale,
    const unsigned char* b, const float* b_scales, unsigned b_rows_per_scale, unsigned m, unsigned n, unsigned k,
    unsigned row0, unsigned col0, unsigned blk, unsigned kb) {
#pragma unroll
    for (int i = 0; i < WG_OPERAND_BYTES / 16 / 256; ++i) {
        unsigned idx = threadIdx.x + i * 256, r = idx / 8, c = (idx % 8) * 16, kc = blk * WG_TILE + c;
        unsigned dst = tiles + sw128_offset(r, c);
        bool in_a = row0 + r < m && kc < k, in_b = col0 + r < n && kc < k;
        cp_async_16(dst, in_a ? a + (size_t)(row0 + r) * k + kc : a, in_a ? 16 : 0);
        cp_async_16(dst + WG_OPERAND_BYTES, in_b ? b + (size_t)(col0 + r) * k + kc : b, in_b ? 16 : 0);
    }
    unsigned t = threadIdx.x % WG_TILE, dst = smem_address(scales + threadIdx.x);
    if (threadIdx.x < WG_TILE) {
        bool in = row0 + t < m;
        cp_async_4(dst, in ? a_scales + ((row0 + t) / a_rows_per_scale) * kb + blk : a_scales, in ? 4 : 0);
    } else {
        bool in = col0 + t < n;
        cp_async_4(dst, in ? b_scales + ((col0 + t) / b_rows_per_scale) * kb + blk : b_scales, in ? 4 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) fp8_gemm_wgmma(
    const unsigned char* a, const float* a_scales, unsigned a_rows_per_scale,
    const unsigned char* b, const float* b_scales, unsigned b_rows_per_scale,
    float* y, unsigned m, unsigned n, unsigned k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(WHALE_HOST_EMULATION)
    if (dynamic_smem_bytes() < WG_SMEM_BYTES) __trap();
    unsigned char* raw = dynamic_shared_memory();
    unsigned raw_addr = smem_address(raw), tiles = (raw_addr + 1023) & ~1023u;
    float* scales = (float*)(raw + (tiles - raw_addr) + WG_STAGES * WG_STAGE_BYTES);
    unsigned wg = threadIdx.x / 128, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    unsigned row0 = blockIdx.y * WG_TILE, col0 = blockIdx.x * WG_TILE, kb = (k + WG_TILE - 1) / WG_TILE;
    // This thread's rows of the tile (see wgmma_m64n128k32_e4m3) and the first of its columns.
    unsigned row_lo = wg * 64 + warp * 16 + lane / 4, row_hi = row_lo + 8, col = 2 * (lane % 4);
    float total[64], partial[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) total[i] = 0.0f;

    // Prologue: the first STAGES - 1 blocks in flight (a group per stage, empty past the end, so
    // that the wait below always counts the same).
#pragma unroll
    for (unsigned s = 0; s < WG_STAGES - 1; ++s) {
        if (s < kb)
            wg_load_stage(tiles + s * WG_STAGE_BYTES, scales + s * 2 * WG_TILE, a, a_scales, a_rows_per_scale, b,
                          b_scales, b_rows_per_scale, m, n, k, row0, col0, s, kb);
        cp_async_commit();
    }
    for (unsigned blk = 0; blk < kb; ++blk) {
        unsigned s = blk % WG_STAGES;
        cp_async_wait<WG_STAGES - 2>(); // this thread's copies of block blk have landed
        fence_proxy_async();
        __syncthreads(); // everyone's have, and block blk - 1's stage is free (its wgmmas were waited on)
        unsigned next = blk + WG_STAGES - 1;
        if (next < kb) {
            unsigned ns = next % WG_STAGES;
            wg_load_stage(tiles + ns * WG_STAGE_BYTES, scales + ns * 2 * WG_TILE, a, a_scales, a_rows_per_scale, b,
                          b_scales, b_rows_per_scale, m, n, k, row0, col0, next, kb);
        }
        cp_async_commit();

        unsigned stage = tiles + s * WG_STAGE_BYTES;
        unsigned long long da = sw128_descriptor(stage + wg * 64 * WG_TILE);
        unsigned long long db = sw128_descriptor(stage + WG_OPERAND_BYTES);
        fence_accumulators(partial);
        wgmma_fence();
#pragma unroll
        for (int step = 0; step < WG_TILE / 32; ++step) wgmma_m64n128k32_e4m3(partial, da + 2 * step, db + 2 * step, step);
        wgmma_commit();
        wgmma_wait_all();
        fence_accumulators(partial);

        // Promotion: this block's partial sums times its two scales.
        const float* sa = scales + s * 2 * WG_TILE;
        const float* sb = sa + WG_TILE;
        float a_lo = sa[row_lo], a_hi = sa[row_hi];
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            float b0 = sb[8 * j + col], b1 = sb[8 * j + col + 1];
            total[4 * j + 0] += partial[4 * j + 0] * a_lo * b0;
            total[4 * j + 1] += partial[4 * j + 1] * a_lo * b1;
            total[4 * j + 2] += partial[4 * j + 2] * a_hi * b0;
            total[4 * j + 3] += partial[4 * j + 3] * a_hi * b1;
        }
    }
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            unsigned gr = row0 + (r < 2 ? row_lo : row_hi), gc = col0 + 8 * j + col + r % 2;
            if (gr < m && gc < n) y[(size_t)gr * n + gc] = total[4 * j + r];
        }
#else
    __trap(); // built for sm_90a only; the launcher takes fp8_gemm_mma elsewhere
#endif
}
