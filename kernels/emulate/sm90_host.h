// A host emulation of the CUDA pieces sm90.cuh's kernels use, for checking a kernel's own logic
// (its indexing, swizzles, pipeline, edges and promotion) on a machine without a GPU: every
// thread of a block is a std::thread, __syncthreads a std::barrier, shared memory one array whose
// offsets are the shared addresses, cp.async a copy done at once, and wgmma computed by each
// thread for its own accumulators from the operands its descriptors point at, as the PTX ISA
// defines the K-major 128-byte-swizzled layout and the m64nNk32 accumulator fragment. What it
// cannot check is the hardware itself; the GPU test does that (crates/kernels/tests/cuda.rs).
// Driven by crates/kernels/tests/emulate.rs.
#pragma once

#include <barrier>
#include <deque>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline std::barrier<>* block_barrier = nullptr;
// A block's shared memory; an offset into it is a shared address.
constexpr unsigned kSharedBytes = 232448; // an H200's 227 KB per block
alignas(1024) inline unsigned char shared_window[kSharedBytes];
// On a GPU the dynamic part need not start 1024-aligned; start it off so kernels must align it.
constexpr unsigned kDynamicOffset = 16;

// cp.async lands late: a thread's copies wait in their commit groups until cp_async_wait lets
// them through, so a kernel that reads a stage before waiting for it reads stale bytes.
struct Copy {
    unsigned dst, size, bytes;
    const void* src;
};
inline thread_local std::vector<Copy> open_group;
inline thread_local std::deque<std::vector<Copy>> committed;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emulation: %s\n", what);
    std::abort();
}

// Runs `kernel` over `grid` blocks of `threads` threads, one block at a time, with shared memory
// filled with a finite non-zero E4M3 pattern so that reading what was never written shows.
template <class Kernel>
void launch(dim3 grid, unsigned threads, Kernel kernel) {
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::memset(shared_window, 0x3b, sizeof shared_window);
            std::barrier<> barrier(threads);
            block_barrier = &barrier;
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t)
                pool.emplace_back([=] {
                    thread_idx = dim3{t, 0, 0};
                    block_idx = dim3{bx, by, 0};
                    kernel();
                    open_group.clear(); // what a kernel left in flight dies with it
                    committed.clear();
                });
            for (auto& th : pool) th.join();
        }
}

// E4M3 (bias 7, no infinities; 0x7f and 0xff are NaN) to f32.
inline float e4m3(unsigned char c) {
    int sign = c >> 7, exp = (c >> 3) & 15, man = c & 7;
    if (exp == 15 && man == 7) fail("NaN E4M3 operand");
    float v = exp == 0 ? man / 8.0f / 64.0f : (1.0f + man / 8.0f) * float(1 << exp) / 128.0f;
    return sign ? -v : v;
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
    if (addr >= kSharedBytes) fail("descriptor: address past shared memory");
    return shared_window[addr];
}
} // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
[[noreturn]] inline void __trap() { emu::fail("__trap"); }

inline unsigned smem_address(const void* p) {
    auto d = static_cast<const unsigned char*>(p) - emu::shared_window;
    if (d < 0 || d >= long(emu::kSharedBytes)) emu::fail("smem_address: not shared memory");
    return unsigned(d);
}
inline unsigned char* dynamic_shared_memory() { return emu::shared_window + emu::kDynamicOffset; }


inline void cp_async(unsigned dst, const void* src, unsigned size, unsigned bytes) {
    if (dst % size != 0) emu::fail("cp.async: misaligned shared address");
    if (reinterpret_cast<unsigned long>(src) % size != 0) emu::fail("cp.async: misaligned global address");
    if (bytes != 0 && bytes != size) emu::fail("cp.async: partial copy");
    if (dst + size > emu::kSharedBytes) emu::fail("cp.async: past shared memory");
    emu::open_group.push_back({dst, size, bytes, src});
}
inline void cp_async_16(unsigned dst, const void* src, unsigned bytes) { cp_async(dst, src, 16, bytes); }
inline void cp_async_4(unsigned dst, const void* src, unsigned bytes) { cp_async(dst, src, 4, bytes); }
inline void cp_async_commit() {
    emu::committed.push_back(std::move(emu::open_group));
    emu::open_group.clear();
}
template <int N>
inline void cp_async_wait() {
    while (emu::committed.size() > unsigned(N)) {
        for (const emu::Copy& c : emu::committed.front()) {
            std::memset(emu::shared_window + c.dst, 0, c.size);
            std::memcpy(emu::shared_window + c.dst, c.src, c.bytes);
        }
        emu::committed.pop_front();
    }
}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
inline void wgmma_wait_all() {}
inline void fence_accumulators(float (&)[64]) {}

// Thread (warp w, lane l) of the warpgroup computes its fragment: d[4j + r] is row
// 16w + l/4 + 8(r/2), column 8j + 2(l%4) + r%2.
inline void wgmma_m64n128k32_e4m3(float (&d)[64], unsigned long long a, unsigned long long b, int accumulate) {
    unsigned t = threadIdx.x % 128, w = t / 32, l = t % 32;
    for (unsigned j = 0; j < 16; ++j)
        for (unsigned r = 0; r < 4; ++r) {
            unsigned row = 16 * w + l / 4 + 8 * (r / 2), col = 8 * j + 2 * (l % 4) + r % 2;
            float acc = accumulate ? d[4 * j + r] : 0.0f;
            for (unsigned kk = 0; kk < 32; ++kk) acc += emu::e4m3(emu::operand(a, row, kk)) * emu::e4m3(emu::operand(b, col, kk));
            d[4 * j + r] = acc;
        }
}
