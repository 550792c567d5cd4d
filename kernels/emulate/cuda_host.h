// CUDA on the host, for checking a kernel's own logic (indexing, tiling, shared-memory layout,
// pipelining, edges) on a machine without a GPU: a kernel file compiled as C++ with
// WHALE_HOST_EMULATION gets these definitions in place of shared_memory.cuh's PTX (and
// sm90_host.h, mma_host.h those of sm90.cuh's wgmma and mma.cuh's mma.sync).
// - Every CUDA thread of a block runs on a fiber of one OS thread, until it waits; blocks run one
//   after another. Runs are deterministic. A fiber (its own stack) runs thread i of every block
//   in turn. A thread that waits hands over to the next unfinished one directly, in order, and
//   the last of a pass to the scheduler, which starts the next pass. On x86-64 a switch saves the
//   callee-saved registers on the fiber's stack and swaps stack pointers, a dozen instructions
//   (switch_stack); elsewhere it is swapcontext, which makes a system call for the signal mask
//   and is several times slower.
// - __syncthreads and the warp shuffles are barriers: a fiber waits until every thread of its
//   block (warp) has arrived. When every unfinished fiber waits and none can go on (threads
//   waiting at barriers the others never reach) the run stops with an error.
// - Dynamic shared memory is one array; an offset into it is a shared address. A static
//   `__shared__` array is a function-local `static` (in section whale_shared): one per kernel,
//   which every thread of the running block sees (blocks run one at a time). Both start each block
//   filled with a non-zero pattern, so reading what was never written shows.
// - cp.async copies land either when their group is waited for (lazy: a kernel that reads a
//   stage before waiting for it reads stale bytes) or as soon as they are issued (eager: a
//   kernel that refills a stage some thread has yet to read, a write-after-read race, corrupts
//   it, since the fibers run in order). Drivers run every case both ways (emu::eager_copies).
// - Fences are no-ops: leaving one out is not caught here.
// - A failure (deadlock, misaligned copy, __trap, or a fault: an access outside the buffers, an
//   integer division by zero) ends the launch with a std::runtime_error thrown from
//   emu::launch, on the caller's stack, naming the thread and block.
// - Arithmetic is the host's: with -ffp-contract=off, __fmul_rn / __fadd_rn and plain operators
//   round as the GPU's do; expf, logf, tanhf and powf may differ from CUDA's in the last bits.
// What it cannot check is the hardware itself; the GPU tests do that (crates/kernels/tests).
// Driven by crates/kernels/tests/emulate.rs (standalone drivers, emulate/*.cpp) and by the
// emulated driver (emulate/driver.cpp), which launches every module's kernels through
// emulate/launch.h.
#pragma once

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// GCC treats swapcontext like setjmp and warns that locals live across it may be clobbered; a
// context switch saves and restores every register, so they are not.
#pragma GCC diagnostic ignored "-Wclobbered"

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays live in a section of their own, so each block can start with them filled
// with garbage too (the linker brackets the section with __start_ / __stop_ symbols).
#define __shared__ static __attribute__((section("whale_shared")))
extern "C" unsigned char __start_whale_shared[] __attribute__((weak, visibility("hidden")));
extern "C" unsigned char __stop_whale_shared[] __attribute__((weak, visibility("hidden")));
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

namespace emu {

[[noreturn]] inline void fail(const char* what);

// One thread's asynchronous operations of a kind (cp.async copies; wgmma's MMAs, sm90_host.h):
// issued into an open group, committed, and run when waited for, oldest group first.
struct AsyncGroups {
    std::vector<std::function<void()>> open;
    std::deque<std::vector<std::function<void()>>> committed;

    void commit() {
        committed.push_back(std::move(open));
        open.clear();
    }
    // Runs every committed group but the newest n.
    void wait(unsigned n) {
        for (; committed.size() > n; committed.pop_front())
            for (auto& op : committed.front()) op();
    }
    bool pending() const { return !open.empty() || !committed.empty(); }
    void clear() {
        open.clear();
        committed.clear();
    }
};

struct Barrier {
    unsigned expected = 0, arrived = 0, generation = 0;
};

// Where a switch goes back to: the scheduler, or a fiber that waits.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr; // the rest (the callee-saved registers, where to return) is on that stack
};

// Saves the running code's callee-saved registers on its stack and its stack pointer in *save,
// then goes on where `load` was saved. To the compiler it is a plain call that preserves those
// registers, so no local can be clobbered. (The x87 and SSE control words are never changed
// here, so they are not saved.)
__attribute__((naked, noinline)) inline void switch_stack(void** /*save*/, void* /*load*/) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

inline void switch_context(Context& from, const Context& to) { switch_stack(&from.sp, to.sp); }

// Makes `c` start `entry` (which never returns) on the stack [stack, stack + bytes): the first
// switch to it pops six zero registers and returns into `entry`, whose own return address, never
// used, is zero. The ABI's alignment holds: rsp + 8 is 16-aligned on entry.
inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top);
    *--slot = nullptr; // entry's return address
    *--slot = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--slot = nullptr;
    c.sp = slot;
}
#else
struct Context {
    ucontext_t uc;
};

inline void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }

inline void make_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr; // entry never returns
    makecontext(&c.uc, entry, 0);
}
#endif

// Goes to `to` for good: the running fiber is abandoned mid-thread.
[[noreturn]] inline void jump_to(const Context& to) {
    Context abandoned;
    switch_context(abandoned, to);
    __builtin_unreachable();
}

struct Thread {
    dim3 idx;
    unsigned linear = 0; // x + y * blockDim.x + z * blockDim.x * blockDim.y: warps are runs of 32
    bool done = false;
    AsyncGroups copies, mmas;
};

struct Block {
    dim3 idx, dim, grid;
    unsigned smem_bytes = 0;
    std::vector<Thread> threads;
    Thread* current = nullptr;
    Context scheduler;           // where the last fiber of a pass, or one that fails, goes back to
    Barrier all;                 // __syncthreads
    std::vector<Barrier> warps;  // the shuffles'
    std::vector<float> shuffled; // two values per thread (__shfl_xor_sync)
    std::vector<unsigned> exchange; // words per thread for warp-collective instructions (mma_host.h)
    unsigned long progress = 0;  // arrivals and finished threads: a pass without any is a deadlock
    std::string failure;         // set by a fiber that failed, which then never runs again
    volatile bool faulted = false; // set by on_fault (the message in fault_message)
};

inline Block* block = nullptr;
inline bool eager_copies = false; // see the top of this file
inline const std::function<void()>* body = nullptr;

constexpr unsigned kSharedBytes = 232448; // an H200's 227 KB per block
alignas(1024) inline unsigned char shared_window[kSharedBytes];
// On a GPU the dynamic part need not start 1024-aligned; start it off so kernels must align it.
constexpr unsigned kDynamicOffset = 16;
constexpr size_t kStackBytes = 128 * 1024;

// The fiber that runs thread i of each block: a stack, and where it goes on (its start, mid-thread
// after a wait, or at the next block's thread).
struct Fiber {
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    Context resume;
    bool started = false; // false: start afresh (new, or its stack abandoned by a failure)
};

// Kept from block to block and launch to launch (a ucontext_t points into itself: never moved).
inline std::vector<std::unique_ptr<Fiber>> fibers;

[[noreturn]] inline void fail(const char* what) {
    if (block && block->current) { // a fiber: hand the failure to the scheduler, never to resume
        block->failure = what;
        jump_to(block->scheduler);
    }
    throw std::runtime_error(std::string("emulation: ") + what);
}

inline void fiber_main();

// The fiber of thread `t`, ready to be switched to (started afresh if it never ran or a failure
// abandoned its stack).
inline Fiber& ready(Thread& t) {
    Fiber& f = *fibers[t.linear];
    if (!f.started) make_context(f.resume, f.stack.get(), kStackBytes, fiber_main);
    f.started = true;
    return f;
}

// The first unfinished thread of block `b` from `t` on (in order), or null.
inline Thread* next_unfinished(Block& b, Thread* t) {
    for (Thread* end = b.threads.data() + b.threads.size(); t != end; ++t)
        if (!t->done) return t;
    return nullptr;
}

// Hands over to the next unfinished thread of this pass, straight from fiber to fiber (one switch
// per waiting thread; going through the scheduler took two), or to the scheduler after the last;
// on again from here when this thread's turn comes back.
inline void yield() {
    Block& b = *block;
    Context& save = fibers[b.current->linear]->resume;
    if (Thread* next = next_unfinished(b, b.current + 1)) {
        b.current = next;
        switch_context(save, ready(*next).resume);
    } else {
        switch_context(save, b.scheduler);
    }
}

inline void wait(Barrier& b) {
    unsigned generation = b.generation;
    ++block->progress;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield();
}

// A fiber's life: run the current block's thread of its index, then wait for the next block's.
inline void fiber_main() {
    for (;;) {
        (*body)();
        if (block->current->mmas.pending())
            fail("wgmma: the thread ended with MMAs it never waited for");
        block->current->done = true;
        ++block->progress;
        yield();
    }
}

// Faults of a fiber become the launch's failure: the handler, on the thread's alternate stack
// where it has one, records what and where and jumps back to the scheduler, abandoning the
// fiber (SA_NODEFER leaves the signal unblocked for the next fault). Faults of other threads, or
// outside a launch, go to the handlers that were installed before.
constexpr int kFaults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
inline struct sigaction previous_handlers[4];
inline pthread_t launching_thread;
inline char fault_message[256];

inline void restore_fault_handlers() {
    for (int i = 0; i < 4; ++i) sigaction(kFaults[i], &previous_handlers[i], nullptr);
}

inline void on_fault(int sig, siginfo_t* info, void*) {
    if (!block || !block->current || !pthread_equal(pthread_self(), launching_thread)) {
        restore_fault_handlers(); // the faulting instruction runs again under them
        return;
    }
    const char* what = sig == SIGSEGV ? "segmentation fault (an access outside the buffers, or a write to a read-only one)"
                       : sig == SIGBUS ? "bus error"
                       : sig == SIGFPE ? "arithmetic fault (an integer division by zero)"
                                       : "illegal instruction";
    const dim3 t = block->current->idx, b = block->idx;
    std::snprintf(fault_message, sizeof fault_message, "%s at %p in thread (%u, %u, %u) of block (%u, %u, %u)", what,
                  info->si_addr, t.x, t.y, t.z, b.x, b.y, b.z);
    block->faulted = true;
    jump_to(block->scheduler);
}

struct FaultHandlers {
    FaultHandlers() {
        launching_thread = pthread_self();
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        for (int i = 0; i < 4; ++i) sigaction(kFaults[i], &sa, &previous_handlers[i]);
    }
    ~FaultHandlers() { restore_fault_handlers(); }
};

// Runs `kernel` (a call of the kernel with its arguments) over `grid` blocks of `threads`
// threads with `smem_bytes` of dynamic shared memory.
template <class Kernel>
void launch(dim3 grid, dim3 threads, unsigned smem_bytes, Kernel kernel) {
    if (smem_bytes + kDynamicOffset > kSharedBytes) fail("launch: more shared memory than a block has");
    unsigned n = threads.x * threads.y * threads.z;
    if (n == 0 || n > 1024) fail("launch: a block of 0 or more than 1024 threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch: an empty grid");
    const std::function<void()> f = kernel;
    body = &f;
    while (fibers.size() < n) fibers.emplace_back(new Fiber);
    struct Reset {
        ~Reset() {
            // A launch that failed left fibers mid-thread: their stacks are abandoned.
            if (std::uncaught_exceptions() > 0)
                for (auto& f : fibers) f->started = false;
            block = nullptr;
            body = nullptr;
        }
    } reset;
    FaultHandlers faults;
    // One Block for the launch, its threads and barriers reset for each block (building them anew
    // took a fifth of the emulation's time in malloc).
    Block b;
    b.dim = threads;
    b.grid = grid;
    b.smem_bytes = smem_bytes;
    b.all.expected = n;
    const unsigned warps = (n + 31) / 32;
    b.warps.resize(warps);
    for (unsigned w = 0; w < warps; ++w) b.warps[w].expected = min(32u, n - 32 * w);
    b.shuffled.resize(2 * 32 * warps);
    b.threads.resize(n);
    for (unsigned t = 0; t < n; ++t) {
        Thread& th = b.threads[t];
        th.idx = dim3{t % threads.x, t / threads.x % threads.y, t / (threads.x * threads.y)};
        th.linear = t;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                b.idx = dim3{bx, by, bz};
                b.all.arrived = 0;
                for (Barrier& w : b.warps) w.arrived = 0;
                for (Thread& th : b.threads) {
                    th.done = false;
                    th.copies.clear(); // copies a thread never waited for die with its block
                    th.mmas.clear();
                }
                // The launch's part of the window (a kernel touching the rest is already wrong).
                std::memset(shared_window, 0x3b, kDynamicOffset + smem_bytes);
                if (unsigned char *begin = __start_whale_shared, *end = __stop_whale_shared; begin != end)
                    std::memset(begin, 0x3b, size_t(end - begin));
                block = &b;
                // Passes over the unfinished threads in order, each handing over to the next
                // (yield), until all are done; a pass that nobody got further in is a deadlock.
                for (Thread* first = next_unfinished(b, b.threads.data()); first;) {
                    unsigned long before = b.progress;
                    b.current = first;
                    switch_context(b.scheduler, ready(*first).resume);
                    b.current = nullptr;
                    if (b.faulted) fail(fault_message);
                    if (!b.failure.empty()) fail(b.failure.c_str());
                    first = next_unfinished(b, b.threads.data());
                    if (first && b.progress == before) fail("deadlock: threads wait at barriers the others never reach");
                }
            }
}

template <class Kernel>
void launch(dim3 grid, unsigned threads, unsigned smem_bytes, Kernel kernel) {
    launch(grid, dim3{threads, 1, 1}, smem_bytes, kernel);
}

// `bytes` (0 or `size`) from `src` into `size` bytes of shared memory at `dst`, zero-filling the rest.
inline void land(unsigned dst, const void* src, unsigned size, unsigned bytes) {
    std::memset(shared_window + dst, 0, size);
    std::memcpy(shared_window + dst, src, bytes);
}

inline void cp_async(unsigned dst, const void* src, unsigned size, unsigned bytes) {
    if (dst % size != 0) fail("cp.async: misaligned shared address");
    if (reinterpret_cast<unsigned long>(src) % size != 0) fail("cp.async: misaligned global address");
    if (bytes != 0 && bytes != size) fail("cp.async: partial copy");
    if (dst < kDynamicOffset || dst + size > kDynamicOffset + block->smem_bytes)
        fail("cp.async: outside the launch's shared memory");
    if (eager_copies)
        land(dst, src, size, bytes);
    else
        block->current->copies.open.push_back([=] { land(dst, src, size, bytes); });
}

} // namespace emu

#define threadIdx (emu::block->current->idx)
#define blockIdx (emu::block->idx)
#define blockDim (emu::block->dim)
#define gridDim (emu::block->grid)

inline void __syncthreads() { emu::wait(emu::block->all); }
[[noreturn]] inline void __trap() { emu::fail("__trap"); }

// Fibers never run at the same time, so a plain add is atomic.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline unsigned __float_as_uint(float v) {
    unsigned bits;
    std::memcpy(&bits, &v, sizeof bits);
    return bits;
}
inline float __uint_as_float(unsigned bits) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}

// The value `v` of lane (this lane ^ lane_mask); every lane of the warp takes part.
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync: only full warps are emulated");
    unsigned t = emu::block->current->linear, warp = t / 32, lane = t % 32, other = lane ^ unsigned(lane_mask);
    if (other >= emu::block->warps[warp].expected) emu::fail("__shfl_xor_sync: lane past the warp");
    // Two buffers, taking turns by the warp barrier's generation: a lane writes one only after
    // every lane has passed the barrier that follows its previous use, so all have read it.
    emu::Barrier& b = emu::block->warps[warp];
    float* shuffled = emu::block->shuffled.data() + 32 * emu::block->warps.size() * (b.generation & 1);
    shuffled[t] = v;
    emu::wait(b);
    return shuffled[32 * warp + other];
}

// shared_memory.cuh's functions.
inline unsigned char* dynamic_shared_memory() { return emu::shared_window + emu::kDynamicOffset; }
inline unsigned dynamic_smem_bytes() { return emu::block->smem_bytes; }
inline unsigned smem_address(const void* p) {
    auto d = static_cast<const unsigned char*>(p) - emu::shared_window;
    if (d < 0 || d >= long(emu::kSharedBytes)) emu::fail("smem_address: not shared memory");
    return unsigned(d);
}
inline void cp_async_16(unsigned dst, const void* src, unsigned bytes) { emu::cp_async(dst, src, 16, bytes); }
inline void cp_async_4(unsigned dst, const void* src, unsigned bytes) { emu::cp_async(dst, src, 4, bytes); }
inline void cp_async_16(unsigned dst, const void* src) { emu::cp_async(dst, src, 16, 16); }
inline void cp_async_4(unsigned dst, const void* src) { emu::cp_async(dst, src, 4, 4); }
inline void cp_async_commit() { emu::block->current->copies.commit(); }
template <int N>
inline void cp_async_wait() {
    emu::block->current->copies.wait(N);
}
inline void cp_async_wait_all() {
    cp_async_commit();
    cp_async_wait<0>();
}
