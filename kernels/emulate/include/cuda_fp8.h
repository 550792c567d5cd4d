// cuda_fp8.h on the host (see ../cuda_host.h): the two conversions the kernels use, written from
// the OCP FP8 formats (E4M3: bias 7, no infinities, S.1111.111 is NaN, largest 448; E5M2: bias
// 15, IEEE-like). Independent of whale-kernels' Rust twins, which the tests compare them with.
#pragma once

#include <math.h>

#include "cuda_fp16.h"

typedef unsigned char __nv_fp8_storage_t;

enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };

// f32 to E4M3 or E5M2, rounding to nearest even; __NV_SATFINITE clamps what is out of range
// (infinities included) to the largest finite value, and NaN stays NaN.
inline unsigned char __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t fmt) {
    const bool e4m3 = fmt == __NV_E4M3;
    const int man_bits = e4m3 ? 3 : 2, bias = e4m3 ? 7 : 15;
    const unsigned char sign = signbit(x) ? 0x80 : 0, nan = 0x7f;
    const unsigned char largest = e4m3 ? 0x7e : 0x7b, inf = e4m3 ? 0x7f : 0x7c; // E4M3 overflows to NaN
    if (isnan(x)) return sign | nan;
    double a = fabs(double(x));
    int e;
    frexp(a, &e); // a = f * 2^e with f in [0.5, 1): the exponent of a is e - 1
    int exp = a == 0 ? 1 - bias : e - 1;
    if (exp < 1 - bias) exp = 1 - bias; // subnormals share the smallest normal's step
    // a in steps of 2^(exp - man_bits), rounded to nearest even (the default rounding mode).
    double q = nearbyint(ldexp(a, man_bits - exp));
    unsigned code;
    if (q < double(1 << man_bits)) {
        code = unsigned(q); // subnormal (or zero)
    } else {
        if (q == double(2 << man_bits)) { // rounded up to the next power of two
            q /= 2;
            ++exp;
        }
        unsigned biased = unsigned(exp + bias);
        code = (biased << man_bits) | (unsigned(q) - (1u << man_bits));
    }
    if (isinf(x) || code > largest) return sign | (sat == __NV_SATFINITE ? largest : inf);
    return sign | (unsigned char)code;
}

// E4M3 or E5M2 to half (exact: every value of both is a half).
inline __half_raw __nv_cvt_fp8_to_halfraw(unsigned char c, __nv_fp8_interpretation_t fmt) {
    if (fmt == __NV_E5M2) return {(unsigned short)(c << 8)};
    unsigned short sign = (c & 0x80) << 8;
    int exp = (c >> 3) & 15, man = c & 7;
    if (exp == 15 && man == 7) return {(unsigned short)(sign | 0x7fff)};
    if (exp == 0) {
        if (man == 0) return {sign};
        exp = 1; // subnormal: normalise (every E4M3 subnormal is a normal half)
        while (!(man & 8)) {
            man <<= 1;
            --exp;
        }
        man &= 7;
    }
    return {(unsigned short)(sign | (exp - 7 + 15) << 10 | man << 7)};
}
