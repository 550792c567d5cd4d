// cuda_fp16.h on the host (see ../cuda_host.h): the half type as its bits, and the conversion
// to f32 the kernels use, written from IEEE 754 binary16 (1 sign, 5 exponent bits of bias 15,
// 10 mantissa bits).
#pragma once

#include <math.h>

struct __half_raw {
    unsigned short x;
};

struct __half {
    unsigned short bits;
    __half() = default;
    explicit __half(__half_raw r) : bits(r.x) {}
};

inline float __half2float(__half h) {
    int sign = h.bits >> 15, exp = (h.bits >> 10) & 31, man = h.bits & 1023;
    float v = exp == 0    ? ldexpf(float(man), -24)
              : exp == 31 ? (man ? NAN : INFINITY)
                          : ldexpf(float(1024 + man), exp - 25);
    return sign ? -v : v;
}
