/* quantserve CPU kernels: row decoders for the non-GGUF packed formats, and the drivers built on them alone
 * (qs_dequantize; qs_supported, qs_threads, qs_isa: what this build has). The fused dots and qs_gemv are qs_dot.c.
 *
 * Every decoder writes one row of the (N, K) weight as float32 with the torch reference's values: the same float32
 * operations in the same order (the build forbids FMA contraction), then rounding to the format's own dtype. The
 * AVX-512 paths (intrinsics, under QS_AVX512: qs_packed.h) compute exactly what the portable paths compute, sixteen
 * lanes at a time; there is no hand-written AVX2 path.
 */
#include "qs_packed.h"

#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static void round_row(float *out, int64_t k, int32_t dtype) {
    if (dtype != QS_BF16 && dtype != QS_F16) return;
    int64_t i = 0;
#ifdef QS_AVX512
    for (; i + 16 <= k; i += 16) {
        __m512 v = _mm512_loadu_ps(out + i);
        _mm512_storeu_ps(out + i, dtype == QS_BF16 ? round_bf16_v(v) : round_f16_v(v));
    }
#endif
    for (; i < k; i++) out[i] = round_to(out[i], dtype);
}

/* ---- row decoders -------------------------------------------------------------------------------------------- */

static void decode_bnb4(const qs_weight *w, int64_t n, float *out) {
    const int64_t k = w->k, bs = w->group, f0 = n * k;
    int64_t i = 0;
#ifdef QS_AVX512
    if ((f0 % bs) == 0 && (k % bs) == 0 && (bs % 32) == 0) { /* blocks start and end inside the row */
        const __m512 lut = _mm512_loadu_ps(w->lut);
        const uint8_t *q = w->data + f0 / 2;
        const int64_t block0 = f0 / bs;
        for (int64_t b = 0; b < k / bs; b++) {
            const __m512 a = _mm512_set1_ps(bnb_absmax(w, block0 + b));
            for (int64_t j = 0; j < bs; j += 32, i += 32) {
                __m512i i0, i1; /* element 2t is byte t's high nibble, 2t + 1 its low nibble */
                nibbles32(q + i / 2, 1, &i0, &i1);
                _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(i0, lut), a));
                _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_permutexvar_ps(i1, lut), a));
            }
        }
    }
#endif
    for (; i < k; i++) {
        int64_t f = f0 + i;
        uint8_t byte = w->data[f >> 1];
        out[i] = w->lut[(f & 1) ? (byte & 0xF) : (byte >> 4)] * bnb_absmax(w, f / bs);
    }
}

static void decode_int8_rows(const qs_weight *w, int64_t n, float *out) {
    const int8_t *q = (const int8_t *)(w->data + n * w->data_stride);
    float scale = load_f(w->scale, w->scale_dtype, n * w->scale_stride_n);
    if (w->divisor != 1.0f) scale = scale / w->divisor;
    const float zero = w->zero ? load_f(w->zero, w->zero_dtype, n) : 0.0f;
    int64_t i = 0;
#ifdef QS_AVX512
    const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
    for (; i + 16 <= w->k; i += 16) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        if (w->zero) v = _mm512_sub_ps(v, z);
        _mm512_storeu_ps(out + i, _mm512_mul_ps(v, s));
    }
#endif
    for (; i < w->k; i++) out[i] = (w->zero ? (float)q[i] - zero : (float)q[i]) * scale;
}

static void decode_float8(const qs_weight *w, int64_t n, float *out) {
    const uint8_t *q = w->data + n * w->data_stride;
    const float scale = load_f(w->scale, w->scale_dtype, n * w->scale_stride_n);
    const int e5m2 = w->kind == 1;
    int64_t i = 0;
#ifdef QS_AVX512
    const __m512 s = _mm512_set1_ps(scale);
    for (; i + 16 <= w->k; i += 16) _mm512_storeu_ps(out + i, _mm512_mul_ps(fp8x16(q + i, e5m2), s));
#endif
    for (; i < w->k; i++) out[i] = fp8_to_float(q[i], e5m2) * scale;
}

static void decode_int4_grouped(const qs_weight *w, int64_t n, float *out) {
    const uint8_t *q = w->data + n * w->data_stride;
    const int64_t g = w->group, groups = w->k / g;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t at = n * w->scale_stride_n + j * w->scale_stride_g;
        const float s = load_f(w->scale, w->scale_dtype, at), z = load_f(w->zero, w->zero_dtype, at);
        int64_t i = j * g;
        const int64_t end = i + g;
#ifdef QS_AVX512
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z), eight = _mm512_set1_ps(8.0f);
        if ((i % 2) == 0)
            for (; i + 16 <= end; i += 16) {
                /* two's-complement nibble c -> (c ^ 8) - 8 */
                __m512i c = nibbles16(q + i / 2, 0);
                __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_xor_si512(c, _mm512_set1_epi32(8))), eight);
                _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(v, sv), zv));
            }
#endif
        for (; i < end; i++) {
            uint8_t byte = q[i >> 1];
            int c = (i & 1) ? (byte >> 4) : (byte & 0xF);
            out[i] = (float)((c ^ 8) - 8) * s + z;
        }
    }
}

/* quanto: round(round(q * scale) - shift) in the scale's dtype; the outer rounding is qs_decode_row's (round_dtype) */
static void decode_quanto(const qs_weight *w, int64_t n, float *out) {
    const int bits = w->kind, mask = (1 << bits) - 1;
    const int64_t g = w->group, groups = w->k / g, rows = w->packed_rows;
    const int32_t dt = w->scale_dtype;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t r = n * groups + j;
        const uint8_t *q = w->data + (r % rows) * w->data_stride;
        const int shift = bits * (int)(r / rows);
        const float s = load_f(w->scale, dt, r), z = load_f(w->zero, w->zero_dtype, r);
        float *o = out + j * g;
        int64_t i = 0;
#ifdef QS_AVX512
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
        const __m512i m = _mm512_set1_epi32(mask);
        for (; i + 16 <= g; i += 16) {
            __m512i c = _mm512_and_si512(_mm512_srli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i))), shift), m);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), sv);
            v = dt == QS_BF16 ? round_bf16_v(v) : dt == QS_F16 ? round_f16_v(v) : v;
            _mm512_storeu_ps(o + i, _mm512_sub_ps(v, zv));
        }
#endif
        for (; i < g; i++) o[i] = round_to((float)((q[i] >> shift) & mask) * s, dt) - z;
    }
}

static void decode_nvfp4(const qs_weight *w, int64_t n, float *out) {
    const uint8_t *q = w->data + n * w->data_stride;
    const uint8_t *bs = (const uint8_t *)w->scale + n * w->scale_stride_n;
    const int64_t b = w->group, blocks = w->k / b;
    int64_t j = 0;
#ifdef QS_AVX512
    if (b == 16) {
        const __m512 lut = _mm512_loadu_ps(E2M1), g = _mm512_set1_ps(w->global_scale);
        for (; j + 16 <= blocks; j += 16) {
            /* sixteen blocks of sixteen: their scales at once, then each block */
            float per_block[16];
            _mm512_storeu_ps(per_block, _mm512_mul_ps(fp8x16(bs + j, 0), g));
            for (int t = 0; t < 16; t++) {
                const int64_t i = (j + t) * 16;
                _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(nibbles16(q + i / 2, 0), lut),
                                                        _mm512_set1_ps(per_block[t])));
            }
        }
    }
#endif
    for (; j < blocks; j++) {
        const float per_block = fp8_to_float(bs[j], 0) * w->global_scale;
        for (int64_t i = j * b; i < (j + 1) * b; i++) {
            uint8_t byte = q[i >> 1];
            out[i] = E2M1[(i & 1) ? (byte >> 4) : (byte & 0xF)] * per_block;
        }
    }
}


static void decode_int4_blocks(const qs_weight *w, int64_t n, float *out) {
    const uint8_t *q = w->data + n * w->data_stride;
    const float *scale = (const float *)w->scale + n * w->k / w->group;
    const int64_t b = w->group, blocks = w->k / b;
    for (int64_t j = 0; j < blocks; j++) {
        const float s = scale[j];
        int64_t i = j * b;
        const int64_t end = i + b;
#ifdef QS_AVX512
        const __m512 lut = _mm512_loadu_ps(INT4_OFFSET8), sv = _mm512_set1_ps(s);
        if ((i % 2) == 0)
            for (; i + 32 <= end; i += 32) {
                __m512i i0, i1;
                nibbles32(q + i / 2, 1, &i0, &i1);
                _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_permutexvar_ps(i0, lut), sv));
                _mm512_storeu_ps(out + i + 16, _mm512_div_ps(_mm512_permutexvar_ps(i1, lut), sv));
            }
#endif
        for (; i < end; i++) {
            uint8_t byte = q[i >> 1];
            out[i] = (float)(((i & 1) ? (byte & 0xF) : (byte >> 4)) - 8) / s;
        }
    }
}

static int decode_gguf(const qs_weight *w, int64_t n, float *out) {
    return qs_gguf_decode_row(w->kind, w->data + n * w->data_stride, w->k, out);
}

/* qs_packed.h: decode row n, then round it to `round_dtype` (rounding twice to one dtype is rounding once) */
int qs_decode_row(const qs_weight *w, int64_t n, float *out, int32_t round_dtype) {
    switch (w->fmt) {
    case QS_FMT_BNB4: decode_bnb4(w, n, out); break;
    case QS_FMT_INT8_ROWS: decode_int8_rows(w, n, out); break;
    case QS_FMT_FLOAT8: decode_float8(w, n, out); break;
    case QS_FMT_INT4_GROUPED: decode_int4_grouped(w, n, out); break;
    case QS_FMT_QUANTO: decode_quanto(w, n, out); break; /* rounds q * scale; the difference rounds below */
    case QS_FMT_NVFP4: decode_nvfp4(w, n, out); break;
    case QS_FMT_INT4_BLOCKS: decode_int4_blocks(w, n, out); break;
    case QS_FMT_GGUF: if (decode_gguf(w, n, out) != 0) return -1; break;
    default: return -1;
    }
    round_row(out, w->k, round_dtype);
    return 0;
}

int qs_supported(int32_t fmt, int32_t kind) {
    if (fmt == QS_FMT_GGUF) return qs_gguf_supported(kind);
    if (fmt == QS_FMT_QUANTO) return (kind == 2 || kind == 4) ? 0 : -1;
    if (fmt == QS_FMT_FLOAT8) return (kind == 0 || kind == 1) ? 0 : -1;
    return ((fmt >= QS_FMT_BNB4 && fmt <= QS_FMT_NVFP4) || fmt == QS_FMT_INT4_BLOCKS) ? 0 : -1;
}

/* ---- drivers ------------------------------------------------------------------------------------------------- */

static void store_row(const float *src, int64_t k, void *dst, int32_t dtype) {
    int64_t i = 0;
    if (dtype == QS_F32) { if ((const void *)src != dst) memcpy(dst, src, (size_t)k * 4); return; }
    uint16_t *o = (uint16_t *)dst;
#ifdef QS_AVX512
    for (; i + 16 <= k; i += 16) {
        __m512 v = _mm512_loadu_ps(src + i);
        __m256i h;
        if (dtype == QS_BF16) { /* not AVX512-BF16's convert: it flushes subnormals to zero, torch keeps them */
            __m512i u = _mm512_castps_si512(round_bf16_v(v));
            h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
        } else {
            h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        }
        _mm256_storeu_si256((__m256i *)(o + i), h);
    }
#endif
    for (; i < k; i++) o[i] = dtype == QS_BF16 ? float_to_bf16_bits(src[i]) : float_to_half_bits(src[i]);
}

int qs_dequantize(const qs_weight *w, int64_t n0, int64_t n1, void *out, int32_t out_dtype) {
    if (n0 < 0 || n1 > w->n || n0 > n1 || qs_supported(w->fmt, w->kind) != 0) return -1;
    if (out_dtype != QS_F32 && out_dtype != QS_BF16 && out_dtype != QS_F16) return -1;
    const int64_t k = w->k, esize = out_dtype == QS_F32 ? 4 : 2;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if ((n1 - n0) * k >= QS_PARALLEL_MIN_WEIGHTS)
    {
        float *buf = out_dtype == QS_F32 ? NULL : (float *)malloc((size_t)k * sizeof(float));
        if (out_dtype != QS_F32 && !buf) failed = 1;
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            if (failed) continue;
            char *dst = (char *)out + (n - n0) * k * esize;
            float *row = buf ? buf : (float *)dst;
            if (qs_decode_row(w, n, row, w->round_dtype == out_dtype ? QS_F32 : w->round_dtype) != 0) {
                failed = 1;
                continue;
            }
            if (buf) store_row(row, k, dst, out_dtype);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

int qs_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

const char *qs_isa(void) {
#ifdef QS_AVX512
    return "avx512";
#elif defined(QS_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}
