// The tiled attention kernels (kernels/attention.cu) run in host emulation (cuda_host.h) against
// attention computed directly in double: the forward of every instance (key splits merged by
// attention_combine_f32 among them, MLA decode over the latent cache), and both backward passes
// of every instance, on shapes that are ragged against the tiles, causal with fully masked rows,
// grouped-query, and with heads whose width is not a multiple of 4 (the scalar copy path).
// Launches as crates/kernels/src/cuda/attention.rs makes them. Exit status 1 on any mismatch.
// Built and run by crates/kernels/tests/emulate.rs.
#include "../attention.cu"

#include <cmath>

namespace {

struct Shape {
    unsigned batch, q_heads, kv_heads, q_len, kv_len, qk, vd;
    bool causal;
    float scale() const { return 1.0f / std::sqrt(float(qk)); }
    size_t q_rows() const { return size_t(batch) * q_heads * q_len; }
    size_t kv_rows() const { return size_t(batch) * kv_heads * kv_len; }
};

std::vector<float> values(size_t n, unsigned seed) {
    unsigned s = seed * 2654435761u + 1;
    std::vector<float> v(n);
    for (float& x : v) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        x = float(s) / 4294967295.0f * 4.0f - 2.0f;
    }
    return v;
}

// Attention and its gradients in double, from the same f32 inputs.
struct Reference {
    std::vector<double> o, lse, dq, dk, dv, delta;
};

Reference reference(const Shape& s, const std::vector<float>& q, const std::vector<float>& k,
                    const std::vector<float>& v, const std::vector<float>& d_o, const std::vector<float>& o_in,
                    const std::vector<float>& lse_in) {
    Reference r;
    r.o.assign(s.q_rows() * s.vd, 0.0);
    r.lse.assign(s.q_rows(), -INFINITY);
    r.dq.assign(q.size(), 0.0);
    r.dk.assign(k.size(), 0.0);
    r.dv.assign(v.size(), 0.0);
    r.delta.assign(s.q_rows(), 0.0);
    const unsigned group = s.q_heads / s.kv_heads;
    const double scale = s.scale();
    for (unsigned b = 0; b < s.batch; ++b)
        for (unsigned h = 0; h < s.q_heads; ++h)
            for (unsigned i = 0; i < s.q_len; ++i) {
                const size_t row = (size_t(b) * s.q_heads + h) * s.q_len + i;
                const size_t kv0 = (size_t(b) * s.kv_heads + h / group) * s.kv_len;
                const unsigned n = visible_keys(i, s.q_len, s.kv_len, s.causal);
                std::vector<double> score(n);
                double m = -INFINITY;
                for (unsigned j = 0; j < n; ++j) {
                    double dot = 0;
                    for (unsigned c = 0; c < s.qk; ++c) dot += double(q[row * s.qk + c]) * k[(kv0 + j) * s.qk + c];
                    score[j] = dot * scale;
                    m = std::max(m, score[j]);
                }
                if (n == 0) continue; // no key: o = 0, lse = -inf, no gradient
                double l = 0;
                for (unsigned j = 0; j < n; ++j) l += std::exp(score[j] - m);
                r.lse[row] = m + std::log(l);
                for (unsigned j = 0; j < n; ++j)
                    for (unsigned c = 0; c < s.vd; ++c)
                        r.o[row * s.vd + c] += std::exp(score[j] - r.lse[row]) * v[(kv0 + j) * s.vd + c];
                // The backward from the forward the kernels were given (o_in, lse_in).
                double delta = 0;
                for (unsigned c = 0; c < s.vd; ++c) delta += double(d_o[row * s.vd + c]) * o_in[row * s.vd + c];
                r.delta[row] = delta;
                for (unsigned j = 0; j < n; ++j) {
                    const double p = std::exp(score[j] - lse_in[row]);
                    double dp = 0;
                    for (unsigned c = 0; c < s.vd; ++c) dp += double(d_o[row * s.vd + c]) * v[(kv0 + j) * s.vd + c];
                    const double ds = p * (dp - delta);
                    for (unsigned c = 0; c < s.qk; ++c) {
                        r.dq[row * s.qk + c] += scale * ds * k[(kv0 + j) * s.qk + c];
                        r.dk[(kv0 + j) * s.qk + c] += scale * ds * q[row * s.qk + c];
                    }
                    for (unsigned c = 0; c < s.vd; ++c) r.dv[(kv0 + j) * s.vd + c] += p * d_o[row * s.vd + c];
                }
            }
    return r;
}

// |got - want| <= 1e-5 (1 + |want|) element by element (the GPU tests' bound), and -inf exactly
// where the reference is.
bool close(const char* what, const char* name, const std::vector<float>& got, const std::vector<double>& want) {
    for (size_t i = 0; i < want.size(); ++i) {
        bool ok = std::isinf(want[i]) ? got[i] == want[i] : std::abs(got[i] - want[i]) <= 1e-5 * (1 + std::abs(want[i]));
        if (!ok) {
            std::printf("FAIL %s: %s[%zu] = %.9g, want %.9g\n", what, name, i, got[i], want[i]);
            return false;
        }
    }
    return true;
}

using ForwardKernel = void (*)(FORWARD_ARGS);
using DqKernel = void (*)(DQ_ARGS);
using DkvKernel = void (*)(DKV_ARGS);

// The forward of instance C over `splits` key splits (merged by attention_combine_f32 when more
// than one), as attention_forward_dev launches it.
template <class C>
bool forward(const char* what, ForwardKernel kernel, const Shape& s, unsigned splits, unsigned seed) {
    auto q = values(s.q_rows() * s.qk, seed), k = values(s.kv_rows() * s.qk, seed + 1),
         v = values(s.kv_rows() * s.vd, seed + 2);
    const unsigned heads = s.batch * s.kv_heads, row_tiles = (s.q_heads / s.kv_heads * s.q_len + C::BM - 1) / C::BM;
    const unsigned key_tiles = (s.kv_len + C::BN - 1) / C::BN, per_split = (key_tiles + splits - 1) / splits;
    const unsigned rows = unsigned(s.q_rows());
    std::vector<float> o(rows * s.vd, NAN), lse(rows, NAN);
    std::vector<float> o_part(size_t(splits) * rows * s.vd, NAN), lse_part(size_t(splits) * rows, NAN);
    float* o_out = splits == 1 ? o.data() : o_part.data();
    float* lse_out = splits == 1 ? lse.data() : lse_part.data();
    emu::launch(dim3{row_tiles, heads, splits}, C::T, sizeof(float) * ForwardSmem<C>::FLOATS, [&] {
        kernel(q.data(), k.data(), v.data(), o_out, lse_out, s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.qk, s.vd,
               s.scale(), s.causal, per_split);
    });
    if (splits > 1)
        emu::launch(dim3{rows, 1, 1}, 128, 0,
                    [&] { attention_combine_f32(o_part.data(), lse_part.data(), o.data(), lse.data(), rows, s.vd, splits); });
    Reference r = reference(s, q, k, v, std::vector<float>(o.size()), o, lse);
    bool ok = close(what, "o", o, r.o) && close(what, "lse", lse, r.lse);
    std::printf("%s forward: %s (%u key splits)\n", ok ? "ok  " : "FAIL", what, splits);
    return ok;
}

// Both backward passes of instance (Cq, Ckv), as attention_backward_dev launches them, from the
// reference forward rounded to f32.
template <class Cq, class Ckv>
bool backward(const char* what, DqKernel dq_kernel, DkvKernel dkv_kernel, const Shape& s, unsigned seed) {
    auto q = values(s.q_rows() * s.qk, seed), k = values(s.kv_rows() * s.qk, seed + 1),
         v = values(s.kv_rows() * s.vd, seed + 2), d_o = values(s.q_rows() * s.vd, seed + 3);
    Reference fwd = reference(s, q, k, v, std::vector<float>(s.q_rows() * s.vd), std::vector<float>(s.q_rows() * s.vd),
                              std::vector<float>(s.q_rows()));
    std::vector<float> o(fwd.o.begin(), fwd.o.end()), lse(fwd.lse.begin(), fwd.lse.end());
    Reference r = reference(s, q, k, v, d_o, o, lse);
    const unsigned heads = s.batch * s.kv_heads;
    std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN), delta(s.q_rows(), NAN);
    const unsigned q_tiles = (s.q_heads / s.kv_heads * s.q_len + Cq::BM - 1) / Cq::BM;
    emu::launch(dim3{q_tiles, heads, 1}, Cq::T, sizeof(float) * DqSmem<Cq>::FLOATS, [&] {
        dq_kernel(q.data(), k.data(), v.data(), o.data(), lse.data(), d_o.data(), dq.data(), delta.data(), s.q_heads,
                  s.kv_heads, s.q_len, s.kv_len, s.qk, s.vd, s.scale(), s.causal);
    });
    const unsigned key_tiles = (s.kv_len + Ckv::BM - 1) / Ckv::BM;
    emu::launch(dim3{key_tiles, heads, 1}, Ckv::T, sizeof(float) * DkvSmem<Ckv>::FLOATS, [&] {
        dkv_kernel(q.data(), k.data(), v.data(), d_o.data(), lse.data(), delta.data(), dk.data(), dv.data(), s.q_heads,
                   s.kv_heads, s.q_len, s.kv_len, s.qk, s.vd, s.scale(), s.causal);
    });
    bool ok = close(what, "delta", delta, r.delta) && close(what, "dq", dq, r.dq) && close(what, "dk", dk, r.dk) &&
              close(what, "dv", dv, r.dv);
    std::printf("%s backward: %s\n", ok ? "ok  " : "FAIL", what);
    return ok;
}

} // namespace

int main() {
    bool ok = true;
    // {batch, q_heads, kv_heads, q_len, kv_len, qk, vd, causal}
    const Shape gqa{2, 4, 2, 130, 130, 24, 40, true};         // ragged against 64-row tiles
    const Shape masked{1, 2, 1, 130, 70, 36, 20, true};       // more queries than keys: masked rows
    const Shape noncausal{1, 2, 2, 70, 200, 33, 17, false};   // widths not multiples of 4
    const Shape mla_train{1, 2, 2, 100, 130, 192, 128, true}; // MLA's training heads
    const Shape wide{1, 2, 1, 70, 90, 200, 160, true};        // heads of up to 256
    const Shape decode{2, 16, 1, 1, 300, 576, 512, true};     // MLA decode over the latent cache

    for (bool eager : {false, true}) {
        emu::eager_copies = eager;
        std::printf("cp.async landing %s:\n", eager ? "when issued" : "when waited for");
        ok &= forward<FwdD128>("d128, causal GQA", attention_forward_d128_f32, gqa, 1, 1);
        ok &= forward<FwdD128>("d128, causal GQA, split keys", attention_forward_d128_f32, gqa, 2, 2);
        ok &= forward<FwdD128>("d128, fully masked rows", attention_forward_d128_f32, masked, 1, 3);
        ok &= forward<FwdD128>("d128, non-causal, scalar copies", attention_forward_d128_f32, noncausal, 3, 4);
        ok &= forward<FwdQ256V128>("q256/v128, MLA training heads", attention_forward_q256_v128_f32, mla_train, 1, 5);
        ok &= forward<FwdD256>("d256", attention_forward_d256_f32, wide, 1, 6);
        ok &= forward<FwdQ576V512>("q576/v512, MLA decode, split keys", attention_forward_q576_v512_f32, decode, 3, 7);

        ok &= backward<DqD128, DkvD128>("d128, causal GQA", attention_backward_dq_d128_f32,
                                        attention_backward_dkv_d128_f32, gqa, 11);
        ok &= backward<DqD128, DkvD128>("d128, fully masked rows", attention_backward_dq_d128_f32,
                                        attention_backward_dkv_d128_f32, masked, 12);
        ok &= backward<DqD128, DkvD128>("d128, non-causal, scalar copies", attention_backward_dq_d128_f32,
                                        attention_backward_dkv_d128_f32, noncausal, 13);
        ok &= backward<BwdQ256V128, BwdQ256V128>("q256/v128, MLA training heads", attention_backward_dq_q256_v128_f32,
                                                 attention_backward_dkv_q256_v128_f32, mla_train, 14);
        ok &= backward<BwdD256, BwdD256>("d256", attention_backward_dq_d256_f32, attention_backward_dkv_d256_f32, wide,
                                         15);
    }
    return ok ? 0 : 1;
}
