// Elementwise kernels over contiguous f32 buffers, one thread per element (grid-stride loops).
// CPU twins: whale-tensor's elementwise ops and whale_kernels::cpu::swiglu.

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}

extern "C" __global__ void mul_f32(const float* a, const float* b, float* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = a[i] * b[i];
    }
}

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
extern "C" __global__ void swiglu_forward_f32(const float* gate, const float* up, float* out, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// SwiGLU backward: dgate = dout * up * sig(g) * (1 + g (1 - sig(g))), dup = dout * silu(g).
extern "C" __global__ void swiglu_backward_f32(
    const float* gate, const float* up, const float* dout, float* dgate, float* dup, unsigned n) {
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g)), d = dout[i];
        dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = d * (g * s);
    }
}
