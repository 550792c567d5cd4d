// mma.cuh's warp-level MMA on the host (see cuda_host.h): the 32 lanes of the warp post their
// fragments, wait for each other, and each computes its four accumulators from the whole A and B
// tiles, laid out as the PTX ISA defines the m16n8k32 fragments for 8-bit types. The products
// of E4M3 values are exact in double; each accumulator adds their sum, rounded once, to c.
#pragma once

#include "sm90_host.h" // emu::e4m3

inline void mma_m16n8k32_e4m3(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu::Block& blk = *emu::block;
    const unsigned t = blk.current->linear, warp = t / 32, lane = t % 32, base = 32 * warp;
    if (blk.warps[warp].expected != 32) emu::fail("mma.sync: a warp with fewer than 32 threads");
    constexpr unsigned kWords = 6; // a[0..4), b[0..2)
    if (blk.exchange.size() < kWords * blk.threads.size()) blk.exchange.resize(kWords * blk.threads.size());
    unsigned* mine = &blk.exchange[kWords * t];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    emu::wait(blk.warps[warp]);
    auto byte = [&](unsigned from_lane, unsigned word, unsigned k) {
        return (unsigned char)(blk.exchange[kWords * (base + from_lane) + word] >> (8 * (k % 4)));
    };
    // A[row][k]: lane (row % 8) * 4 + (k % 16) / 4, register (row / 8) + 2 * (k / 16).
    auto a_at = [&](unsigned row, unsigned k) { return emu::e4m3(byte((row % 8) * 4 + (k % 16) / 4, row / 8 + 2 * (k / 16), k)); };
    // B[k][col]: lane col * 4 + (k % 16) / 4, register 4 + k / 16.
    auto b_at = [&](unsigned k, unsigned col) { return emu::e4m3(byte(col * 4 + (k % 16) / 4, 4 + k / 16, k)); };
    // This lane's outputs: rows g and g + 8 by columns 2q and 2q + 1 (c[r]: row g + 8 (r / 2),
    // column 2q + r % 2). Their operands decoded once, the four sums run side by side.
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
