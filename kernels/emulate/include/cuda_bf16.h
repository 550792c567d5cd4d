// cuda_bf16.h on the host (see ../cuda_host.h): bf16 as its bits, with the conversions the
// kernels use, written from the format (f32's top 16 bits).
#pragma once

#include <math.h>

#include <cstring>

struct __nv_bfloat16 {
    unsigned short bits;
};

// Round to nearest even; NaN becomes the canonical quiet NaN, as CUDA's conversion does.
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    if (isnan(x)) return {0x7fff};
    unsigned u;
    std::memcpy(&u, &x, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return {(unsigned short)(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
    unsigned u = unsigned(h.bits) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
