// Warp-level tensor-core MMA (mma.sync, sm_89+). Under WHALE_HOST_EMULATION the same function
// comes from emulate/mma_host.h, which computes it from the fragments the PTX ISA defines, so a
// kernel's fragment loads and stores can be checked on a machine without a GPU.
#pragma once

#ifdef WHALE_HOST_EMULATION
#include "emulate/mma_host.h"
#else

// c += A * B for one warp: A a 16 x 32 E4M3 tile (row-major fragment: a[0] row g, bytes k = 4t..4t+3;
// a[1] row g + 8; a[2], a[3] the same rows at k + 16), B a 32 x 8 E4M3 tile (column fragment:
// b[0] column g, k = 4t..4t+3; b[1] at k + 16), c the f32 accumulators of row g (c[0], c[1]) and
// g + 8 (c[2], c[3]) at columns 2t, 2t + 1; g = lane / 4, t = lane % 4.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

#endif
