/* quantserve CPU quantizers: weight quantization that backends would otherwise run as several whole-tensor torch
 * passes with full-size temporaries. Each reproduces a library's arithmetic exactly (the same float32 operations,
 * the same roundings to the weight's dtype), one row at a time, with no temporaries. */
#include "qs_cpu.h"
#include "qs_scalar.h"

#include <stdlib.h>

static inline void store(void *p, int32_t dt, int64_t i, float v) {
    if (dt == QS_BF16) ((uint16_t *)p)[i] = float_to_bf16_bits(v);
    else if (dt == QS_F16) ((uint16_t *)p)[i] = float_to_half_bits(v);
    else ((float *)p)[i] = v;
}

/* row r of a (n, k) weight of `dtype` as float32 into `row` */
static void load_row(const void *w, int32_t dtype, int64_t base, int64_t k, float *row) {
    if (dtype == QS_BF16) {
        const uint16_t *src = (const uint16_t *)w + base;
        for (int64_t i = 0; i < k; i++) row[i] = f32_of_bits((uint32_t)src[i] << 16);
    } else if (dtype == QS_F16) {
        for (int64_t i = 0; i < k; i++) row[i] = half_to_float(((const uint16_t *)w)[base + i]);
    } else {
        memcpy(row, (const float *)w + base, (size_t)k * sizeof(float));
    }
}

/* bf16 rounding without the NaN branch: a quiet NaN stays a NaN (0/0 gives the default quiet NaN) */
static inline float round_bf16_fast(float f) {
    uint32_t u = bits_of_f32(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return f32_of_bits(u & 0xFFFF0000u);
}

/* int8 per row, absmax: scale[n] = dt(max_k |w[n, k]| / 127); q = int8(clamp(rint(dt(w / scale)), -128, 127)),
 * NaN (a zero row: 0 / 0) to 0, as torch casts it. optimum-quanto's AbsmaxOptimizer(axis=0) + quantize_symmetric. */
int qs_quantize_int8_absmax(const void *w, int32_t dtype, int64_t n, int64_t k, int8_t *q, void *scale) {
    if (dtype != QS_F32 && dtype != QS_BF16 && dtype != QS_F16) return -1;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (n * k >= (1 << 17))
    {
        float *row = (float *)malloc((size_t)k * sizeof(float));
        if (!row) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (failed) continue;
            const int64_t base = r * k;
            load_row(w, dtype, base, k, row);
            float amax = 0.0f;
            int nan = 0;
            for (int64_t i = 0; i < k; i++) {
                float a = fabsf(row[i]);
                nan |= a != a;
                amax = a > amax ? a : amax;
            }
            if (nan) amax = NAN; /* torch.amax propagates NaN */
            const float s = round_to(amax / 127.0f, dtype);
            store(scale, dtype, r, s);
            int8_t *out = q + base;
            if (dtype == QS_BF16) {
                for (int64_t i = 0; i < k; i++) row[i] = rintf(round_bf16_fast(row[i] / s));
            } else {
                for (int64_t i = 0; i < k; i++) row[i] = rintf(round_to(row[i] / s, dtype));
            }
            for (int64_t i = 0; i < k; i++) {
                float v = row[i] != row[i] ? 0.0f : row[i];
                v = v > 127.0f ? 127.0f : v;
                v = v < -128.0f ? -128.0f : v;
                out[i] = (int8_t)(int32_t)v;
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* int8 per row, symmetric from the row's range, torchao's arithmetic (choose_qparams_affine SYMMETRIC with int8
 * bounds, then quantize_affine): m = max(-min(min_k w, 0), max(max_k w, 0)); s = max(dt(m / 127.5), eps) in the
 * weight's dtype, stored as float32; q = int8(clamp(rint(w * (1 / s)), -128, 127)) with the product in float32. */
int qs_quantize_int8_symmetric(const void *w, int32_t dtype, int64_t n, int64_t k, float eps, int8_t *q,
                               float *scale) {
    if (dtype != QS_F32 && dtype != QS_BF16 && dtype != QS_F16) return -1;
    const float eps_dt = round_to(eps, dtype);
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (n * k >= (1 << 17))
    {
        float *row = (float *)malloc((size_t)k * sizeof(float));
        if (!row) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (failed) continue;
            const int64_t base = r * k;
            load_row(w, dtype, base, k, row);
            float mn = row[0], mx = row[0];
            int nan = 0;
            for (int64_t i = 0; i < k; i++) {
                nan |= row[i] != row[i];
                mn = row[i] < mn ? row[i] : mn;
                mx = row[i] > mx ? row[i] : mx;
            }
            float m = -(mn < 0.0f ? mn : 0.0f);
            float p = mx > 0.0f ? mx : 0.0f;
            m = p > m ? p : m;
            float s = round_to(m / 127.5f, dtype);
            s = s < eps_dt ? eps_dt : s;
            if (nan) s = NAN; /* amin/amax propagate NaN, clamp keeps it */
            scale[r] = s;
            const float inv = 1.0f / s;
            int8_t *out = q + base;
            for (int64_t i = 0; i < k; i++) {
                float v = rintf(row[i] * inv);
                v = v != v ? 0.0f : v;
                v = v > 127.0f ? 127.0f : v;
                v = v < -128.0f ? -128.0f : v;
                out[i] = (int8_t)(int32_t)v;
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}
