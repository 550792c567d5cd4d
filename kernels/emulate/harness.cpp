// The host emulation itself (cuda_host.h), which every other emulation test relies on: barriers
// order shared-memory traffic across the block and across blocks of a grid, warp shuffles
// exchange the right lanes' values many times in a row, threads that end early leave the others
// running, and failures (a deadlock, a fault, __trap) end the launch with an error naming the
// thread and block, after which the next launch runs normally; and the model of Hopper's FP8
// accumulator (sm90_host.h) keeps what the measurements say. Exit status 1 on any failure.
// Built and run by crates/kernels/tests/emulate.rs.
#include "sm90_host.h"

#include <sys/mman.h>

namespace {

bool ok = true;

void expect(bool cond, const char* what) {
    std::printf("%s %s\n", cond ? "ok  " : "FAIL", what);
    ok &= cond;
}

// The error a launch of `kernel` fails with ("" when it does not fail).
template <class Kernel>
std::string failure(dim3 grid, dim3 threads, Kernel kernel) {
    try {
        emu::launch(grid, threads, 0, kernel);
    } catch (const std::runtime_error& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// Every thread of each block (a 2-D block of 96 threads: three warps) writes its slot, and after
// a barrier reads its neighbours' several rounds in a row: a barrier that let a thread through
// early would read a stale or garbage value.
void barriers_order_shared_memory() {
    const dim3 grid{3, 2, 1}, threads{32, 3, 1};
    const unsigned n = 96, rounds = 5;
    std::vector<float> out(grid.x * grid.y * n);
    emu::launch(grid, threads, n * sizeof(float), [&] {
        float* s = reinterpret_cast<float*>(dynamic_shared_memory());
        const unsigned t = threadIdx.x + threadIdx.y * blockDim.x, b = blockIdx.x + blockIdx.y * gridDim.x;
        float v = float(t + 1000 * b);
        for (unsigned r = 0; r < rounds; ++r) {
            s[t] = v;
            __syncthreads();
            v = s[(t + 1) % n] + s[(t + n - 1) % n];
            __syncthreads();
        }
        out[b * n + t] = v;
    });
    // The same rounds on the host.
    bool same = true;
    for (unsigned b = 0; b < grid.x * grid.y; ++b) {
        std::vector<float> v(n);
        for (unsigned t = 0; t < n; ++t) v[t] = float(t + 1000 * b);
        for (unsigned r = 0; r < rounds; ++r) {
            std::vector<float> w(n);
            for (unsigned t = 0; t < n; ++t) w[t] = v[(t + 1) % n] + v[(t + n - 1) % n];
            v = w;
        }
        for (unsigned t = 0; t < n; ++t) same &= out[b * n + t] == v[t];
    }
    expect(same, "__syncthreads orders shared memory (6 blocks of 32 x 3 threads, 5 rounds)");
}

// Butterfly sums over each warp, many in a row with values that change every round (the shuffles'
// buffers are reused), and a single shuffle's exchange of lane values.
void shuffles_exchange_lane_values() {
    const unsigned n = 64, rounds = 7;
    std::vector<float> sums(n * rounds), swapped(n);
    emu::launch(dim3{1, 1, 1}, dim3{n, 1, 1}, 0, [&] {
        const unsigned t = threadIdx.x;
        for (unsigned r = 0; r < rounds; ++r) {
            float v = float(t * (r + 1));
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            sums[r * n + t] = v;
        }
        swapped[t] = __shfl_xor_sync(0xffffffffu, float(t), 5);
    });
    bool right = true;
    for (unsigned r = 0; r < rounds; ++r)
        for (unsigned t = 0; t < n; ++t) {
            const unsigned w = t / 32 * 32; // lanes w .. w + 31 sum to (r + 1) * (32 w + 496)
            right &= sums[r * n + t] == float((r + 1) * (32 * w + 496));
        }
    for (unsigned t = 0; t < n; ++t) right &= swapped[t] == float(t ^ 5);
    expect(right, "__shfl_xor_sync: 7 butterfly sums in a row over 2 warps, and lane t reads lane t ^ 5");
}

// Threads that return early leave the rest of the block running (here through warp shuffles).
void early_exits_leave_the_rest_running() {
    float sum = 0;
    emu::launch(dim3{2, 1, 1}, dim3{64, 1, 1}, 0, [&] {
        if (threadIdx.x >= 32) return;
        float v = float(threadIdx.x);
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) sum += v;
    });
    expect(sum == 2 * 496.0f, "threads that return early leave the others running");
}

void failures_name_the_thread_and_block() {
    std::string err = failure(dim3{2, 1, 1}, dim3{64, 1, 1}, [] {
        if (threadIdx.x < 16) __syncthreads(); // the rest never arrive
    });
    expect(contains(err, "deadlock"), ("a barrier only some threads reach is a deadlock: " + err).c_str());

    // A page nobody may touch, as the emulated driver puts after each buffer.
    void* page = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    volatile int* guard = static_cast<volatile int*>(page);
    err = failure(dim3{4, 1, 1}, dim3{64, 1, 1}, [=] {
        if (blockIdx.x == 2 && threadIdx.x == 37) *guard = 1;
        __syncthreads();
    });
    expect(contains(err, "segmentation fault") && contains(err, "thread (37, 0, 0) of block (2, 0, 0)"),
           ("a fault names its thread and block: " + err).c_str());
    munmap(page, 4096);

    err = failure(dim3{3, 1, 1}, dim3{32, 1, 1}, [] {
        __syncthreads();
        if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
    });
    expect(contains(err, "__trap"), ("__trap fails the launch: " + err).c_str());

    // Fibers abandoned mid-thread by those failures start afresh.
    unsigned ran = 0;
    emu::launch(dim3{2, 1, 1}, dim3{128, 1, 1}, 0, [&] {
        __syncthreads();
        ++ran;
    });
    expect(ran == 256, "a launch after failed ones runs every thread");
}

} // namespace

// The measurements the model follows: an accumulator with more than 13 mantissa bits comes back
// with the low 10 bits of its f32 zeroed (SageAttention2, A = B = 0); a product under the largest
// one's 2^-13 quantum is floored (DeepSeek-V3's report, 3.5.2: truncated after the sign-filled
// shift, so a small positive one drops to 0 and a small negative one to minus a quantum); sums
// within 14 bits are exact.
void the_fp8_accumulator_model_keeps_14_bits() {
    float zeros[32] = {}, ones[32] = {}, b[32] = {};
    for (float& v : ones) v = 1.0f;
    expect(emu::hopper_fp8_step(1.0f + std::ldexp(1.0f, -20), zeros, zeros) == 1.0f, "fp8 accumulator: C to 13 bits");
    expect(emu::hopper_fp8_step(-3.0f - std::ldexp(1.0f, -14), zeros, zeros) == -3.0f, "fp8 accumulator: toward zero");
    float a[32] = {448.0f, 7.5f, std::ldexp(1.0f, -6), -std::ldexp(1.0f, -6)};
    b[0] = b[1] = b[2] = b[3] = 1.0f; // quantum 2^(8 - 13): 2^-6 floors to 0, -2^-6 to -2^-5
    expect(emu::hopper_fp8_step(0.0f, a, b) == 448.0f + 7.5f - std::ldexp(1.0f, -5), "fp8 accumulator: aligned products");
    expect(emu::hopper_fp8_step(100.0f, ones, ones) == 132.0f, "fp8 accumulator: exact within 14 bits");
}

int main() {
    the_fp8_accumulator_model_keeps_14_bits();
    barriers_order_shared_memory();
    shuffles_exchange_lane_values();
    early_exits_leave_the_rest_running();
    failures_name_the_thread_and_block();
    return ok ? 0 : 1;
}
