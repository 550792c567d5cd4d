// Shared memory: the block's dynamic allocation and cp.async copies into it (sm_80+). Under
// WHALE_HOST_EMULATION the same functions come from emulate/cuda_host.h, which runs a kernel on
// the CPU (crates/kernels/tests/emulate.rs), so its indexing and pipelining can be checked on a
// machine without a GPU.
#pragma once

#ifdef WHALE_HOST_EMULATION
#include "emulate/cuda_host.h"
#else

// The block's dynamic shared memory (the launch's shared_mem_bytes), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
    extern __shared__ __align__(16) unsigned char whale_dynamic_smem[];
    return whale_dynamic_smem;
}

// Bytes of dynamic shared memory the launch gave the block.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

// The 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// Copies `bytes` (16 or 0) from global memory into 16 bytes of shared memory through L2 only,
// zero-filling the rest: an edge tile's missing rows arrive as zeros.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// The same for 4 bytes (4 or 0).
__device__ __forceinline__ void cp_async_4(unsigned dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

// Whole copies of 16 and 4 bytes (no zero-fill operand).
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_4(unsigned dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}

// Closes this thread's current group of copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Waits for every copy this thread issued, committed or not.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

#endif // WHALE_HOST_EMULATION
