// Fused AdamW, one thread per element, in the order of torch's _single_tensor_adamw (the CPU
// twin, whale_kernels::cpu::adamw::adamw_step, documents each step). The scalars are computed on
// the host as the CPU twin computes them. The weight decay, the second moment's decay and the
// parameter's update use __fmul_rn / __fadd_rn so nvcc cannot contract them into an FMA (it does
// by default: `param * decay + update` became one fma.rn, rounding once where torch and the CPU
// twin round twice), and division and sqrtf round correctly (no fast math): bit for bit the CPU
// twin's arithmetic. Two FMAs are torch's: the first moment's lerp, and the second moment's
// addcmul, which ATen builds as fma(value * grad, grad, v * beta2).
// The moments are f32 or, as in DeepSeek-V3's recipe, bf16: widened to f32 (exact), one f32 step
// (the parameter's update reads the unrounded moments), rounded back to nearest even, as the CPU
// path of whale-tensor's AdamW does.
#include <cuda_bf16.h>

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const unsigned short* p) { return __bfloat162float(__ushort_as_bfloat16(*p)); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(unsigned short* p, float x) { *p = __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

template <class Moment>
__device__ __forceinline__ void adamw(
    float* param, const float* grad, Moment* m, Moment* v, unsigned n, float decay, float lerp_coeff,
    int lerp_from_m, float beta2, float one_minus_beta2, float bias_correction2_sqrt, float eps, float neg_step_size) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = grad[i], mo = load(m + i);
        float p = __fmul_rn(param[i], decay);
        float base = lerp_from_m ? mo : g;
        float mi = fmaf(lerp_coeff, g - mo, base);
        float vi = fmaf(__fmul_rn(one_minus_beta2, g), g, __fmul_rn(load(v + i), beta2));
        float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        param[i] = __fadd_rn(p, neg_step_size * mi / denom);
        store(m + i, mi);
        store(v + i, vi);
    }
}

extern "C" __global__ void adamw_step_f32(
    float* param, const float* grad, float* m, float* v, unsigned n, float decay, float lerp_coeff, int lerp_from_m,
    float beta2, float one_minus_beta2, float bias_correction2_sqrt, float eps, float neg_step_size) {
    adamw(param, grad, m, v, n, decay, lerp_coeff, lerp_from_m, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
          neg_step_size);
}

// m and v as bf16 bits.
extern "C" __global__ void adamw_step_bf16_moments(
    float* param, const float* grad, unsigned short* m, unsigned short* v, unsigned n, float decay, float lerp_coeff,
    int lerp_from_m, float beta2, float one_minus_beta2, float bias_correction2_sqrt, float eps, float neg_step_size) {
    adamw(param, grad, m, v, n, decay, lerp_coeff, lerp_from_m, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
          neg_step_size);
}
