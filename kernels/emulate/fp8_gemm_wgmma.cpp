// fp8_gemm_wgmma (kernels/fp8_gemm_wgmma.cu) run in host emulation (sm90_host.h) against the
// block-scaled product computed directly: each K block's partial sum in k32 steps through the
// emulation's model of Hopper's accumulator (emu::hopper_fp8_step, the same steps the kernel's
// four wgmmas take), promoted in double, so the kernel must agree to f32 rounding. Whole tiles,
// ragged M / N / K edges (K a multiple of 16 but not of 128), more K blocks than pipeline
// stages, per-row and per-128-row B scales. Exit status 1 on any mismatch. Built and run by
// crates/kernels/tests/emulate.rs.
#include "../fp8_gemm_wgmma.cu"

#include <cmath>
#include <random>

namespace {

struct Operand {
    std::vector<unsigned char> codes; // [rows, k] E4M3
    std::vector<float> scales;        // [ceil(rows / block_rows), ceil(k / 128)]
    unsigned rows, block_rows;
};

Operand random_operand(unsigned rows, unsigned k, unsigned block_rows, std::mt19937& rng) {
    Operand o{{}, {}, rows, block_rows};
    o.codes.resize(size_t(rows) * k);
    for (auto& c : o.codes) {
        c = rng() & 0xff;
        if ((c & 0x7f) == 0x7f) c ^= 1; // not NaN
    }
    std::uniform_real_distribution<float> scale(0.25f, 4.0f);
    o.scales.resize(size_t((rows + block_rows - 1) / block_rows) * ((k + 127) / 128));
    for (auto& s : o.scales) s = scale(rng);
    return o;
}

bool check(unsigned m, unsigned n, unsigned k, unsigned b_rows, unsigned seed) {
    std::mt19937 rng(seed);
    Operand a = random_operand(m, k, 1, rng), b = random_operand(n, k, b_rows, rng);
    std::vector<float> y(size_t(m) * n, NAN);
    dim3 grid{(n + 127) / 128, (m + 127) / 128, 1};
    emu::launch(grid, 256, WG_SMEM_BYTES, [&] {
        fp8_gemm_wgmma(a.codes.data(), a.scales.data(), 1, b.codes.data(), b.scales.data(), b_rows, y.data(), m, n, k);
    });
    unsigned kb = (k + 127) / 128;
    std::vector<double> want(y.size());
    double largest = 0;
    for (unsigned i = 0; i < m; ++i)
        for (unsigned j = 0; j < n; ++j) {
            double total = 0;
            for (unsigned blk = 0; blk < kb; ++blk) {
                float partial = 0.0f;
                for (unsigned step = 0; step < 4; ++step) {
                    float av[32], bv[32]; // zeros past K, as the kernel's zero-filled edge
                    for (unsigned kk = 0; kk < 32; ++kk) {
                        unsigned t = blk * 128 + step * 32 + kk;
                        av[kk] = t < k ? emu::e4m3(a.codes[size_t(i) * k + t]) : 0.0f;
                        bv[kk] = t < k ? emu::e4m3(b.codes[size_t(j) * k + t]) : 0.0f;
                    }
                    partial = emu::hopper_fp8_step(partial, av, bv);
                }
                total += double(partial) * a.scales[size_t(i) * kb + blk] * b.scales[size_t(j / b_rows) * kb + blk];
            }
            want[size_t(i) * n + j] = total;
            largest = std::max(largest, std::abs(total));
        }
    for (size_t e = 0; e < y.size(); ++e)
        if (!(std::abs(y[e] - want[e]) <= 1e-5 * largest)) {
            std::printf("FAIL [%u, %u] x [%u, %u]^T (B scales per %u rows): y[%zu, %zu] = %g, want %g\n", m, k, n, k,
                        b_rows, e / n, e % n, y[e], want[e]);
            return false;
        }
    std::printf("ok   [%u, %u] x [%u, %u]^T (B scales per %u rows)\n", m, k, n, k, b_rows);
    return true;
}

} // namespace

int main() {
    struct Case {
        unsigned m, n, k, b_rows;
    };
    // The GPU test's shapes (crates/kernels/tests/cuda/main.rs), and a K of 7 blocks (more than the
    // 4 stages, so the ring wraps) with a partial last block.
    const Case cases[] = {{128, 128, 256, 128}, {200, 300, 400, 128}, {33, 130, 144, 1}, {1, 257, 512, 128},
                          {130, 140, 880, 128}};
    bool ok = true;
    for (bool eager : {false, true}) {
        emu::eager_copies = eager;
        std::printf("cp.async landing %s:\n", eager ? "when issued" : "when waited for");
        unsigned seed = 1;
        for (const Case& c : cases) ok &= check(c.m, c.n, c.k, c.b_rows, seed++);
    }
    return ok ? 0 : 1;
}
