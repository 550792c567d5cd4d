// cuBLAS for the emulated GPU (see driver.cpp): built with soname libcublas.so and loaded before
// cudarc looks for cuBLAS, it serves the GEMMs whale-kernels calls (cuda/blas.rs): f32 (Sgemm and
// its strided batches) and bf16 with f32 compute (GemmEx and its strided batches), column-major
// with cuBLAS's transposes, on host memory. Each output sums its products in double and rounds
// once, to f32, then to the output's type: a product rounded once, as cuBLAS's is with reduced-
// precision reductions disallowed (the order of its sums aside).
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

typedef int Status;
constexpr Status kSuccess = 0, kNotSupported = 15;
constexpr int kOpN = 0, kR32F = 0, kR16BF = 14;

int handle_token;

float load(const void* p, int type, long long i) {
    if (type == kR32F) return static_cast<const float*>(p)[i];
    unsigned u = unsigned(static_cast<const unsigned short*>(p)[i]) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

void store(void* p, int type, long long i, float x) {
    if (type == kR32F) {
        static_cast<float*>(p)[i] = x;
        return;
    }
    unsigned u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { // NaN: the canonical quiet one
        static_cast<unsigned short*>(p)[i] = 0x7fff;
        return;
    }
    u += 0x7fff + ((u >> 16) & 1);
    static_cast<unsigned short*>(p)[i] = (unsigned short)(u >> 16);
}

// `rows` rows of `k` values, row-major in f32, from column-major X: row r's value p is X's element
// (r, p) (at r + p ld), or (p, r) when `along_columns` (at p + r ld). Each output's products then
// read two contiguous rows (a strided load of bf16 or f32 per product had been most of the GEMMs'
// time); the sums are the same.
void pack(std::vector<float>& out, const void* x, int type, int ld, long long offset, bool along_columns, int rows,
          int k) {
    out.resize((size_t)rows * k);
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < k; ++p) {
            long long at = along_columns ? p + (long long)r * ld : r + (long long)p * ld;
            out[(size_t)r * k + p] = load(x, type, offset + at);
        }
}

// C = alpha op(A) op(B) + beta C, column-major, over `batch` strided problems.
Status gemm(int ta, int tb, int m, int n, int k, float alpha, const void* a, int atype, int lda, long long sa,
            const void* b, int btype, int ldb, long long sb, float beta, void* c, int ctype, int ldc, long long sc,
            int batch) {
    for (int t : {atype, btype, ctype})
        if (t != kR32F && t != kR16BF) return kNotSupported;
    std::vector<float> ap, bp;
    for (int z = 0; z < batch; ++z) {
        // op(A)'s m rows: A's (i, p), or (p, i) transposed. op(B)'s n columns: B's (p, j), which
        // is along B's column j, or (j, p) transposed.
        pack(ap, a, atype, lda, z * sa, ta != kOpN, m, k);
        pack(bp, b, btype, ldb, z * sb, tb == kOpN, n, k);
        // Four outputs at a time along the longer of op(C)'s sides, each its own sum over p in
        // order (the same sums as one at a time): four independent chains of adds, where one
        // chain waited on each add.
        auto put = [&](int i, int j, double acc) {
            long long ci = z * sc + i + (long long)j * ldc;
            float r = alpha * float(acc);
            if (beta != 0.0f) r += beta * load(c, ctype, ci);
            store(c, ctype, ci, r);
        };
        const bool along_j = n >= m;
        const int outer = along_j ? m : n, inner = along_j ? n : m;
        const std::vector<float>& fixed = along_j ? ap : bp;
        const std::vector<float>& moving = along_j ? bp : ap;
        for (int o = 0; o < outer; ++o) {
            const float* x = fixed.data() + (size_t)o * k;
            int v = 0;
            for (; v + 4 <= inner; v += 4) {
                const float *y0 = moving.data() + (size_t)v * k, *y1 = y0 + k, *y2 = y1 + k, *y3 = y2 + k;
                // Scalars, not an array: g++ kept an array's sums in memory, each add waiting on
                // a store.
                double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
                for (int p = 0; p < k; ++p) {
                    const double xp = x[p];
                    a0 += xp * double(y0[p]);
                    a1 += xp * double(y1[p]);
                    a2 += xp * double(y2[p]);
                    a3 += xp * double(y3[p]);
                }
                const double acc[4] = {a0, a1, a2, a3};
                for (int u = 0; u < 4; ++u) along_j ? put(o, v + u, acc[u]) : put(v + u, o, acc[u]);
            }
            for (; v < inner; ++v) {
                const float* y = moving.data() + (size_t)v * k;
                double acc = 0.0;
                for (int p = 0; p < k; ++p) acc += double(x[p]) * double(y[p]);
                along_j ? put(o, v, acc) : put(v, o, acc);
            }
        }
    }
    return kSuccess;
}

} // namespace

#define API extern "C" __attribute__((visibility("default")))

API Status cublasCreate_v2(void** h) {
    *h = &handle_token;
    return kSuccess;
}
API Status cublasDestroy_v2(void*) { return kSuccess; }
API Status cublasSetStream_v2(void*, void*) { return kSuccess; }
API Status cublasSetMathMode(void*, int) { return kSuccess; }
API Status cublasSetWorkspace_v2(void*, void*, size_t) { return kSuccess; }

API Status cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                          const float* b, int ldb, const float* beta, float* c, int ldc) {
    return gemm(ta, tb, m, n, k, *alpha, a, kR32F, lda, 0, b, kR32F, ldb, 0, *beta, c, kR32F, ldc, 0, 1);
}
API Status cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a,
                                     int lda, long long sa, const float* b, int ldb, long long sb, const float* beta,
                                     float* c, int ldc, long long sc, int batch) {
    return gemm(ta, tb, m, n, k, *alpha, a, kR32F, lda, sa, b, kR32F, ldb, sb, *beta, c, kR32F, ldc, sc, batch);
}
// The compute type is f32 (the only one whale-kernels asks for): alpha and beta are floats.
API Status cublasGemmEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int atype,
                        int lda, const void* b, int btype, int ldb, const void* beta, void* c, int ctype, int ldc, int,
                        int) {
    return gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha), a, atype, lda, 0, b, btype, ldb, 0,
                *static_cast<const float*>(beta), c, ctype, ldc, 0, 1);
}
API Status cublasGemmStridedBatchedEx(void*, int ta, int tb, int m, int n, int k, const void* alpha, const void* a,
                                      int atype, int lda, long long sa, const void* b, int btype, int ldb,
                                      long long sb, const void* beta, void* c, int ctype, int ldc, long long sc,
                                      int batch, int, int) {
    return gemm(ta, tb, m, n, k, *static_cast<const float*>(alpha), a, atype, lda, sa, b, btype, ldb, sb,
                *static_cast<const float*>(beta), c, ctype, ldc, sc, batch);
}
