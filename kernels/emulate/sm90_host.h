// sm90.cuh's functions on the host (see cuda_host.h): the proxy fence and wgmma's fences are
// no-ops (copies land when waited for), and each thread computes its own accumulators of the
// E4M3 wgmma from the operands its descriptors point at, as the PTX ISA defines the K-major
// 128-byte-swizzled layout and the m64nNk32 accumulator fragment, with the limited-precision
// accumulation Hopper is measured to have (hopper_fp8_step). wgmma is asynchronous as on
// the GPU, at its latest: an MMA runs when its group is waited for, reading shared memory and its
// accumulators then. So a kernel that refills a stage, or reads or writes the accumulators,
// before waiting for the MMAs on them gets wrong results; one that never waits fails.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "cuda_host.h"

namespace emu {

// E4M3 (bias 7, no infinities; 0x7f and 0xff are NaN) to f32.
inline float e4m3_decoded(unsigned char c) {
    int sign = c >> 7, exp = (c >> 3) & 15, man = c & 7;
    float v = exp == 0 ? man / 8.0f / 64.0f : (1.0f + man / 8.0f) * float(1 << exp) / 128.0f;
    return sign ? -v : v;
}

// Every byte's value, decoded once: the MMAs read each operand byte many times.
inline const std::array<float, 256> kE4m3 = [] {
    std::array<float, 256> t{};
    for (unsigned c = 0; c < 256; ++c) t[c] = e4m3_decoded((unsigned char)c);
    return t;
}();

inline float e4m3(unsigned char c) {
    if ((c & 0x7f) == 0x7f) fail("NaN E4M3 operand");
    return kE4m3[c];
}

// Byte `kk` (< 32) of row `row` of a wgmma operand: the K-major, 128-byte-swizzled canonical
// layout ((8, m), (16, 2)) : ((128 B, SBO), (1 B, 16 B)) from the descriptor's start address,
// with the swizzle applied to the address formed (bits [4, 7) ^= bits [7, 10)).
inline unsigned char operand(unsigned long long desc, unsigned row, unsigned kk) {
    if (desc >> 62 != 1) fail("descriptor: not the 128-byte swizzle");
    if (((desc >> 49) & 7) != 0) fail("descriptor: non-zero base offset");
    unsigned start = unsigned(desc & 0x3FFF) << 4, sbo = unsigned((desc >> 32) & 0x3FFF) << 4;
    unsigned addr = start + (row / 8) * sbo + (row % 8) * 128 + kk;
    addr ^= ((addr >> 7) & 7) << 4;
    if (addr < kDynamicOffset || addr >= kDynamicOffset + block->smem_bytes)
        fail("descriptor: outside the launch's shared memory");
    return shared_window[addr];
}

// Hopper's FP8 tensor-core accumulation as DeepSeek-V3's report (section 3.5.2) and
// SageAttention2 measured it: the 32 exact products of a k32 step are aligned to the largest
// one's exponent and keep the 14 high bits of each sign-filled right shift (a floor to a multiple
// of 2^(e_max - 13)); the accumulator they are added to keeps 13 mantissa bits (the low 10 bits
// of its f32 zeroed, on the way in and on the way out). A model, not NVIDIA's documentation: a
// kernel that promotes every 128 of K keeps this error to a block, and tests bound it.
inline float truncated_13(double x) {
    if (x == 0.0 || !std::isfinite(x)) return float(x);
    unsigned long long bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits &= ~((1ull << (52 - 13)) - 1); // a double's 52 mantissa bits down to 13, toward zero
    std::memcpy(&x, &bits, sizeof bits);
    return float(x); // exact: 14 significant bits
}

inline float hopper_fp8_step(float c, const float* a, const float* b) {
    double products[32], largest = 0.0;
    for (unsigned k = 0; k < 32; ++k) {
        products[k] = double(a[k]) * b[k]; // exact: 4-bit significands
        largest = std::max(largest, std::fabs(products[k]));
    }
    double sum = 0.0;
    if (largest > 0.0) {
        double quantum = std::ldexp(1.0, std::ilogb(largest) - 13);
        for (unsigned k = 0; k < 32; ++k) sum += std::floor(products[k] / quantum) * quantum; // exact
    }
    return truncated_13(double(truncated_13(c)) + sum);
}

} // namespace emu

inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void fence_accumulators(float (&)[64]) {}

inline void wgmma_commit() { emu::block->current->mmas.commit(); }

// Runs every committed group but the newest N.
template <int N>
inline void wgmma_wait() {
    emu::block->current->mmas.wait(N);
}

inline void wgmma_wait_all() { wgmma_wait<0>(); }

// Thread (warp w, lane l) of the warpgroup computes its fragment: d[4j + r] is row
// 16w + l/4 + 8(r/2), column 8j + 2(l%4) + r%2. Issued now, run when waited for.
inline void wgmma_m64n128k32_e4m3(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    unsigned t = threadIdx.x % 128, w = t / 32, l = t % 32;
    emu::block->current->mmas.open.push_back([&d, a, b, accumulate, w, l] {
        // The fragment's two rows of A and 32 columns of B (column 8j + 2(l%4) + h is cols[2j + h]),
        // each operand byte read and decoded once.
        float rows[2][32], cols[32][32];
        for (unsigned h = 0; h < 2; ++h)
            for (unsigned kk = 0; kk < 32; ++kk) rows[h][kk] = emu::e4m3(emu::operand(a, 16 * w + l / 4 + 8 * h, kk));
        for (unsigned c = 0; c < 32; ++c)
            for (unsigned kk = 0; kk < 32; ++kk)
                cols[c][kk] = emu::e4m3(emu::operand(b, 8 * (c / 2) + 2 * (l % 4) + c % 2, kk));
        for (unsigned j = 0; j < 16; ++j)
            for (unsigned r = 0; r < 4; ++r) {
                const float *ar = rows[r / 2], *bc = cols[2 * j + r % 2];
                d[4 * j + r] = emu::hopper_fp8_step(accumulate ? d[4 * j + r] : 0.0f, ar, bc);
            }
    });
}
