// mma.cuh's warp-level MMA on the host (see cuda_host.h): the 32 lanes of the warp post their
// fragments, wait for each other, and each computes its four accumulators from the whole A and B
// tiles, laid out as the PTX ISA defines the m16n8k32 fragments for 8-bit types. The products
// of E4M3 values are exact in double; each accumulator adds their sum, rounded once, to c.
#pragma once

#include <bit>

#include "sm90_host.h" // emu::e4m3

inline void mma_m16n8k32_e4m3(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu::Block& blk = *emu::block;
    const unsigned t = blk.current->linear, warp = t / 32, lane = t % 32, base = 32 * warp;
    if (blk.warps[warp].expected != 32) emu::fail("mma.sync: a warp with fewer than 32 threads");
    // Each lane posts its fragments' 24 bytes decoded (a[0..4) as values 0..16, b[0..2) as
    // 16..24), so each byte of the tiles is decoded once, not by each of the lanes that read it.
    constexpr unsigned kValues = 24;
    if (blk.exchange.size() < kValues * blk.threads.size()) blk.exchange.resize(kValues * blk.threads.size());
    unsigned* mine = &blk.exchange[kValues * t];
    for (unsigned i = 0; i < 6; ++i)
        for (unsigned j = 0; j < 4; ++j) {
            const unsigned word = i < 4 ? a[i] : b[i - 4];
            mine[4 * i + j] = std::bit_cast<unsigned>(emu::e4m3((unsigned char)(word >> (8 * j))));
        }
    emu::wait(blk.warps[warp]);
    // Byte k % 4 of register `reg` of lane `from_lane`, as that lane posted it decoded.
    auto value = [&](unsigned from_lane, unsigned reg, unsigned k) {
        return std::bit_cast<float>(blk.exchange[kValues * (base + from_lane) + 4 * reg + k % 4]);
    };
    // A[row][k]: lane (row % 8) * 4 + (k % 16) / 4, register (row / 8) + 2 * (k / 16).
    auto a_at = [&](unsigned row, unsigned k) { return value((row % 8) * 4 + (k % 16) / 4, row / 8 + 2 * (k / 16), k); };
    // B[k][col]: lane col * 4 + (k % 16) / 4, register 4 + k / 16.
    auto b_at = [&](unsigned k, unsigned col) { return value(col * 4 + (k % 16) / 4, 4 + k / 16, k); };
    // This lane's outputs: rows g and g + 8 by columns 2q and 2q + 1 (c[r]: row g + 8 (r / 2),
    // column 2q + r % 2). Their operands gathered once, the four sums run side by side.
    const unsigned g = lane / 4, q = lane % 4;
    float ar[2][32], bc[2][32];
    for (unsigned k = 0; k < 32; ++k) {
        for (unsigned h = 0; h < 2; ++h) ar[h][k] = a_at(g + 8 * h, k);
        for (unsigned h = 0; h < 2; ++h) bc[h][k] = b_at(k, 2 * q + h);
    }
    double sum[4] = {0.0, 0.0, 0.0, 0.0};
    for (unsigned k = 0; k < 32; ++k)
        for (unsigned r = 0; r < 4; ++r) sum[r] += double(ar[r / 2][k]) * bc[r % 2][k];
    float d[4];
    for (unsigned r = 0; r < 4; ++r) d[r] = c[r] + float(sum[r]);
    emu::wait(blk.warps[warp]); // every lane has read the fragments before any posts new ones
    for (unsigned r = 0; r < 4; ++r) c[r] = d[r];
}
