/* quantserve CPU kernels: the fused row dots of the non-GGUF packed formats (the GGUF ones are qs_gguf_dot.c) and
 * qs_gemv, which runs them, or, for a format or an M without a fused form, decodes rows (qs_decode.c) into tiles.
 */
#include "qs_packed.h"

#include <stdlib.h>

/* ---- fused row dots (M = 1) ---------------------------------------------------------------------------------
 * sum_k W[n, k] * x[k] without building the row: each (sub-)block's scale is factored out of its inner sum, as
 * sum_g s_g * sum_{k in g} code_k x_k + z_g * sum_{k in g} x_k, accumulated in float32 with FMA. The products are
 * the backend's codes times the activation, exact; only the per-weight rounding to the backend's dtype (bf16
 * for most) is not applied, so the result is as close to the exact product as float32 accumulation allows.
 * Each returns -1 where it has no fused form (the GEMV then decodes the row). */
#ifdef QS_AVX512
/* software prefetch of the packed weight this far ahead: with long rows the activations fill L1 and the hardware
 * prefetcher alone leaves the weight stream short of DRAM bandwidth */
#define QS_PREFETCH 4096
#define QS_PF(p) _mm_prefetch((const char *)(p) + QS_PREFETCH, _MM_HINT_T0)

static inline __m512 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d));
}

/* group sums of x: gsum[j] = sum of x over [j*g, (j+1)*g) */
static void group_sums(const float *x, int64_t k, int64_t g, float *gsum) {
    for (int64_t j = 0; j < k / g; j++) {
        __m512 a = _mm512_setzero_ps();
        int64_t i = j * g, end = i + g;
        for (; i + 16 <= end; i += 16) a = _mm512_add_ps(a, _mm512_loadu_ps(x + i));
        float t = _mm512_reduce_add_ps(a);
        for (; i < end; i++) t += x[i];
        gsum[j] = t;
    }
}

static int dot_bnb4(const qs_weight *w, int64_t n, const float *x, float *out) {
    const int64_t k = w->k, bs = w->group, f0 = n * k;
    if ((f0 % bs) || (k % bs) || (bs % 32)) return -1;
    const __m512 lut = _mm512_loadu_ps(w->lut);
    const uint8_t *q = w->data + f0 / 2;
    const int64_t block0 = f0 / bs;
    __m512 total0 = _mm512_setzero_ps(), total1 = _mm512_setzero_ps();
    for (int64_t b = 0, i = 0; b < k / bs; b++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t j = 0; j < bs; j += 32, i += 32) {
            if ((i & 127) == 0) QS_PF(q + i / 2);
            lut_dot32(q + i / 2, 1, lut, x + i, &a0, &a1);
        }
        const __m512 am = _mm512_set1_ps(bnb_absmax(w, block0 + b));
        if (b & 1) total1 = _mm512_fmadd_ps(am, _mm512_add_ps(a0, a1), total1);
        else total0 = _mm512_fmadd_ps(am, _mm512_add_ps(a0, a1), total0);
    }
    *out = _mm512_reduce_add_ps(_mm512_add_ps(total0, total1));
    return 0;
}

static int dot_int8_rows(const qs_weight *w, int64_t n, const float *x, float xsum, float *out) {
    const int8_t *q = (const int8_t *)(w->data + n * w->data_stride);
    const int64_t k = w->k;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
#define QS_I8(off) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + (off)))))
    for (; i + 64 <= k; i += 64) {
        QS_PF(q + i);
        a0 = _mm512_fmadd_ps(QS_I8(0), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(QS_I8(16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(QS_I8(32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(QS_I8(48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(QS_I8(0), _mm512_loadu_ps(x + i), a0);
#undef QS_I8
    float acc = _mm512_reduce_add_ps(sum4(a0, a1, a2, a3));
    for (; i < k; i++) acc += (float)q[i] * x[i];
    float scale = load_f(w->scale, w->scale_dtype, n * w->scale_stride_n);
    if (w->divisor != 1.0f) scale = scale / w->divisor;
    if (w->zero) acc -= load_f(w->zero, w->zero_dtype, n) * xsum;
    *out = acc * scale;
    return 0;
}

static int dot_float8(const qs_weight *w, int64_t n, const float *x, float *out) {
    const uint8_t *q = w->data + n * w->data_stride;
    const int64_t k = w->k;
    const int e5m2 = w->kind == 1;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        if ((i & 63) == 0) QS_PF(q + i);
        a0 = _mm512_fmadd_ps(fp8x16(q + i, e5m2), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(fp8x16(q + i + 16, e5m2), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(fp8x16(q + i, e5m2), _mm512_loadu_ps(x + i), a0);
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for (; i < k; i++) acc += fp8_to_float(q[i], e5m2) * x[i];
    *out = acc * load_f(w->scale, w->scale_dtype, n * w->scale_stride_n);
    return 0;
}

/* torchao int4: a signed nibble c is (c ^ 8) - 8; a table gives its float value directly */
static const float INT4_SIGNED[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

static int dot_int4_grouped(const qs_weight *w, int64_t n, const float *x, const float *gsum, float *out) {
    const int64_t g = w->group, groups = w->k / g;
    if (g % 32) return -1;
    const uint8_t *q = w->data + n * w->data_stride;
    const __m512 lut = _mm512_loadu_ps(INT4_SIGNED);
    __m512 total = _mm512_setzero_ps();
    float offset = 0.0f;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t at = n * w->scale_stride_n + j * w->scale_stride_g;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = j * g; i < (j + 1) * g; i += 32) {
            if ((i & 127) == 0) QS_PF(q + i / 2);
            lut_dot32(q + i / 2, 0, lut, x + i, &a0, &a1);
        }
        total = _mm512_fmadd_ps(_mm512_set1_ps(load_f(w->scale, w->scale_dtype, at)), _mm512_add_ps(a0, a1), total);
        offset += load_f(w->zero, w->zero_dtype, at) * gsum[j];
    }
    *out = _mm512_reduce_add_ps(total) + offset;
    return 0;
}

static const float UINT4[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static int dot_quanto(const qs_weight *w, int64_t n, const float *x, const float *gsum, float *out) {
    const int bits = w->kind;
    const int64_t g = w->group, groups = w->k / g, rows = w->packed_rows;
    if (g % 16) return -1;
    const __m512 lut = _mm512_loadu_ps(UINT4);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    __m512 total = _mm512_setzero_ps();
    float offset = 0.0f;
    for (int64_t j = 0; j < groups; j++) {
        const int64_t r = n * groups + j;
        const uint8_t *q = w->data + (r % rows) * w->data_stride;
        const __m128i shift = _mm_cvtsi32_si128(bits * (int)(r / rows));
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 32 <= g; i += 32) {
            if ((i & 63) == 0) QS_PF(q + i);
            __m512i c0 = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i))), shift), mask);
            __m512i c1 = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16))), shift), mask);
            a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c0, lut), _mm512_loadu_ps(x + j * g + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c1, lut), _mm512_loadu_ps(x + j * g + i + 16), a1);
        }
        for (; i < g; i += 16) {
            __m512i c0 = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i))), shift), mask);
            a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(c0, lut), _mm512_loadu_ps(x + j * g + i), a0);
        }
        total = _mm512_fmadd_ps(_mm512_set1_ps(load_f(w->scale, w->scale_dtype, r)), _mm512_add_ps(a0, a1), total);
        offset -= load_f(w->zero, w->zero_dtype, r) * gsum[j];
    }
    *out = _mm512_reduce_add_ps(total) + offset;
    return 0;
}

static int dot_nvfp4(const qs_weight *w, int64_t n, const float *x, float *out) {
    const int64_t blocks = w->k / 16;
    if (w->group != 16 || (blocks % 16)) return -1;
    const uint8_t *q = w->data + n * w->data_stride;
    const uint8_t *bs = (const uint8_t *)w->scale + n * w->scale_stride_n;
    const __m512 lut = _mm512_loadu_ps(E2M1), g = _mm512_set1_ps(w->global_scale);
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks; j += 16) {
        float per_block[16];
        _mm512_storeu_ps(per_block, _mm512_mul_ps(fp8x16(bs + j, 0), g));
        QS_PF(q + j * 8);
        QS_PF(q + j * 8 + 64);
        for (int t = 0; t < 16; t += 2) {
            const int64_t i = (j + t) * 16;
            __m512 c0 = _mm512_permutexvar_ps(nibbles16(q + i / 2, 0), lut);
            __m512 c1 = _mm512_permutexvar_ps(nibbles16(q + i / 2 + 8, 0), lut);
            t0 = _mm512_fmadd_ps(_mm512_mul_ps(c0, _mm512_set1_ps(per_block[t])), _mm512_loadu_ps(x + i), t0);
            t1 = _mm512_fmadd_ps(_mm512_mul_ps(c1, _mm512_set1_ps(per_block[t + 1])), _mm512_loadu_ps(x + i + 16), t1);
        }
    }
    *out = _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
    return 0;
}

static int dot_int4_blocks(const qs_weight *w, int64_t n, const float *x, float *out) {
    const int64_t b = w->group, blocks = w->k / b;
    if (b % 32) return -1;
    const uint8_t *q = w->data + n * w->data_stride;
    const float *scale = (const float *)w->scale + n * w->k / b;
    const __m512 lut = _mm512_loadu_ps(INT4_OFFSET8);
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks; j++) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t i = j * b; i < (j + 1) * b; i += 32) {
            if ((i & 127) == 0) QS_PF(q + i / 2);
            lut_dot32(q + i / 2, 1, lut, x + i, &a0, &a1);
        }
        total = _mm512_add_ps(total, _mm512_div_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(scale[j])));
    }
    *out = _mm512_reduce_add_ps(total);
    return 0;
}
#endif

/* which group size the fused dot of this format needs x's group sums for (0: none) */
static int64_t dot_sum_group(const qs_weight *w) {
    switch (w->fmt) {
    case QS_FMT_INT8_ROWS: return w->zero ? w->k : 0;
    case QS_FMT_INT4_GROUPED: case QS_FMT_QUANTO: return w->group;
    default: return 0;
    }
}

static int dot_row(const qs_weight *w, int64_t n, const float *x, const float *gsum, float *out) {
#ifdef QS_AVX512
    switch (w->fmt) {
    case QS_FMT_BNB4: return dot_bnb4(w, n, x, out);
    case QS_FMT_INT8_ROWS: return dot_int8_rows(w, n, x, gsum ? gsum[0] : 0.0f, out);
    case QS_FMT_FLOAT8: return dot_float8(w, n, x, out);
    case QS_FMT_INT4_GROUPED: return dot_int4_grouped(w, n, x, gsum, out);
    case QS_FMT_QUANTO: return dot_quanto(w, n, x, gsum, out);
    case QS_FMT_NVFP4: return dot_nvfp4(w, n, x, out);
    case QS_FMT_INT4_BLOCKS: return dot_int4_blocks(w, n, x, out);
    case QS_FMT_GGUF: return qs_gguf_dot_row(w->kind, w->data + n * w->data_stride, w->k, x, out);
    default: return -1;
    }
#else
    (void)w; (void)n; (void)x; (void)gsum; (void)out;
    return -1;
#endif
}

/* GEMV tiles: RB weight rows (decoded into a float32 buffer) times MR activation rows, accumulated in registers, so
 * each activation vector is read once per RB weight rows and each weight value once per MR activation rows. */
#define RB 4
#define FUSED_ROWS_MAX 4

static inline __attribute__((always_inline)) void tile(const float *wbuf, int64_t k, const float *const *xs,
                                                       const int mr, float acc[RB][4]) {
    int64_t i = 0;
#ifdef QS_AVX512
    __m512 s[RB][4];
    for (int j = 0; j < RB; j++)
        for (int r = 0; r < mr; r++) s[j][r] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
        __m512 xv[4];
        for (int r = 0; r < mr; r++) xv[r] = _mm512_loadu_ps(xs[r] + i);
        for (int j = 0; j < RB; j++) {
            const __m512 wv = _mm512_loadu_ps(wbuf + j * k + i);
            for (int r = 0; r < mr; r++) s[j][r] = _mm512_fmadd_ps(wv, xv[r], s[j][r]);
        }
    }
    for (int j = 0; j < RB; j++)
        for (int r = 0; r < mr; r++) acc[j][r] = _mm512_reduce_add_ps(s[j][r]);
#else
    for (int j = 0; j < RB; j++)
        for (int r = 0; r < mr; r++) acc[j][r] = 0.0f;
#endif
    for (; i < k; i++)
        for (int j = 0; j < RB; j++)
            for (int r = 0; r < mr; r++) acc[j][r] += wbuf[j * k + i] * xs[r][i];
}

static int gemv1(const qs_weight *w, const float *x, float *y, const float *bias) {
    const int64_t k = w->k, nout = w->n, sum_group = dot_sum_group(w);
    float *gsum = NULL;
#ifndef QS_AVX512
    (void)sum_group;
#else
    if (sum_group > 0) {
        if (!(gsum = (float *)malloc((size_t)(k / sum_group) * sizeof(float)))) return -1;
        group_sums(x, k, sum_group, gsum);
    }
#endif
    float first;
    if (nout == 0 || dot_row(w, 0, x, gsum, &first) != 0) { free(gsum); return 1; } /* no fused form: decode */
    y[0] = first + (bias ? bias[0] : 0.0f);
    int failed = 0;
#pragma omp parallel for schedule(static) reduction(| : failed) if (nout * k >= QS_PARALLEL_MIN_WEIGHTS)
    for (int64_t n = 1; n < nout; n++) {
        float v;
        if (dot_row(w, n, x, gsum, &v) != 0) { failed = 1; continue; }
        y[n] = v + (bias ? bias[n] : 0.0f);
    }
    free(gsum);
    return failed ? -1 : 0;
}

int qs_gemv(const qs_weight *w, const float *x, int64_t m, float *y, const float *bias) {
    if (qs_supported(w->fmt, w->kind) != 0 || m < 0) return -1;
    /* up to FUSED_ROWS_MAX rows: the fused row dot once per activation row (each pass streams the packed weight,
     * still cheaper than decoding rows into a buffer at these M; measured on 12288x3072) */
    for (int64_t r = 0; r < m && m <= FUSED_ROWS_MAX; r++) {
        int rc = gemv1(w, x + r * w->k, y + r * w->n, bias);
        if (rc < 0) return rc;
        if (rc > 0) break; /* no fused form: decode rows below */
        if (r == m - 1) return 0;
    }
    const int64_t k = w->k, nout = w->n, blocks = (nout + RB - 1) / RB;
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (nout * k >= QS_PARALLEL_MIN_WEIGHTS)
    {
        float *buf = (float *)malloc((size_t)(RB * k) * sizeof(float));
        if (!buf) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (failed) continue;
            const int64_t n0 = b * RB;
            const int rows = (int)(nout - n0 < RB ? nout - n0 : RB);
            for (int j = 0; j < RB; j++) /* a short last block repeats its last row; the extra sums are dropped */
                if (qs_decode_row(w, n0 + (j < rows ? j : rows - 1), buf + j * k, w->round_dtype) != 0) failed = 1;
            if (failed) continue;
            for (int64_t r0 = 0; r0 < m; r0 += 4) {
                const int mr = (int)(m - r0 < 4 ? m - r0 : 4);
                const float *xs[4];
                for (int r = 0; r < 4; r++) xs[r] = x + (r0 + (r < mr ? r : mr - 1)) * k;
                float acc[RB][4];
                switch (mr) {
                case 1: tile(buf, k, xs, 1, acc); break;
                case 2: tile(buf, k, xs, 2, acc); break;
                case 3: tile(buf, k, xs, 3, acc); break;
                default: tile(buf, k, xs, 4, acc); break;
                }
                for (int j = 0; j < rows; j++)
                    for (int r = 0; r < mr; r++)
                        y[(r0 + r) * nout + n0 + j] = acc[j][r] + (bias ? bias[n0 + j] : 0.0f);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
