// The MoE gate after its logits (spec deepseek-v3.md section 2.2, V3's `noaux_tc`), one block per
// token: affinities s (sigmoid, or softmax for V2), selection scores s + bias, the group-limited
// top-k on them (group score = sum of the top 2 for sigmoid, max for softmax; the other groups
// masked with -inf), and the combine weights from the unbiased s of the chosen experts.
// logits [T, E], bias [E] (read only when has_bias) -> ids [T, K], weights [T, K], scores [T, E].
// CPU twin: whale_kernels::cpu::router::route.
#include "common.cuh"
#include "shared_memory.cuh"

#define NONE RANK_NONE

// Dynamic shared memory, in 4-byte words: s [E], choice [E], taken [E], best_v [blockDim.x],
// best_i [blockDim.x], group_score [n_group], kept [n_group]. blockDim.x is a power of two.
extern "C" __global__ void moe_route_f32(
    const float* logits, const float* bias, int has_bias, unsigned* ids, float* weights, float* scores,
    unsigned n_experts, unsigned n_group, unsigned topk_group, unsigned top_k, int sigmoid, int norm_topk_prob,
    float routed_scaling_factor) {
    float* shared = reinterpret_cast<float*>(dynamic_shared_memory());
    unsigned E = n_experts, t = blockIdx.x;
    float* s = shared;
    float* choice = s + E;
    unsigned* taken = (unsigned*)(choice + E);
    float* best_v = (float*)(taken + E);
    unsigned* best_i = (unsigned*)(best_v + blockDim.x);
    float* group_score = (float*)(best_i + blockDim.x);
    unsigned* kept = (unsigned*)(group_score + n_group);
    const float* lr = logits + (size_t)t * E;

    // Affinities. The sigmoid is the CPU's overflow-free form (its 1 + e rounded on its own, as
    // the CPU's is: nvcc may not fuse it into expf's last multiply); softmax subtracts the row max.
    if (sigmoid) {
        for (unsigned e = threadIdx.x; e < E; e += blockDim.x) {
            float x = lr[e];
            if (x >= 0.0f) {
                s[e] = 1.0f / __fadd_rn(1.0f, expf(-x));
            } else {
                float z = expf(x);
                s[e] = z / __fadd_rn(1.0f, z);
            }
        }
    } else {
        float m = -INFINITY;
        for (unsigned e = threadIdx.x; e < E; e += blockDim.x) m = fmaxf(m, lr[e]);
        m = block_max(m, best_v);
        float part = 0.0f;
        for (unsigned e = threadIdx.x; e < E; e += blockDim.x) {
            s[e] = expf(lr[e] - m);
            part += s[e];
        }
        float sum = block_sum(part, best_v);
        for (unsigned e = threadIdx.x; e < E; e += blockDim.x) s[e] /= sum;
    }
    for (unsigned e = threadIdx.x; e < E; e += blockDim.x) {
        scores[(size_t)t * E + e] = s[e];
        choice[e] = has_bias ? s[e] + bias[e] : s[e];
        taken[e] = 0;
    }
    __syncthreads();

    // Group limit, by one thread: n_group is small, and this is the CPU's exact sequence of
    // comparisons (groups of E / n_group consecutive experts; ties keep the lower group).
    if (n_group > 1) {
        unsigned per_group = E / n_group;
        if (threadIdx.x == 0) {
            for (unsigned g = 0; g < n_group; ++g) {
                const float* grp = choice + g * per_group;
                float top0 = -INFINITY, top1 = -INFINITY;
                bool nan = false;
                for (unsigned e = 0; e < per_group; ++e) {
                    float v = grp[e];
                    nan |= isnan(v);
                    if (v > top0) {
                        top1 = top0;
                        top0 = v;
                    } else if (v > top1) {
                        top1 = v;
                    }
                }
                // A NaN in the group makes its score NaN (torch's topk-sum and max), ranked first.
                group_score[g] = nan ? NAN : sigmoid ? top0 + top1 : top0;
                kept[g] = 0;
            }
            for (unsigned r = 0; r < topk_group && r < n_group; ++r) {
                unsigned best = NONE;
                for (unsigned g = 0; g < n_group; ++g) {
                    if (!kept[g] && (best == NONE || ranks_before(group_score[g], g, group_score[best], best))) best = g;
                }
                kept[best] = 1;
            }
        }
        __syncthreads();
        // -inf, not 0: biased scores can be negative (spec section 2.2 note).
        for (unsigned e = threadIdx.x; e < n_group * per_group; e += blockDim.x) {
            if (!kept[e / per_group]) choice[e] = -INFINITY;
        }
        __syncthreads();
    }

    // Top-k: K rounds of a block-wide argmax over the experts not yet taken.
    float sum = 0.0f; // thread 0: the chosen affinities, in order
    for (unsigned k = 0; k < top_k; ++k) {
        float v = -INFINITY;
        unsigned i = NONE;
        for (unsigned e = threadIdx.x; e < E; e += blockDim.x) {
            if (!taken[e] && ranks_before(choice[e], e, v, i)) {
                v = choice[e];
                i = e;
            }
        }
        best_v[threadIdx.x] = v;
        best_i[threadIdx.x] = i;
        __syncthreads();
        for (unsigned half = blockDim.x / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) {
                unsigned o = threadIdx.x + half;
                if (ranks_before(best_v[o], best_i[o], best_v[threadIdx.x], best_i[threadIdx.x])) {
                    best_v[threadIdx.x] = best_v[o];
                    best_i[threadIdx.x] = best_i[o];
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            unsigned winner = best_i[0];
            taken[winner] = 1;
            ids[(size_t)t * top_k + k] = winner;
            sum += s[winner];
        }
        __syncthreads();
    }

    if (threadIdx.x == 0) {
        for (unsigned k = 0; k < top_k; ++k) {
            float w = s[ids[(size_t)t * top_k + k]];
            if (norm_topk_prob) w = w / (sum + 1e-20f);
            weights[(size_t)t * top_k + k] = w * routed_scaling_factor;
        }
    }
}
