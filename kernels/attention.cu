// Attention forward and backward, f32 in and out (spec deepseek-v3.md 1.5 and 8.2):
// q [batch, q_heads, q_len, qk], k [batch, kv_heads, kv_len, qk], v [batch, kv_heads, kv_len, vd];
// o [batch, q_heads, q_len, vd], lse [batch, q_heads, q_len]. Grouped-query heads (kv_heads
// dividing q_heads) and bottom-right causal masking cover training attention and MLA decode over
// the latent cache (MQA: one KV head whose key is [c ; k_pe] and whose value is c).
// CPU twins: whale_kernels::cpu::attention::attention_forward and attention_backward.
//
// The tiled kernels (FlashAttention-2's structure on the CUDA cores, FlashMLA's MQA packing):
// the query heads of one KV head are contiguous rows of q, so a (batch, KV head) owns
// group * q_len "packed" query rows (head-major; row r is query r % q_len of head r / q_len) that
// all read the same keys. A block owns a tile of packed rows (a tile of one head's queries in
// training; up to BM heads of one batch row in decode, which then read the latent cache once per
// tile instead of once per head) and streams key/value tiles through shared memory: each stage
// copies one chunk (keys x a slice of the head, or a few keys x the whole value) with cp.async
// into one of two buffers while the block computes on the other. Each thread keeps a register
// micro-tile of scores (rows ty + a * TY, keys tx + b * TX) and of its outputs (8 consecutive rows
// or 4, by 4 + 4 columns in the two halves of the head). The backward is two passes without
// atomics: dq per query tile (writing D = rowsum(dO * O) too), then dk and dv per key tile.
// The simple kernels at the end (one block per row) remain for heads wider than the tiled ones.
#include "shared_memory.cuh"
#include "common.cuh"

// Keys query i sees: j < i + 1 + kv_len - q_len under bottom-right causal masking (none when that
// is not positive: a query block longer than the keys starts with fully masked rows).
__device__ inline unsigned visible_keys(unsigned i, unsigned q_len, unsigned kv_len, int causal) {
    if (!causal) return kv_len;
    unsigned end = i + 1 + kv_len;
    return end > q_len ? min(kv_len, end - q_len) : 0;
}

// First query that sees key j (the inverse of visible_keys); q_len when none does.
__device__ inline unsigned first_query(unsigned j, unsigned q_len, unsigned kv_len, int causal) {
    if (!causal) return 0;
    return j + q_len > kv_len ? min(q_len, j + q_len - kv_len) : 0;
}

// The query index that sees the most keys among packed rows [r0, r0 + n): the last one when the
// rows lie in one head, else the last query of a head.
__device__ inline unsigned tile_last_query(unsigned r0, unsigned n, unsigned q_len) {
    unsigned r1 = r0 + n - 1;
    return r0 / q_len == r1 / q_len ? r1 % q_len : q_len - 1;
}

constexpr int cmax(int a, int b) { return a > b ? a : b; }

// The dynamic shared memory; the tiled kernels check it holds their layout (a launcher that
// reserved too little traps instead of corrupting memory).
__device__ __forceinline__ float* attention_smem() { return reinterpret_cast<float*>(dynamic_shared_memory()); }

// Asynchronous global -> shared copies (sm_80+): 16 bytes through L2 only, or 4 bytes.
__device__ __forceinline__ void copy16_async(float* dst, const float* src) { cp_async_16(smem_address(dst), src); }
__device__ __forceinline__ void copy4_async(float* dst, const float* src) { cp_async_4(smem_address(dst), src); }

__device__ __forceinline__ bool aligned16(const float* p) { return (reinterpret_cast<size_t>(p) & 15) == 0; }

// Copies rows [0, R) x columns [0, C) of a row-major matrix (row stride ld floats, element (0, 0)
// at src) into dst [R][LD] in shared memory, zero past `rows` rows and `cols` columns. `vec`: src
// and ld are 16-byte aligned and cols % 4 == 0, so whole float4s move.
template <int R, int C, int LD, int T>
__device__ __forceinline__ void stage_rows(float* dst, const float* src, size_t ld, int rows, int cols, bool vec) {
    if (vec) {
        constexpr int C4 = C / 4;
#pragma unroll 1
        for (int e = threadIdx.x; e < R * C4; e += T) {
            int r = e / C4, c = (e % C4) * 4;
            float* d = dst + r * LD + c;
            if (r < rows && c < cols) {
                copy16_async(d, src + r * ld + c);
            } else {
                *reinterpret_cast<float4*>(d) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        }
    } else {
        for (int e = threadIdx.x; e < R * C; e += T) {
            int r = e / C, c = e % C;
            float* d = dst + r * LD + c;
            if (r < rows && c < cols) {
                copy4_async(d, src + r * ld + c);
            } else {
                *d = 0.0f;
            }
        }
    }
}

// acc[a][b] += sum over KC columns of A[ty + a * TY][.] * B[tx + b * TX][.] (rows of A and B in
// shared memory, strides LA and LB floats, 16-byte aligned). The lanes of a quarter warp read
// one A row (a broadcast) and 8 consecutive B rows (distinct banks: LB / 4 is odd).
template <int TMS, int TNS, int TY, int TX, int KC, int LA, int LB>
__device__ __forceinline__ void score_chunk(float (&acc)[TMS][TNS], const float* A, const float* B, int ty, int tx) {
#pragma unroll 1
    for (int d = 0; d < KC; d += 4) {
        float4 b[TNS];
#pragma unroll
        for (int j = 0; j < TNS; ++j) b[j] = *reinterpret_cast<const float4*>(B + (tx + j * TX) * LB + d);
#pragma unroll
        for (int i = 0; i < TMS; ++i) {
            float4 a = *reinterpret_cast<const float4*>(A + (ty + i * TY) * LA + d);
#pragma unroll
            for (int j = 0; j < TNS; ++j) {
                acc[i][j] = fmaf(a.x, b[j].x, acc[i][j]);
                acc[i][j] = fmaf(a.y, b[j].y, acc[i][j]);
                acc[i][j] = fmaf(a.z, b[j].z, acc[i][j]);
                acc[i][j] = fmaf(a.w, b[j].w, acc[i][j]);
            }
        }
    }
}

// acc[i][j] += sum over n < NC of P[n][r0 + i] * W[n][col j], the columns being c0 + j and
// DW / 2 + c0 + j - 4 (see out_col). P [n][rows] and W [n][DW] in shared memory, strides LP, LW.
template <int TMO, int DW, int NC, int LP, int LW>
__device__ __forceinline__ void accumulate_chunk(float (&acc)[TMO][8], const float* P, const float* W, int r0, int c0) {
#pragma unroll 1
    for (int n = 0; n < NC; ++n) {
        float p[TMO];
#pragma unroll
        for (int i = 0; i < TMO; i += 4) {
            float4 x = *reinterpret_cast<const float4*>(P + n * LP + r0 + i);
            p[i] = x.x;
            p[i + 1] = x.y;
            p[i + 2] = x.z;
            p[i + 3] = x.w;
        }
        float4 w0 = *reinterpret_cast<const float4*>(W + n * LW + c0);
        float4 w1 = *reinterpret_cast<const float4*>(W + n * LW + DW / 2 + c0);
#pragma unroll
        for (int i = 0; i < TMO; ++i) {
            acc[i][0] = fmaf(p[i], w0.x, acc[i][0]);
            acc[i][1] = fmaf(p[i], w0.y, acc[i][1]);
            acc[i][2] = fmaf(p[i], w0.z, acc[i][2]);
            acc[i][3] = fmaf(p[i], w0.w, acc[i][3]);
            acc[i][4] = fmaf(p[i], w1.x, acc[i][4]);
            acc[i][5] = fmaf(p[i], w1.y, acc[i][5]);
            acc[i][6] = fmaf(p[i], w1.z, acc[i][6]);
            acc[i][7] = fmaf(p[i], w1.w, acc[i][7]);
        }
    }
}

// Column of output j (0..7) of a thread in column group cg of a DW-wide output layout.
template <int DW>
__device__ __forceinline__ int out_col(int cg, int j) {
    return j < 4 ? cg * 4 + j : DW / 2 + cg * 4 + j - 4;
}

template <int M, int N>
__device__ __forceinline__ void zero(float (&x)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) x[i][j] = 0.0f;
}

// One tiled kernel's shape: heads up to DQ (q, k) and DV (v) wide; BM resident rows (queries;
// keys in the dk/dv pass) per block and BN streamed rows (keys; queries in the dk/dv pass) per
// tile; T threads; stages of KC columns of BN rows or of NC whole rows; TX threads share a score
// row. Every instance below has its twin in crates/kernels/src/cuda/attention.rs, which sizes the
// shared memory with the same formulas.
template <int DQ_, int DV_, int BM_, int BN_, int T_, int KC_, int NC_, int TX_>
struct Tiles {
    static constexpr int DQ = DQ_, DV = DV_, BM = BM_, BN = BN_, T = T_, KC = KC_, NC = NC_, TX = TX_;
    static constexpr int TY = T / TX, TMS = BM / TY, TNS = BN / TX;
    static constexpr int LQ = DQ + 4, LV = DV + 4, LC = KC + 4, LP = BM + 4;
    static_assert(T % 32 == 0 && 32 % TX == 0 && TX >= 8 && BM % TY == 0 && BN % TX == 0, "score layout");
    static_assert(DQ % KC == 0 && DV % KC == 0 && KC % 4 == 0 && BN % NC == 0 && BM % 4 == 0, "stages");
};

// Output layout of a DW-wide accumulator over BM rows: T / (DW / 8) row groups of TMO rows.
template <class C, int DW>
struct OutLayout {
    static constexpr int CG = DW / 8, RG = C::T / CG, TMO = C::BM / RG;
    static_assert(DW % 8 == 0 && C::T % CG == 0 && C::BM % RG == 0 && TMO % 4 == 0, "output layout");
};

template <class C>
struct ForwardSmem {
    static constexpr int STAGE = cmax(C::BN * C::LC, C::NC * C::LV);
    static constexpr int FLOATS = C::BM * C::LQ + 2 * STAGE + C::BN * C::LP + C::BM;
};

// Forward: grid (row tiles, batch * kv_heads, splits). Split z covers key tiles
// [z * tiles_per_split, (z + 1) * tiles_per_split) and writes (o, lse) over those keys alone at
// o + z * rows * vd and lse + z * rows (rows = batch * q_heads * q_len), which
// attention_combine_f32 merges. Row tiles run last first: under causal masking they see the
// most keys.
template <class C>
__device__ __forceinline__ void forward_tiled(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    float* __restrict__ o, float* __restrict__ lse,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal, unsigned tiles_per_split) {
    constexpr int BM = C::BM, BN = C::BN, T = C::T, TX = C::TX, TY = C::TY, TMS = C::TMS, TNS = C::TNS;
    constexpr int KC = C::KC, NC = C::NC, DV = C::DV, LQ = C::LQ, LC = C::LC, LV = C::LV, LP = C::LP;
    constexpr int STAGE = ForwardSmem<C>::STAGE;
    using O = OutLayout<C, DV>;
    constexpr int TMO = O::TMO;
    float* Qs = attention_smem();   // [BM][LQ]
    float* stages = Qs + BM * LQ;   // 2 x ([BN][LC] keys x a slice of qk, or [NC][LV] values)
    float* Pt = stages + 2 * STAGE; // [BN][LP]: probabilities, keys by rows
    float* rowf = Pt + BN * LP;     // [BM]: each row's rescale, at the end its sum
    if (dynamic_smem_bytes() < sizeof(float) * ForwardSmem<C>::FLOATS) __trap();

    const unsigned M = q_heads / kv_heads * q_len, bkv = blockIdx.y;
    const unsigned row0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int rows = min(BM, (int)(M - row0));
    const size_t first_row = (size_t)bkv * M + row0, all_rows = (size_t)gridDim.y * M;
    const float* kb = k + (size_t)bkv * kv_len * qk;
    const float* vb = v + (size_t)bkv * kv_len * vd;
    o += blockIdx.z * all_rows * vd;
    lse += blockIdx.z * all_rows;

    const unsigned keys = visible_keys(tile_last_query(row0, rows, q_len), q_len, kv_len, causal);
    const unsigned t_begin = blockIdx.z * tiles_per_split;
    const unsigned t_end = min(t_begin + tiles_per_split, (keys + BN - 1) / BN);
    const int nkc = qk > 0 ? (int)((qk + KC - 1) / KC) : 1, per_tile = nkc + BN / NC;
    const bool qk4 = qk % 4 == 0 && aligned16(q) && aligned16(k), vd4 = vd % 4 == 0 && aligned16(v);

    // Stage u of key tile `tile` into buffer `buf`.
    auto issue = [&](unsigned tile, int u, int buf) {
        float* dst = stages + buf * STAGE;
        const unsigned key0 = tile * BN;
        const int krows = min(BN, (int)(kv_len - key0));
        if (u < nkc) {
            stage_rows<BN, KC, LC, T>(dst, kb + (size_t)key0 * qk + u * KC, qk, krows, (int)qk - u * KC, qk4);
        } else {
            const int n0 = (u - nkc) * NC;
            stage_rows<NC, DV, LV, T>(dst, vb + (size_t)(key0 + n0) * vd, vd, krows - n0, (int)vd, vd4);
        }
    };

    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    const int og_c = tid % O::CG, og_r = tid / O::CG;
    float m[TMS], l[TMS];
    unsigned vis[TMS];
#pragma unroll
    for (int a = 0; a < TMS; ++a) {
        const int r = ty + a * TY;
        vis[a] = r < rows ? visible_keys((row0 + r) % q_len, q_len, kv_len, causal) : 0;
        m[a] = -INFINITY;
        l[a] = 0.0f;
    }
    float s[TMS][TNS], acc[TMO][8];
    zero(acc);

    if (t_begin < t_end) {
        stage_rows<BM, C::DQ, LQ, T>(Qs, q + first_row * qk, qk, rows, (int)qk, qk4);
        issue(t_begin, 0, 0);
    }
    int buf = 0; // stages alternate buffers across tiles too (per_tile may be odd)
    for (unsigned tile = t_begin; tile < t_end; ++tile) {
        for (int u = 0; u < per_tile; ++u, buf ^= 1) {
            cp_async_wait_all();
            __syncthreads(); // this stage landed for everyone; everyone is done with the other buffer
            if (u + 1 < per_tile) {
                issue(tile, u + 1, buf ^ 1);
            } else if (tile + 1 < t_end) {
                issue(tile + 1, 0, buf ^ 1);
            }
            const float* st = stages + buf * STAGE;
            if (u < nkc) {
                if (u == 0) zero(s);
                score_chunk<TMS, TNS, TY, TX, KC, LQ, LC>(s, Qs + u * KC, st, ty, tx);
                if (u == nkc - 1) {
                    // Online softmax over this tile; the rows' rescales go to the value stages.
#pragma unroll
                    for (int a = 0; a < TMS; ++a) {
                        float mx = -INFINITY;
#pragma unroll
                        for (int b = 0; b < TNS; ++b) {
                            const unsigned j = tile * BN + tx + b * TX;
                            s[a][b] = j < vis[a] ? s[a][b] * scale : -INFINITY;
                            mx = fmaxf(mx, s[a][b]);
                        }
#pragma unroll
                        for (int off = TX / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                        const float m_new = fmaxf(m[a], mx);
                        const float m_use = m_new == -INFINITY ? 0.0f : m_new; // no key seen yet: p = 0
                        const float alpha = expf(m[a] - m_use);
                        float sum = 0.0f;
#pragma unroll
                        for (int b = 0; b < TNS; ++b) {
                            const float p = expf(s[a][b] - m_use);
                            sum += p;
                            Pt[(tx + b * TX) * LP + ty + a * TY] = p;
                        }
#pragma unroll
                        for (int off = TX / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                        l[a] = l[a] * alpha + sum;
                        m[a] = m_new;
                        if (tx == 0) rowf[ty + a * TY] = alpha;
                    }
                }
            } else {
                const int c = u - nkc;
                if (c == 0) {
#pragma unroll
                    for (int i = 0; i < TMO; ++i) {
                        const float alpha = rowf[og_r * TMO + i];
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[i][j] *= alpha;
                    }
                }
                accumulate_chunk<TMO, DV, NC, LP, LV>(acc, Pt + c * NC * LP, st, og_r * TMO, og_c * 4);
            }
        }
    }

    __syncthreads(); // every rescale is read
#pragma unroll
    for (int a = 0; a < TMS; ++a) {
        const int r = ty + a * TY;
        if (tx == 0 && r < rows) {
            rowf[r] = l[a];
            // A fully masked row (or one whose keys all lie in other splits): lse = -inf.
            lse[first_row + r] = l[a] > 0.0f ? m[a] + logf(l[a]) : -INFINITY;
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < TMO; ++i) {
        const int r = og_r * TMO + i;
        if (r >= rows) continue;
        const float sum = rowf[r];
        float* orow = o + (first_row + r) * vd;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = out_col<DV>(og_c, j);
            if (col < (int)vd) orow[col] = sum > 0.0f ? acc[i][j] / sum : 0.0f;
        }
    }
}

// Merges a split forward: o_part [splits, rows, vd] and lse_part [splits, rows], each split's
// attention over its keys, into o [rows, vd] and lse [rows]. One block per row.
extern "C" __global__ void attention_combine_f32(
    const float* o_part, const float* lse_part, float* o, float* lse, unsigned rows, unsigned vd, unsigned splits) {
    const unsigned row = blockIdx.x;
    float mx = -INFINITY;
    for (unsigned z = 0; z < splits; ++z) mx = fmaxf(mx, lse_part[(size_t)z * rows + row]);
    float total = -INFINITY;
    if (mx != -INFINITY) {
        float sum = 0.0f;
        for (unsigned z = 0; z < splits; ++z) sum += expf(lse_part[(size_t)z * rows + row] - mx);
        total = mx + logf(sum);
    }
    if (threadIdx.x == 0) lse[row] = total;
    for (unsigned c = threadIdx.x; c < vd; c += blockDim.x) {
        float acc = 0.0f;
        if (total != -INFINITY) {
            for (unsigned z = 0; z < splits; ++z) {
                const size_t part = (size_t)z * rows + row;
                acc += expf(lse_part[part] - total) * o_part[part * vd + c];
            }
        }
        o[(size_t)row * vd + c] = acc;
    }
}

template <class C>
struct DqSmem {
    static constexpr int STAGE = cmax(C::BN * C::LC, C::NC * C::LQ);
    static constexpr int FLOATS = C::BM * C::LQ + C::BM * C::LV + 2 * STAGE + C::BN * C::LP + C::BM;
};

// Backward pass 1: grid (row tiles, batch * kv_heads). A block owns a tile of packed query rows:
// D = rowsum(dO * O) (written to delta for pass 2), then per key tile S = Q K^T and
// dP = dO V^T (stages of slices of k and v), P = exp(scale * S - lse),
// dS = P * (dP - D), and dQ += dS K (stages of whole key rows); dq = scale * dQ.
template <class C>
__device__ __forceinline__ void backward_dq_tiled(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ o, const float* __restrict__ lse, const float* __restrict__ d_o,
    float* __restrict__ dq, float* __restrict__ delta,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    constexpr int BM = C::BM, BN = C::BN, T = C::T, TX = C::TX, TY = C::TY, TMS = C::TMS, TNS = C::TNS;
    constexpr int KC = C::KC, NC = C::NC, DQ = C::DQ, LQ = C::LQ, LC = C::LC, LV = C::LV, LP = C::LP;
    constexpr int STAGE = DqSmem<C>::STAGE;
    using O = OutLayout<C, DQ>;
    constexpr int TMO = O::TMO;
    float* Qs = attention_smem();   // [BM][LQ]
    float* dOs = Qs + BM * LQ;      // [BM][LV]
    float* stages = dOs + BM * LV;  // 2 x ([BN][LC] slices of k or v, or [NC][LQ] key rows)
    float* Dt = stages + 2 * STAGE; // [BN][LP]: dS, keys by rows
    float* Ds = Dt + BN * LP;       // [BM]: D
    if (dynamic_smem_bytes() < sizeof(float) * DqSmem<C>::FLOATS) __trap();

    const unsigned M = q_heads / kv_heads * q_len, bkv = blockIdx.y;
    const unsigned row0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int rows = min(BM, (int)(M - row0));
    const size_t first_row = (size_t)bkv * M + row0;
    const float* kb = k + (size_t)bkv * kv_len * qk;
    const float* vb = v + (size_t)bkv * kv_len * vd;

    const unsigned keys = visible_keys(tile_last_query(row0, rows, q_len), q_len, kv_len, causal);
    const unsigned n_tiles = (keys + BN - 1) / BN;
    const int nkc = qk > 0 ? (int)((qk + KC - 1) / KC) : 1;
    const int nvc = vd > 0 ? (int)((vd + KC - 1) / KC) : 1;
    const int per_tile = nkc + nvc + BN / NC;
    const bool qk4 = qk % 4 == 0 && aligned16(q) && aligned16(k);
    const bool vd4 = vd % 4 == 0 && aligned16(v) && aligned16(d_o);

    auto issue = [&](unsigned tile, int u, int buf) {
        float* dst = stages + buf * STAGE;
        const unsigned key0 = tile * BN;
        const int krows = min(BN, (int)(kv_len - key0));
        if (u < nkc) {
            stage_rows<BN, KC, LC, T>(dst, kb + (size_t)key0 * qk + u * KC, qk, krows, (int)qk - u * KC, qk4);
        } else if (u < nkc + nvc) {
            const int c0 = (u - nkc) * KC;
            stage_rows<BN, KC, LC, T>(dst, vb + (size_t)key0 * vd + c0, vd, krows, (int)vd - c0, vd4);
        } else {
            const int n0 = (u - nkc - nvc) * NC;
            stage_rows<NC, DQ, LQ, T>(dst, kb + (size_t)(key0 + n0) * qk, qk, krows - n0, (int)qk, qk4);
        }
    };

    if (n_tiles > 0) {
        stage_rows<BM, DQ, LQ, T>(Qs, q + first_row * qk, qk, rows, (int)qk, qk4);
        stage_rows<BM, C::DV, LV, T>(dOs, d_o + first_row * vd, vd, rows, (int)vd, vd4);
        issue(0, 0, 0);
    }
    // D, a warp per row.
    const int tid = threadIdx.x, lane = tid % 32;
    for (int r = tid / 32; r < rows; r += T / 32) {
        const float* orow = o + (first_row + r) * vd;
        const float* dorow = d_o + (first_row + r) * vd;
        float part = 0.0f;
        for (unsigned c = lane; c < vd; c += 32) part += dorow[c] * orow[c];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        if (lane == 0) {
            Ds[r] = part;
            delta[first_row + r] = part;
        }
    }
    __syncthreads();

    const int tx = tid % TX, ty = tid / TX;
    const int og_c = tid % O::CG, og_r = tid / O::CG;
    float L[TMS], D[TMS];
    unsigned vis[TMS];
#pragma unroll
    for (int a = 0; a < TMS; ++a) {
        const int r = ty + a * TY;
        vis[a] = r < rows ? visible_keys((row0 + r) % q_len, q_len, kv_len, causal) : 0;
        L[a] = r < rows ? lse[first_row + r] : 0.0f;
        D[a] = r < rows ? Ds[r] : 0.0f;
    }
    float s[TMS][TNS], dp[TMS][TNS], acc[TMO][8];
    zero(acc);

    int buf = 0;
    for (unsigned tile = 0; tile < n_tiles; ++tile) {
        for (int u = 0; u < per_tile; ++u, buf ^= 1) {
            cp_async_wait_all();
            __syncthreads();
            if (u + 1 < per_tile) {
                issue(tile, u + 1, buf ^ 1);
            } else if (tile + 1 < n_tiles) {
                issue(tile + 1, 0, buf ^ 1);
            }
            const float* st = stages + buf * STAGE;
            if (u < nkc) {
                if (u == 0) zero(s);
                score_chunk<TMS, TNS, TY, TX, KC, LQ, LC>(s, Qs + u * KC, st, ty, tx);
            } else if (u < nkc + nvc) {
                const int c = u - nkc;
                if (c == 0) zero(dp);
                score_chunk<TMS, TNS, TY, TX, KC, LV, LC>(dp, dOs + c * KC, st, ty, tx);
                if (c == nvc - 1) {
#pragma unroll
                    for (int a = 0; a < TMS; ++a) {
#pragma unroll
                        for (int b = 0; b < TNS; ++b) {
                            const unsigned j = tile * BN + tx + b * TX;
                            // Masked keys (and fully masked rows, whose lse is -inf) give no P.
                            const float p = j < vis[a] ? expf(s[a][b] * scale - L[a]) : 0.0f;
                            Dt[(tx + b * TX) * LP + ty + a * TY] = p * (dp[a][b] - D[a]);
                        }
                    }
                }
            } else {
                const int c = u - nkc - nvc;
                accumulate_chunk<TMO, DQ, NC, LP, LQ>(acc, Dt + c * NC * LP, st, og_r * TMO, og_c * 4);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < TMO; ++i) {
        const int r = og_r * TMO + i;
        if (r >= rows) continue;
        float* row = dq + (first_row + r) * qk;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = out_col<DQ>(og_c, j);
            if (col < (int)qk) row[col] = scale * acc[i][j];
        }
    }
}

template <class C>
struct DkvSmem {
    static constexpr int STAGE = cmax(C::BN * C::LC, cmax(C::NC * C::LQ, C::NC * C::LV));
    static constexpr int FLOATS = C::BM * C::LQ + C::BM * C::LV + 2 * STAGE + 2 * C::BN * C::LP;
};

// Backward pass 2: grid (key tiles, batch * kv_heads). A block owns a tile of keys of one KV head
// and walks the packed query rows of its group in tiles (those that see none of its keys are
// skipped): S^T = K Q^T and dP^T = V dO^T (stages of slices of q and dO), P^T and dS^T as in
// pass 1, then dV += P^T dO and dK += dS^T Q (stages of whole rows of dO and q); dk = scale * dK.
// Each key has one writer, so no atomics.
template <class C>
__device__ __forceinline__ void backward_dkv_tiled(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk, float* __restrict__ dv,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    constexpr int BM = C::BM, BN = C::BN, T = C::T, TX = C::TX, TY = C::TY, TMS = C::TMS, TNS = C::TNS;
    constexpr int KC = C::KC, NC = C::NC, DQ = C::DQ, DV = C::DV, LQ = C::LQ, LC = C::LC, LV = C::LV;
    constexpr int LP = C::LP, STAGE = DkvSmem<C>::STAGE;
    using OK = OutLayout<C, DQ>;
    using OV = OutLayout<C, DV>;
    float* Ks = attention_smem();  // [BM][LQ]
    float* Vs = Ks + BM * LQ;      // [BM][LV]
    float* stages = Vs + BM * LV;  // 2 x ([BN][LC] slices of q or dO, or [NC][LV] / [NC][LQ] rows)
    float* Ps = stages + 2 * STAGE; // [BN][LP]: P, queries by rows
    float* Dss = Ps + BN * LP;      // [BN][LP]: dS, queries by rows
    if (dynamic_smem_bytes() < sizeof(float) * DkvSmem<C>::FLOATS) __trap();

    const unsigned M = q_heads / kv_heads * q_len, bkv = blockIdx.y;
    const unsigned key0 = blockIdx.x * BM;
    const int nkeys = min(BM, (int)(kv_len - key0));
    const size_t first_key = (size_t)bkv * kv_len + key0, first_row = (size_t)bkv * M;
    const float* qb = q + first_row * qk;
    const float* dob = d_o + first_row * vd;
    const unsigned n_tiles = (M + BN - 1) / BN;
    const int nkc = qk > 0 ? (int)((qk + KC - 1) / KC) : 1;
    const int nvc = vd > 0 ? (int)((vd + KC - 1) / KC) : 1;
    const int nrc = BN / NC, per_tile = nkc + nvc + 2 * nrc;
    const bool qk4 = qk % 4 == 0 && aligned16(q) && aligned16(k);
    const bool vd4 = vd % 4 == 0 && aligned16(v) && aligned16(d_o);

    // The first query tile at or after t in which some query sees one of this block's keys.
    auto next_live = [&](unsigned t) {
        for (; t < n_tiles; ++t) {
            const unsigned r0 = t * BN, n = min((unsigned)BN, M - r0);
            if (visible_keys(tile_last_query(r0, n, q_len), q_len, kv_len, causal) > key0) break;
        }
        return t;
    };
    auto issue = [&](unsigned tile, int u, int buf) {
        float* dst = stages + buf * STAGE;
        const unsigned r0 = tile * BN;
        const int qrows = min(BN, (int)(M - r0));
        if (u < nkc) {
            stage_rows<BN, KC, LC, T>(dst, qb + (size_t)r0 * qk + u * KC, qk, qrows, (int)qk - u * KC, qk4);
        } else if (u < nkc + nvc) {
            const int c0 = (u - nkc) * KC;
            stage_rows<BN, KC, LC, T>(dst, dob + (size_t)r0 * vd + c0, vd, qrows, (int)vd - c0, vd4);
        } else if (u < nkc + nvc + nrc) {
            const int n0 = (u - nkc - nvc) * NC;
            stage_rows<NC, DV, LV, T>(dst, dob + (size_t)(r0 + n0) * vd, vd, qrows - n0, (int)vd, vd4);
        } else {
            const int n0 = (u - nkc - nvc - nrc) * NC;
            stage_rows<NC, DQ, LQ, T>(dst, qb + (size_t)(r0 + n0) * qk, qk, qrows - n0, (int)qk, qk4);
        }
    };

    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    float s[TMS][TNS], dp[TMS][TNS], acc_k[OK::TMO][8], acc_v[OV::TMO][8];
    zero(acc_k);
    zero(acc_v);
    float L[TNS], D[TNS];
    unsigned vis[TNS];

    unsigned tile = next_live(0);
    if (tile < n_tiles) {
        stage_rows<BM, DQ, LQ, T>(Ks, k + first_key * qk, qk, nkeys, (int)qk, qk4);
        stage_rows<BM, DV, LV, T>(Vs, v + first_key * vd, vd, nkeys, (int)vd, vd4);
        issue(tile, 0, 0);
    }
    int buf = 0;
    while (tile < n_tiles) {
        const unsigned next = next_live(tile + 1);
        for (int u = 0; u < per_tile; ++u, buf ^= 1) {
            cp_async_wait_all();
            __syncthreads();
            if (u + 1 < per_tile) {
                issue(tile, u + 1, buf ^ 1);
            } else if (next < n_tiles) {
                issue(next, 0, buf ^ 1);
            }
            const float* st = stages + buf * STAGE;
            if (u < nkc) {
                if (u == 0) {
                    zero(s);
#pragma unroll
                    for (int b = 0; b < TNS; ++b) {
                        const unsigned r = tile * BN + tx + b * TX;
                        vis[b] = r < M ? visible_keys(r % q_len, q_len, kv_len, causal) : 0;
                        L[b] = r < M ? lse[first_row + r] : 0.0f;
                        D[b] = r < M ? delta[first_row + r] : 0.0f;
                    }
                }
                score_chunk<TMS, TNS, TY, TX, KC, LQ, LC>(s, Ks + u * KC, st, ty, tx);
            } else if (u < nkc + nvc) {
                const int c = u - nkc;
                if (c == 0) zero(dp);
                score_chunk<TMS, TNS, TY, TX, KC, LV, LC>(dp, Vs + c * KC, st, ty, tx);
                if (c == nvc - 1) {
#pragma unroll
                    for (int a = 0; a < TMS; ++a) {
                        const unsigned j = key0 + ty + a * TY;
#pragma unroll
                        for (int b = 0; b < TNS; ++b) {
                            const float p = j < vis[b] ? expf(s[a][b] * scale - L[b]) : 0.0f;
                            const int at = (tx + b * TX) * LP + ty + a * TY;
                            Ps[at] = p;
                            Dss[at] = p * (dp[a][b] - D[b]);
                        }
                    }
                }
            } else if (u < nkc + nvc + nrc) {
                const int c = u - nkc - nvc;
                accumulate_chunk<OV::TMO, DV, NC, LP, LV>(acc_v, Ps + c * NC * LP, st, (tid / OV::CG) * OV::TMO,
                                                          (tid % OV::CG) * 4);
            } else {
                const int c = u - nkc - nvc - nrc;
                accumulate_chunk<OK::TMO, DQ, NC, LP, LQ>(acc_k, Dss + c * NC * LP, st, (tid / OK::CG) * OK::TMO,
                                                          (tid % OK::CG) * 4);
            }
        }
        tile = next;
    }
#pragma unroll
    for (int i = 0; i < OK::TMO; ++i) {
        const int r = (tid / OK::CG) * OK::TMO + i;
        if (r >= nkeys) continue;
        float* row = dk + (first_key + r) * qk;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = out_col<DQ>(tid % OK::CG, j);
            if (col < (int)qk) row[col] = scale * acc_k[i][j];
        }
    }
#pragma unroll
    for (int i = 0; i < OV::TMO; ++i) {
        const int r = (tid / OV::CG) * OV::TMO + i;
        if (r >= nkeys) continue;
        float* row = dv + (first_key + r) * vd;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = out_col<DV>(tid % OV::CG, j);
            if (col < (int)vd) row[col] = acc_v[i][j];
        }
    }
}

// The instances, each named by the widest heads it takes (the launcher picks the narrowest that
// fits). Tiles<DQ, DV, BM, BN, T, KC, NC, TX>.
// Training: 64 queries by 64 keys. d128 (86 KB) and q256_v128 (MLA's 192 / 128; 100 KB) run two
// blocks per multiprocessor, d256 one.
using FwdD128 = Tiles<128, 128, 64, 64, 128, 64, 32, 16>;
using FwdQ256V128 = Tiles<256, 128, 64, 64, 128, 32, 16, 16>;
using FwdD256 = Tiles<256, 256, 64, 64, 256, 64, 16, 16>;
// MLA decode: 32 packed rows (heads) by 128 keys of [c ; k_pe] (576) and c (512), 127 KB.
using FwdQ576V512 = Tiles<576, 512, 32, 128, 256, 32, 8, 32>;
// The dq pass of d128 (101 KB, at most 128 registers) runs two blocks per multiprocessor.
using DqD128 = Tiles<128, 128, 64, 64, 256, 32, 16, 16>;
using DkvD128 = Tiles<128, 128, 64, 64, 256, 64, 32, 16>;
using BwdQ256V128 = Tiles<256, 128, 64, 64, 256, 64, 16, 16>;
using BwdD256 = Tiles<256, 256, 64, 64, 256, 64, 16, 16>;

#define FORWARD_ARGS                                                                                 \
    const float *q, const float *k, const float *v, float *o, float *lse, unsigned q_heads,         \
        unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd, float scale, \
        int causal, unsigned tiles_per_split
#define FORWARD_PASS q, k, v, o, lse, q_heads, kv_heads, q_len, kv_len, qk, vd, scale, causal, tiles_per_split
#define DQ_ARGS                                                                                      \
    const float *q, const float *k, const float *v, const float *o, const float *lse,               \
        const float *d_o, float *dq, float *delta, unsigned q_heads, unsigned kv_heads,              \
        unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd, float scale, int causal
#define DQ_PASS q, k, v, o, lse, d_o, dq, delta, q_heads, kv_heads, q_len, kv_len, qk, vd, scale, causal
#define DKV_ARGS                                                                                     \
    const float *q, const float *k, const float *v, const float *d_o, const float *lse,             \
        const float *delta, float *dk, float *dv, unsigned q_heads, unsigned kv_heads,               \
        unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd, float scale, int causal
#define DKV_PASS q, k, v, d_o, lse, delta, dk, dv, q_heads, kv_heads, q_len, kv_len, qk, vd, scale, causal

extern "C" __global__ void __launch_bounds__(128, 2) attention_forward_d128_f32(FORWARD_ARGS) {
    forward_tiled<FwdD128>(FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 2) attention_forward_q256_v128_f32(FORWARD_ARGS) {
    forward_tiled<FwdQ256V128>(FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_forward_d256_f32(FORWARD_ARGS) {
    forward_tiled<FwdD256>(FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_forward_q576_v512_f32(FORWARD_ARGS) {
    forward_tiled<FwdQ576V512>(FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(256, 2) attention_backward_dq_d128_f32(DQ_ARGS) {
    backward_dq_tiled<DqD128>(DQ_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_backward_dq_q256_v128_f32(DQ_ARGS) {
    backward_dq_tiled<BwdQ256V128>(DQ_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_backward_dq_d256_f32(DQ_ARGS) {
    backward_dq_tiled<BwdD256>(DQ_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_backward_dkv_d128_f32(DKV_ARGS) {
    backward_dkv_tiled<DkvD128>(DKV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_backward_dkv_q256_v128_f32(DKV_ARGS) {
    backward_dkv_tiled<BwdQ256V128>(DKV_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_backward_dkv_d256_f32(DKV_ARGS) {
    backward_dkv_tiled<BwdD256>(DKV_PASS);
}

// ---- The simple kernels: one block per row, any head up to 8 * blockDim.x wide. ----

// Attention forward with an online softmax, one block per query row; the block computes each
// key's score with a reduction and every thread owns a strided slice of the output.
#define MAX_SLICE 8 // output values per thread: v_dim <= 8 * blockDim.x

extern "C" __global__ void attention_forward_f32(
    const float* q, const float* k, const float* v, float* o, float* lse,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    float* shared = attention_smem();
    unsigned row = blockIdx.x; // (b, h, i)
    unsigned i = row % q_len, bh = row / q_len, h = bh % q_heads, b = bh / q_heads;
    unsigned kvh = h / (q_heads / kv_heads);
    const float* qr = q + (size_t)row * qk;
    const float* kb = k + ((size_t)b * kv_heads + kvh) * kv_len * qk;
    const float* vb = v + ((size_t)b * kv_heads + kvh) * kv_len * vd;
    unsigned last = visible_keys(i, q_len, kv_len, causal);
    float acc[MAX_SLICE];
    for (int s = 0; s < MAX_SLICE; ++s) acc[s] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (unsigned j = 0; j < last; ++j) {
        float part = 0.0f;
        for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qr[d] * kb[(size_t)j * qk + d];
        float s = scale * block_sum(part, shared);
        float m_new = fmaxf(m, s);
        float alpha = expf(m - m_new), p = expf(s - m_new);
        l = l * alpha + p;
        for (int t = 0; t < MAX_SLICE; ++t) {
            unsigned d = threadIdx.x + t * blockDim.x;
            if (d < vd) acc[t] = acc[t] * alpha + p * vb[(size_t)j * vd + d];
        }
        m = m_new;
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < vd) o[(size_t)row * vd + d] = l > 0.0f ? acc[t] / l : 0.0f;
    }
    if (threadIdx.x == 0) lse[row] = m + logf(l);
}

// Attention backward, pass 1: one block per query row recomputes its probabilities from the
// forward's lse and writes dq and D_i = dot(dO_i, O_i) (delta [batch, q_heads, q_len], pass 2's
// input). dS_ij = P_ij (dP_ij - D_i) with dP_ij = dot(dO_i, v_j); dq_i = scale * sum_j dS_ij k_j.
// Each thread owns a strided slice of dq: qk <= 8 * blockDim.x.
extern "C" __global__ void attention_backward_dq_f32(
    const float* q, const float* k, const float* v, const float* o, const float* lse, const float* d_o,
    float* dq, float* delta,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    float* shared = attention_smem();
    unsigned row = blockIdx.x; // (b, h, i)
    unsigned i = row % q_len, bh = row / q_len, h = bh % q_heads, b = bh / q_heads;
    unsigned kvh = h / (q_heads / kv_heads);
    const float* qr = q + (size_t)row * qk;
    const float* orow = o + (size_t)row * vd;
    const float* dor = d_o + (size_t)row * vd;
    const float* kb = k + ((size_t)b * kv_heads + kvh) * kv_len * qk;
    const float* vb = v + ((size_t)b * kv_heads + kvh) * kv_len * vd;
    float part = 0.0f;
    for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += dor[d] * orow[d];
    float D = block_sum(part, shared);
    if (threadIdx.x == 0) delta[row] = D;
    float L = lse[row];
    float acc[MAX_SLICE];
    for (int t = 0; t < MAX_SLICE; ++t) acc[t] = 0.0f;
    unsigned last = visible_keys(i, q_len, kv_len, causal);
    for (unsigned j = 0; j < last; ++j) {
        // The forward's products in the forward's order: the same score.
        part = 0.0f;
        for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qr[d] * kb[(size_t)j * qk + d];
        float s = scale * block_sum(part, shared);
        part = 0.0f;
        for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += dor[d] * vb[(size_t)j * vd + d];
        float dp = block_sum(part, shared);
        float ds = expf(s - L) * (dp - D);
        for (int t = 0; t < MAX_SLICE; ++t) {
            unsigned d = threadIdx.x + t * blockDim.x;
            if (d < qk) acc[t] += ds * kb[(size_t)j * qk + d];
        }
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < qk) dq[(size_t)row * qk + d] = scale * acc[t];
    }
}

// Attention backward, pass 2: one block per key row (b, kv head, j) walks every query of the query
// heads that read its KV head and writes dk_j = scale * sum_i dS_ij q_i and dv_j = sum_i P_ij dO_i;
// each key row has one writer, so no atomics. Each thread owns strided slices of dk and dv:
// qk, vd <= 8 * blockDim.x.
extern "C" __global__ void attention_backward_dkv_f32(
    const float* q, const float* k, const float* v, const float* d_o, const float* lse, const float* delta,
    float* dk, float* dv,
    unsigned q_heads, unsigned kv_heads, unsigned q_len, unsigned kv_len, unsigned qk, unsigned vd,
    float scale, int causal) {
    float* shared = attention_smem();
    unsigned row = blockIdx.x; // (b, kv head, j)
    unsigned j = row % kv_len, bkv = row / kv_len, kvh = bkv % kv_heads, b = bkv / kv_heads;
    unsigned group = q_heads / kv_heads;
    const float* kr = k + (size_t)row * qk;
    const float* vr = v + (size_t)row * vd;
    float acc_k[MAX_SLICE], acc_v[MAX_SLICE];
    for (int t = 0; t < MAX_SLICE; ++t) acc_k[t] = acc_v[t] = 0.0f;
    unsigned first = first_query(j, q_len, kv_len, causal);
    for (unsigned h = kvh * group; h < (kvh + 1) * group; ++h) {
        size_t head = ((size_t)b * q_heads + h) * q_len;
        for (unsigned i = first; i < q_len; ++i) {
            const float* qi = q + (head + i) * qk;
            const float* doi = d_o + (head + i) * vd;
            float part = 0.0f;
            for (unsigned d = threadIdx.x; d < qk; d += blockDim.x) part += qi[d] * kr[d];
            float s = scale * block_sum(part, shared);
            part = 0.0f;
            for (unsigned d = threadIdx.x; d < vd; d += blockDim.x) part += doi[d] * vr[d];
            float dp = block_sum(part, shared);
            float p = expf(s - lse[head + i]);
            float ds = p * (dp - delta[head + i]);
            for (int t = 0; t < MAX_SLICE; ++t) {
                unsigned d = threadIdx.x + t * blockDim.x;
                if (d < qk) acc_k[t] += ds * qi[d];
                if (d < vd) acc_v[t] += p * doi[d];
            }
        }
    }
    for (int t = 0; t < MAX_SLICE; ++t) {
        unsigned d = threadIdx.x + t * blockDim.x;
        if (d < qk) dk[(size_t)row * qk + d] = scale * acc_k[t];
        if (d < vd) dv[(size_t)row * vd + d] = acc_v[t];
    }
}
