// Hopper (sm_90a) building blocks: the shared-memory matrix descriptors of the warpgroup MMA
// (wgmma) and the E4M3 wgmma itself (PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate"), beside shared_memory.cuh's cp.async copies that feed it. Under
// WHALE_HOST_EMULATION the same functions come from emulate/sm90_host.h, which runs them on the
// CPU (crates/kernels/tests/emulate.rs).
#pragma once

#include "shared_memory.cuh"

#ifdef WHALE_HOST_EMULATION
#include "emulate/sm90_host.h"
#else

// Orders this thread's writes to shared memory (the generic proxy; cp.async is one) before later
// reads by the async proxy, which is how wgmma reads its operands.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of wgmma accumulators across the asynchronous
// MMA (CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void fence_accumulators(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 128, f32) = A (64 x 32, E4M3) * B (128 x 32, E4M3)^T [+ d when `accumulate`], both
// operands K-major in shared memory, described by `a` and `b` (sw128_descriptor). Issued by all
// 128 threads of a warpgroup; thread (warp w, lane l) holds rows 16w + l/4 (+8) and columns
// 8j + 2(l%4) (+1): d[4j + r] is row 16w + l/4 + 8(r/2), column 8j + 2(l%4) + r%2. The zeroing
// is the instruction's own (scale-d), never a plain write to d: ptxas serializes wgmma whose
// accumulators other instructions define.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], unsigned long long a, unsigned long long b,
                                                      int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}

#endif // WHALE_HOST_EMULATION

// Where byte `col` (< 128) of row `row` of a K-major tile with 128-byte rows lies under the
// 128-byte swizzle (CUTLASS's Swizzle<3,4,3>): the row's eight 16-byte chunks are permuted by
// XOR with row % 8, so the eight rows of a core matrix hit distinct banks. The tile must start
// 1024-byte aligned, because the hardware applies the XOR to address bits [4, 7) from bits [7, 10).
__device__ __forceinline__ unsigned sw128_offset(unsigned row, unsigned col) {
    return row * 128 + ((((col >> 4) ^ row) & 7) << 4) + (col & 15);
}

// The wgmma descriptor of a K-major, 128-byte-swizzled tile at shared address `addr`: start
// address (bits 0-13, in 16-byte units), leading byte offset (bits 16-29; unused by swizzled
// K-major layouts, 1 by convention), stride byte offset (bits 32-45: 1024 bytes from one group
// of 8 rows to the next), base offset 0 (bits 49-51: the tile is 1024-byte aligned) and the
// layout type (bits 62-63: 1 is the 128-byte swizzle). Adding 2 to it steps 32 bytes along K,
// one k32 step of E4M3; the hardware swizzles the address it forms from the row and chunk.
__device__ __forceinline__ unsigned long long sw128_descriptor(unsigned addr) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
           (1ull << 62);
}
