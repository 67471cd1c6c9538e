/* Scalar float conversions shared by quantserve's C kernels: exact, round-to-nearest-even, subnormals included.
 * Header-only (static inline), so each kernel file inlines them. */
#ifndef QS_SCALAR_H
#define QS_SCALAR_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "qs_cpu.h"

static inline float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return f32_of_bits(sign | 0x7F800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return f32_of_bits(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t float_to_bf16_bits(float f) {
    uint32_t u = bits_of_f32(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return f32_of_bits((uint32_t)float_to_bf16_bits(f) << 16); }

static inline uint16_t float_to_half_bits(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    /* round to nearest even, subnormals and overflow included */
    uint32_t u = bits_of_f32(f), sign = (u >> 16) & 0x8000;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00);
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);
    if (a < 0x38800000u) { /* subnormal half */
        float v = f32_of_bits(a) * 16777216.0f; /* in units of 2^-24 */
        return (uint16_t)(sign | (uint32_t)nearbyintf(v));
    }
    uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

static inline float round_f16(float f) { return half_to_float(float_to_half_bits(f)); }

static inline float round_to(float f, int32_t dtype) {
    return dtype == QS_BF16 ? round_bf16(f) : dtype == QS_F16 ? round_f16(f) : f;
}

/* element i of an auxiliary tensor of any supported dtype, as float */
static inline float load_f(const void *p, int32_t dtype, int64_t i) {
    switch (dtype) {
    case QS_F32: return ((const float *)p)[i];
    case QS_BF16: return f32_of_bits((uint32_t)((const uint16_t *)p)[i] << 16);
    case QS_F16: return half_to_float(((const uint16_t *)p)[i]);
    case QS_I8: return (float)((const int8_t *)p)[i];
    case QS_U8: return (float)((const uint8_t *)p)[i];
    case QS_I16: return (float)((const int16_t *)p)[i];
    case QS_I32: return (float)((const int32_t *)p)[i];
    default: return NAN;
    }
}

#endif
