// The generic kernels behind whale-tensor's CUDA backend: elementwise maps (and their
// derivatives) selected by an op code, binary ops over broadcast strided operands, the strided
// copy that makes a view contiguous, a fill, a sum over the middle axis of [outer, n, inner], and
// the conversions of bf16 storage.
// CPU twins: the CPU paths of whale-tensor's ops (ops/elementwise.rs, ops/shape.rs,
// ops/reduce.rs), whose formulas these repeat; the op codes are whale_kernels::cuda::UnaryOp
// and BinaryOp.

#include <cuda_bf16.h>

#include "common.cuh"
#include "shared_memory.cuh"

#define MAX_RANK 6

// Up to two strided operands over one row-major index space `shape`.
struct Strided {
    unsigned rank;
    unsigned shape[MAX_RANK];
    unsigned long long a[MAX_RANK];
    unsigned long long b[MAX_RANK];
    unsigned long long a_off, b_off;
};

__device__ __forceinline__ void offsets(const Strided& s, unsigned long long i, unsigned long long& oa, unsigned long long& ob) {
    oa = s.a_off;
    ob = s.b_off;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        unsigned long long c = i % s.shape[d];
        i /= s.shape[d];
        oa += c * s.a[d];
        ob += c * s.b[d];
    }
}

__device__ __forceinline__ float sigmoidf(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

#define GELU_C 0.7978846f

__device__ float unary(int op, float x, float p0, float p1) {
    switch (op) {
    case 0: return -x;
    case 1: return expf(x);
    case 2: return logf(x);
    case 3: return sqrtf(x);
    case 4: return 1.0f / sqrtf(x);
    case 5: return x * x;
    case 6: return powf(x, p0);
    case 7: return sigmoidf(x);
    case 8: return tanhf(x);
    case 9: return isnan(x) ? x : fmaxf(x, 0.0f); // NaN stays NaN, as torch.relu
    case 10: return x * sigmoidf(x);
    case 11: return 0.5f * x * (1.0f + tanhf(GELU_C * (x + 0.044715f * x * x * x)));
    case 12: return isnan(x) ? x : fminf(fmaxf(x, p0), p1); // NaN stays NaN, as f32::clamp
    default: return x * p0 + p1; // 13: affine
    }
}

// d unary(x) / dx from the input x and the output y.
__device__ float unary_derivative(int op, float x, float y, float p0, float p1) {
    switch (op) {
    case 0: return -1.0f;
    case 1: return y;
    case 2: return 1.0f / x;
    case 3: return 0.5f / y;
    case 4: return -0.5f * y / x;
    case 5: return 2.0f * x;
    case 6: return p0 == 0.0f ? 0.0f : p0 * powf(x, p0 - 1.0f); // d(x^0)/dx = 0, at 0 too
    case 7: return y * (1.0f - y);
    case 8: return 1.0f - y * y;
    case 9: return x <= 0.0f ? 0.0f : 1.0f; // torch: zero where x <= 0, NaN passes
    case 10: {
        float s = sigmoidf(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case 11: {
        float t = tanhf(GELU_C * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * 0.044715f * x * x);
    }
    case 12: return (x >= p0 && x <= p1) ? 1.0f : 0.0f;
    default: return p0;
    }
}

extern "C" __global__ void unary_f32(const float* x, float* y, unsigned n, int op, float p0, float p1) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        y[i] = unary(op, x[i], p0, p1);
}

extern "C" __global__ void unary_backward_f32(
    const float* x, const float* y, const float* g, float* dx, unsigned n, int op, float p0, float p1) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dx[i] = g[i] * unary_derivative(op, x[i], y[i], p0, p1);
}

// out[i] = a[..] op b[..] over the broadcast index space; op: 0 add, 1 sub, 2 mul, 3 div,
// 4 maximum, 5 greater-or-equal (1 or 0), 6 b where a != 0 else 0, 7 0 where a != 0 else b.
extern "C" __global__ void binary_f32(const float* a, const float* b, float* out, unsigned n, int op, Strided s) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned long long oa, ob;
        offsets(s, i, oa, ob);
        float x = a[oa], z = b[ob], r;
        switch (op) {
        case 0: r = x + z; break;
        case 1: r = x - z; break;
        case 2: r = x * z; break;
        case 3: r = x / z; break;
        case 4: r = (x != x || z != z) ? x + z : fmaxf(x, z); break; // NaN wins, as torch.maximum
        case 5: r = x >= z ? 1.0f : 0.0f; break;
        case 6: r = x != 0.0f ? z : 0.0f; break;
        default: r = x != 0.0f ? 0.0f : z;
        }
        out[i] = r;
    }
}

// y (contiguous) = the view of x described by s.a / s.a_off.
extern "C" __global__ void strided_copy_f32(const float* x, float* y, unsigned n, Strided s) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned long long oa, ob;
        offsets(s, i, oa, ob);
        y[i] = x[oa];
    }
}

// The view s.b of y (its other elements untouched) = x (contiguous, `n` elements), values moved
// as they are: f32, and bf16 storage as its raw bits (a decode cache's append).
template <typename T>
__device__ __forceinline__ void strided_write(const T* x, T* y, unsigned n, const Strided& s) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned long long oa, ob;
        offsets(s, i, oa, ob);
        y[ob] = x[i];
    }
}

extern "C" __global__ void strided_write_f32(const float* x, float* y, unsigned n, Strided s) {
    strided_write(x, y, n, s);
}

extern "C" __global__ void strided_write_bf16(const unsigned short* x, unsigned short* y, unsigned n, Strided s) {
    strided_write(x, y, n, s);
}

extern "C" __global__ void fill_f32(float* y, unsigned n, float v) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = v;
}

// bf16 storage: y = x rounded to bf16 (to nearest even, the CPU's `half::bf16::from_f32`), as
// raw bits; and back to f32 (exact). A grid-stride loop over n values each.
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        y[i] = __bfloat16_as_ushort(__float2bfloat16_rn(x[i]));
    }
}

extern "C" __global__ void bf16_to_f32(const unsigned short* x, float* y, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        y[i] = __bfloat162float(__ushort_as_bfloat16(x[i]));
    }
}

// out = c != 0 ? t : f over contiguous operands (where_cond after broadcasting).
extern "C" __global__ void select_f32(const float* c, const float* t, const float* f, float* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = c[i] != 0.0f ? t[i] : f[i];
}

// Runs `reduce(p, n, inner)` for every output (o, i) of x seen as [outer, n, inner], with p at
// x[o, 0, i] and the n values `inner` apart, one thread per output (grid-stride).
template <class Reduce>
__device__ void reduce_mid(const float* x, float* y, unsigned outer, unsigned n, unsigned inner, Reduce reduce) {
    unsigned long long total = (unsigned long long)outer * inner;
    for (unsigned long long t = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; t < total;
         t += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long o = t / inner, i = t % inner;
        y[t] = reduce(x + o * n * inner + i, n, (unsigned long long)inner);
    }
}

// The index of the first maximum (a NaN counts as the maximum), as a float: the CPU's argmax,
// comparison for comparison.
struct Argmax {
    __device__ float operator()(const float* p, unsigned n, unsigned long long stride) const {
        unsigned best = 0;
        float best_v = -INFINITY;
        for (unsigned j = 0; j < n; ++j) {
            float v = p[j * stride];
            if (isnan(v)) return (float)j;
            if (v > best_v || j == 0) {
                best = j;
                best_v = v;
            }
        }
        return (float)best;
    }
};

// log(sum exp) with the max subtracted, the sum in f64 like the CPU.
struct LogSumExp {
    __device__ float operator()(const float* p, unsigned n, unsigned long long stride) const {
        float m = -INFINITY;
        for (unsigned j = 0; j < n; ++j) m = fmaxf(m, p[j * stride]);
        // fmaxf skips NaN: an infinite max (all -inf, or a +inf) is the answer unless a NaN is
        // there too (torch.logsumexp), which a finite max passes on through the sum.
        if (isinf(m)) {
            for (unsigned j = 0; j < n; ++j)
                if (p[j * stride] != p[j * stride]) return p[j * stride];
            return m;
        }
        double acc = 0.0;
        for (unsigned j = 0; j < n; ++j) acc += exp((double)(p[j * stride] - m));
        return m + (float)log(acc);
    }
};

// The sum, accumulated in f64 like the CPU.
struct Sum {
    __device__ float operator()(const float* p, unsigned n, unsigned long long stride) const {
        double acc = 0.0;
        for (unsigned j = 0; j < n; ++j) acc += p[j * stride];
        return (float)acc;
    }
};

extern "C" __global__ void argmax_mid_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    reduce_mid(x, y, outer, n, inner, Argmax());
}

extern "C" __global__ void logsumexp_mid_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    reduce_mid(x, y, outer, n, inner, LogSumExp());
}

extern "C" __global__ void sum_mid_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    reduce_mid(x, y, outer, n, inner, Sum());
}

// The same sum when the outputs are too few to keep the GPU busy one thread each and the axis is
// long (the whole-tensor sums of the gradient norm): one block per output (grid-stride), each
// thread summing every blockDim.x-th of the n values in f64, then the block's tree. The f64
// additions come in another order than the CPU's single pass, so the f32 result is the CPU's
// unless the exact sum lies within f64 rounding of an f32 rounding boundary (then one ulp off).
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void sum_mid_wide_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    double* shared = reinterpret_cast<double*>(dynamic_shared_memory());
    unsigned long long total = (unsigned long long)outer * inner;
    for (unsigned long long t = blockIdx.x; t < total; t += gridDim.x) {
        const float* p = x + (t / inner) * n * inner + t % inner;
        double acc = 0.0;
        for (unsigned j = threadIdx.x; j < n; j += blockDim.x) acc += p[(unsigned long long)j * inner];
        acc = block_sum(acc, shared);
        if (threadIdx.x == 0) y[t] = (float)acc;
    }
}

// The first pass of a long sum over few outputs (a whole tensor's, a gradient norm's): sum_mid_wide_f32
// would leave all but a few multiprocessors idle, so each output's axis is cut into `chunks` equal
// runs, a block each (block b: output b / chunks, run b % chunks), and each block writes its run's
// f64 sum to partial[b]. Four loads per thread are in flight before their adds (four f64
// accumulators, added in a fixed order: the result does not depend on timing).
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void sum_mid_split_f32(const float* x, double* partial, unsigned n, unsigned inner, unsigned chunks) {
    double* shared = reinterpret_cast<double*>(dynamic_shared_memory());
    unsigned long long t = blockIdx.x / chunks;
    unsigned run = (n + chunks - 1) / chunks, c = blockIdx.x % chunks;
    unsigned j0 = c * run, j1 = min(n, j0 + run);
    const float* p = x + (t / inner) * n * inner + t % inner;
    unsigned step = blockDim.x;
    double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
    unsigned j = j0 + threadIdx.x;
    for (; j + 3 * step < j1; j += 4 * step) {
        float v0 = p[(unsigned long long)j * inner], v1 = p[(unsigned long long)(j + step) * inner];
        float v2 = p[(unsigned long long)(j + 2 * step) * inner], v3 = p[(unsigned long long)(j + 3 * step) * inner];
        a0 += v0;
        a1 += v1;
        a2 += v2;
        a3 += v3;
    }
    for (; j < j1; j += step) a0 += p[(unsigned long long)j * inner];
    double acc = block_sum((a0 + a1) + (a2 + a3), shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// The second pass: y[t] = the sum of output t's `chunks` partial sums, a block per output
// (grid-stride), rounded to f32 once. Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void sum_partials_f32(const double* partial, float* y, unsigned outputs, unsigned chunks) {
    double* shared = reinterpret_cast<double*>(dynamic_shared_memory());
    for (unsigned t = blockIdx.x; t < outputs; t += gridDim.x) {
        double acc = 0.0;
        for (unsigned c = threadIdx.x; c < chunks; c += blockDim.x) acc += partial[(unsigned long long)t * chunks + c];
        acc = block_sum(acc, shared);
        if (threadIdx.x == 0) y[t] = (float)acc;
    }
}

// argmax_mid_f32 with one block per output (grid-stride), for a long axis (a vocabulary's logits
// in greedy decoding): each thread keeps the first of every blockDim.x-th value in
// `ranks_before`'s order, then the block's tree the first of those; the same index as the
// one-thread scan (that order is total). Dynamic shared memory: blockDim.x floats and as many unsigned.
extern "C" __global__ void argmax_mid_wide_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    float* sv = reinterpret_cast<float*>(dynamic_shared_memory());
    unsigned* sj = reinterpret_cast<unsigned*>(sv + blockDim.x);
    unsigned long long total = (unsigned long long)outer * inner;
    for (unsigned long long t = blockIdx.x; t < total; t += gridDim.x) {
        const float* p = x + (t / inner) * n * inner + t % inner;
        float bv = -INFINITY;
        unsigned bj = RANK_NONE;
        for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
            float v = p[(unsigned long long)j * inner];
            if (ranks_before(v, j, bv, bj)) {
                bv = v;
                bj = j;
            }
        }
        sv[threadIdx.x] = bv;
        sj[threadIdx.x] = bj;
        __syncthreads();
        for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s && ranks_before(sv[threadIdx.x + s], sj[threadIdx.x + s], sv[threadIdx.x], sj[threadIdx.x])) {
                sv[threadIdx.x] = sv[threadIdx.x + s];
                sj[threadIdx.x] = sj[threadIdx.x + s];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) y[t] = sj[0] == RANK_NONE ? 0.0f : (float)sj[0];
        __syncthreads();
    }
}

// logsumexp_mid_f32 with one block per output (grid-stride), for a long axis: the block's max
// (fmaxf: NaN skipped), then, for a finite max, the f64 sum of exp(x - max) split over the threads
// (another order than the one-thread sum: the same f32 result unless the exact value lies within
// f64 rounding of an f32 boundary); an infinite max is the answer unless the axis holds a NaN.
// Dynamic shared memory: blockDim.x doubles.
extern "C" __global__ void logsumexp_mid_wide_f32(const float* x, float* y, unsigned outer, unsigned n, unsigned inner) {
    double* shared = reinterpret_cast<double*>(dynamic_shared_memory());
    float* fshared = reinterpret_cast<float*>(shared);
    unsigned long long total = (unsigned long long)outer * inner;
    for (unsigned long long t = blockIdx.x; t < total; t += gridDim.x) {
        const float* p = x + (t / inner) * n * inner + t % inner;
        float m = -INFINITY;
        double nans = 0.0;
        for (unsigned j = threadIdx.x; j < n; j += blockDim.x) {
            float v = p[(unsigned long long)j * inner];
            m = fmaxf(m, v);
            nans += isnan(v) ? 1.0 : 0.0;
        }
        m = block_max(m, fshared);
        nans = block_sum(nans, shared);
        float r;
        if (isinf(m)) {
            r = nans > 0.0 ? nanf("") : m;
        } else {
            double acc = 0.0;
            for (unsigned j = threadIdx.x; j < n; j += blockDim.x) acc += exp((double)(p[(unsigned long long)j * inner] - m));
            acc = block_sum(acc, shared);
            r = m + (float)log(acc);
        }
        if (threadIdx.x == 0) y[t] = r;
    }
}
