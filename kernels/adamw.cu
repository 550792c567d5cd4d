// Fused AdamW, one thread per element, in the order of torch's _single_tensor_adamw (the CPU
// twin, whale_kernels::cpu::adamw::adamw_step, documents each step). The scalars are computed on
// the host as the CPU twin computes them.
extern "C" __global__ void adamw_step_f32(
    float* param, const float* grad, float* m, float* v, unsigned n,
    float decay, float lerp_coeff, int lerp_from_m, float beta2, float one_minus_beta2,
    float bias_correction2_sqrt, float eps, float neg_step_size) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = grad[i];
        float p = param[i] * decay;
        float base = lerp_from_m ? m[i] : g;
        float mi = fmaf(lerp_coeff, g - m[i], base);
        float vi = v[i] * beta2 + one_minus_beta2 * g * g;
        float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        p += neg_step_size * mi / denom;
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}
