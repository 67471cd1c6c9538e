/* quantserve CPU kernels: qs_gemm, the fused dequantize-GEMM for more than one activation row (up to 256 a call).
 *
 * At a few dozen rows a linear layer is still bound by reading its weight, yet the GEMV (qs_dot.c) streams the packed weight
 * once per activation row and the slab path (qs_dequantize + torch's GEMM) writes and re-reads a dense copy. Here a
 * panel of NB weight rows is decoded ONCE, a chunk of K at a time, into a small bf16 (or float32) buffer that stays
 * in L1/L2, and multiplied against all M activation rows before the next chunk is decoded (kernels/cpu.py's path
 * "auto" runs it for bf16 activations on AMX from 2 or 5 rows to 256, where it measured faster than the GEMV and the
 * slabs: benchmarks/kernels_cpu.md):
 *
 *   for each panel of NB rows (OpenMP threads take panels):
 *       for each chunk of kc columns:   decode NB x kc weights -> bf16 panel;  acc[NB][M] += panel . x[:, chunk]^T
 *       y[:, panel] = acc * post_scale + bias
 *
 * Three matmul paths, picked at run time (qs_gemm's `path`; QS_GEMM_AUTO: the best this CPU and build can run):
 *   QS_GEMM_AMX       AMX tiles: TDPBF16PS on 16 x 32 bf16 weight tiles (A) against the activations packed once per
 *                     call as bf16 pairs (B: 16 k-pairs x 16 rows), 2 x 2 accumulator tiles of 16 x 16 float32
 *                     (for M <= 16: four weight tiles' accumulators, held in tiles across the whole of K). Each 32
 *                     decoded rows go to the tiles at once, so the tile unit multiplies while the vector units
 *                     decode the next rows. Needs a build with AMX-TILE/AMX-BF16 and the kernel's permission (arch_prctl
 *                     ARCH_REQ_XCOMP_PERM for XTILEDATA, asked once per process; refused: not available).
 *   QS_GEMM_DPBF16    AVX512-BF16 VDPBF16PS: 4 weight rows x 4 activation rows of 16-lane accumulators.
 *   QS_GEMM_PORTABLE  float32 weights (qs_decode_row: the reference's values, rounded to the format's dtype) times
 *                     float32 activations in plain C, sixteen independent lanes per accumulator (the compiler
 *                     vectorizes it for whatever the target has); the only path of a build without AVX-512, and the
 *                     path for float32/float16 activations, whose precision a bf16 product would not keep.
 * The two bf16 paths take bf16 activations (-1 otherwise) and round each weight to bf16 (what the slab path does for
 * bf16 activations: the product is then exact and accumulated in float32).
 *
 * Decoders. Every format has the generic one: qs_decode_row (float32, the reference's values and rounding) then bf16,
 * a whole row at a time (kc = K). The common formats also have direct bf16 chunk decoders (AVX-512BW) that never
 * build a float32 row:
 *   - 4-bit codes with a scale per group (bnb NF4/FP4 incl. double quant, torchao int4, ModelOpt INT4, GGUF Q4_0,
 *     Q4_K): the group's 16 possible weights are computed in float32 exactly as the reference computes each weight
 *     (lut * absmax, q * s + z, (q - 8) / s, d * (q - 8), (d * sc) * q - dmin * m), rounded to the format's dtype and
 *     to bf16, and the codes are looked up in that 16-entry table with VPERMW, 32 weights an instruction. Two codes
 *     share a byte (weights 2t and 2t + 1); rather than interleave them, the panel holds each 64-column chunk as its
 *     32 even columns then its 32 odd ones, and the activations are packed in the same column order (a dot product
 *     does not care about the order of its terms).
 *   - int8 rows and float8: the panel holds the codes ((q - zero) for int8, exact in bf16; float8 values are exact
 *     in bf16 too) and the row's scale multiplies the finished sum (as the fused GEMV's row dots do).
 *   - GGUF Q8_0: d * q per block of 32, rounded to bf16.
 * Formats without a chunk decoder (NVFP4, quanto int4/int2, GGUF Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, Q6_K, IQ4_NL,
 * IQ4_XS, F16/BF16/F32, and any K a chunk decoder does not divide) take the generic one: 32-row panels of whole rows.
 * The bf16 conversion of table and code values uses VCVTNEPS2BF16 where the build has AVX512-BF16 (round to nearest
 * even; it flushes float32-subnormal values, |w| < 1.2e-38, to zero, whose products lie far below the output's
 * rounding), else exact integer rounding.
 */
#include "qs_packed.h"
#include "qs_gguf.h"

#include <stdlib.h>
#include <string.h>

#if defined(QS_AVX512) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define QS_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(QS_AVX512) && defined(__AVX512BF16__)
#define QS_DPBF16 1
#include <cpuid.h>
#endif

/* activation rows above which qs_gemm refuses (its accumulators are sized for this) */
#define QS_GEMM_MAX_M 256

/* ---- which paths this process can run ------------------------------------------------------------------------- */
#ifdef QS_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int amx_state; /* 0: not asked yet, 1: granted, -1: not available */

static int amx_ready(void) {
    int s = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (s) return s > 0;
    unsigned a, b, c, d;
    int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1) && ((d >> 22) & 1); /* AMX-TILE, AMX-BF16 */
    if (ok) ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    __atomic_store_n(&amx_state, ok ? 1 : -1, __ATOMIC_RELEASE);
    return ok;
}
#endif

#ifdef QS_DPBF16
static int dpbf16_ready(void) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1); /* CPUID.(7,1):EAX.AVX512_BF16 */
}
#endif

int qs_gemm_available(int32_t path) {
    switch (path) {
    case QS_GEMM_AUTO: case QS_GEMM_PORTABLE: return 0;
#ifdef QS_AMX
    case QS_GEMM_AMX: return amx_ready() ? 0 : -1;
#endif
#ifdef QS_DPBF16
    case QS_GEMM_DPBF16: return dpbf16_ready() ? 0 : -1;
#endif
    default: return -1;
    }
}

/* the path QS_GEMM_AUTO means for activations of `x_dtype` */
static int32_t best_path(int32_t x_dtype) {
    if (x_dtype != QS_BF16) return QS_GEMM_PORTABLE;
    if (qs_gemm_available(QS_GEMM_AMX) == 0) return QS_GEMM_AMX;
    if (qs_gemm_available(QS_GEMM_DPBF16) == 0) return QS_GEMM_DPBF16;
    return QS_GEMM_PORTABLE;
}

int32_t qs_gemm_best_path(int32_t x_dtype) { return best_path(x_dtype); }

/* ---- the decode plan of one weight ---------------------------------------------------------------------------- */
enum { DEC_GENERIC = 0, DEC_NIB, DEC_INT8, DEC_FP8, DEC_Q4_0, DEC_Q8_0, DEC_Q4_K };

typedef struct {
    int kind;
    int eo;     /* 1: each 64-column chunk is stored as its even columns, then its odd ones */
    int post;   /* 1: the panel holds codes; the row's scale multiplies the sum */
    int64_t unit; /* chunks start and end on multiples of this many columns */
} plan_t;

static plan_t plan_for(const qs_weight *w, int32_t path) {
    plan_t p = {DEC_GENERIC, 0, 0, w->k};
    if (path == QS_GEMM_PORTABLE) return p;
#ifdef QS_AVX512
    const int64_t k = w->k, g = w->group;
    switch (w->fmt) {
    case QS_FMT_BNB4: case QS_FMT_INT4_GROUPED: case QS_FMT_INT4_BLOCKS:
        if (k % 64 == 0 && (g == 32 || g % 64 == 0) && k % g == 0) p = (plan_t){DEC_NIB, 1, 0, 64};
        break;
    case QS_FMT_INT8_ROWS:
        if (k % 32 == 0) p = (plan_t){DEC_INT8, 0, 1, 32};
        break;
    case QS_FMT_FLOAT8:
        if (k % 32 == 0) p = (plan_t){DEC_FP8, 0, 1, 32};
        break;
#ifdef QS_GGUF_AVX512
    case QS_FMT_GGUF:
        if (w->kind == GT_Q4_0 && k % 32 == 0) p = (plan_t){DEC_Q4_0, 0, 0, 32};
        else if (w->kind == GT_Q8_0 && k % 32 == 0) p = (plan_t){DEC_Q8_0, 0, 0, 32};
        else if (w->kind == GT_Q4_K && k % 256 == 0) p = (plan_t){DEC_Q4_K, 0, 0, 256};
        break;
#endif
    default: break;
    }
#endif
    return p;
}

int32_t qs_gemm_decoder(const qs_weight *w, int32_t path) {
    if (path == QS_GEMM_AUTO) path = best_path(QS_BF16);
    return plan_for(w, path).kind;
}

/* the factor of row n's sum when the panel holds codes (plan.post) */
static float post_scale(const qs_weight *w, int64_t n) {
    float s = load_f(w->scale, w->scale_dtype, n * w->scale_stride_n);
    if (w->fmt == QS_FMT_INT8_ROWS && w->divisor != 1.0f) s = s / w->divisor;
    return s;
}

/* ---- bf16 helpers --------------------------------------------------------------------------------------------- */
#ifdef QS_AVX512
/* 16 floats -> 16 bf16 (round to nearest even) */
static inline __m256i bf16x16(__m512 v) {
#ifdef QS_DPBF16
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_v(v)), 16));
#endif
}

/* 32 floats (lo: columns 0-15, hi: 16-31) -> 32 bf16 */
static inline __m512i bf16x32(__m512 lo, __m512 hi) {
#ifdef QS_DPBF16
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
#else
    return _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(lo)), bf16x16(hi), 1);
#endif
}

/* a 16-entry float table, rounded to the format's dtype, as bf16 in both halves of a 32-word VPERMW table (so an
 * index's bit 4 does not matter: a whole byte indexes its low nibble) */
static inline __m512i table_dup(__m512 t, int32_t round_dtype) {
    if (round_dtype == QS_F16) t = round_f16_v(t);
    const __m256i h = bf16x16(t);
    return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}

/* a 16-entry table in entries 0-15 (indices must then be below 16) */
static inline __m512i table_lo(__m512 t, int32_t round_dtype) {
    if (round_dtype == QS_F16) t = round_f16_v(t);
    return _mm512_zextsi256_si512(bf16x16(t));
}

/* two 16-entry tables: entries 0-15 and 16-31 */
static inline __m512i table_two(__m512 a, __m512 b, int32_t round_dtype) {
    if (round_dtype == QS_F16) { a = round_f16_v(a); b = round_f16_v(b); }
    return _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(a)), bf16x16(b), 1);
}

static inline int64_t dtype_size(int32_t dtype) {
    return dtype == QS_F32 || dtype == QS_I32 ? 4 : dtype == QS_I8 || dtype == QS_U8 ? 1 : 2;
}

static const float INT4_SIGNED_T[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

/* what a 4-bit format's group tables are made of, read out of the descriptor once per chunk (the stores into the
 * panel may alias anything, so the compiler would otherwise reload every field for every group) */
typedef struct {
    __m512 base;                 /* the 16 code values before scaling: lut, signed nibbles, or code - 8 */
    const float *absmax;         /* BNB4 plain absmax; ModelOpt INT4 scales */
    const uint8_t *codes;        /* BNB4 double quant: absmax codes ... */
    const float *nested_map, *nested_absmax;
    float offset;
    int nshift;                  /* log2(nested_blocksize), or -1: divide */
    int64_t nested_blocksize;
    const void *scale, *zero;    /* torchao int4 */
    int32_t scale_dtype, zero_dtype;
    int64_t ssn, ssg;
} nib_src;

static inline __attribute__((always_inline)) nib_src nib_source(const qs_weight *w, const int fmt) {
    nib_src s;
    memset(&s, 0, sizeof s);
    if (fmt == QS_FMT_BNB4) {
        s.base = _mm512_loadu_ps(w->lut);
        if (w->nested_map) {
            s.codes = (const uint8_t *)w->scale;
            s.nested_map = w->nested_map;
            s.nested_absmax = w->nested_absmax;
            s.offset = w->offset;
            s.nested_blocksize = w->nested_blocksize;
            s.nshift = (w->nested_blocksize & (w->nested_blocksize - 1)) ? -1 : __builtin_ctzll((unsigned long long)w->nested_blocksize);
        } else {
            s.absmax = (const float *)w->scale;
        }
    } else if (fmt == QS_FMT_INT4_GROUPED) {
        s.base = _mm512_loadu_ps(INT4_SIGNED_T);
        s.scale = w->scale; s.zero = w->zero;
        s.scale_dtype = w->scale_dtype; s.zero_dtype = w->zero_dtype;
        s.ssn = w->scale_stride_n; s.ssg = w->scale_stride_g;
    } else {
        s.base = _mm512_loadu_ps(INT4_OFFSET8);
        s.absmax = (const float *)w->scale;
    }
    return s;
}

/* torchao int4's scale and zero point at element `at` (out of line: load_f's dtype switches, inlined into the decode
 * loop, would multiply its code for one load per group) */
static __attribute__((noinline)) void int4_scale_zero(const nib_src *s, int64_t at, float *scale, float *zero) {
    *scale = load_f(s->scale, s->scale_dtype, at);
    *zero = load_f(s->zero, s->zero_dtype, at);
}

/* the 16 weights a code stands for in group gi of row n (float32, before rounding; gi counts the row's groups for
 * torchao int4, the whole weight's for BNB4 and ModelOpt INT4), each the reference's float32 operation */
static inline __attribute__((always_inline)) __m512 nib_table(const nib_src *s, const int fmt, int64_t n, int64_t gi) {
    if (fmt == QS_FMT_BNB4) {
        float a;
        if (s->absmax) a = s->absmax[gi];
        else a = s->nested_map[s->codes[gi]] * s->nested_absmax[s->nshift >= 0 ? gi >> s->nshift : gi / s->nested_blocksize] + s->offset;
        return _mm512_mul_ps(s->base, _mm512_set1_ps(a));
    }
    if (fmt == QS_FMT_INT4_GROUPED) {
        float sc, z;
        int4_scale_zero(s, n * s->ssn + gi * s->ssg, &sc, &z);
        return _mm512_add_ps(_mm512_mul_ps(s->base, _mm512_set1_ps(sc)), _mm512_set1_ps(z));
    }
    return _mm512_div_ps(s->base, _mm512_set1_ps(s->absmax[gi]));
}

/* 4-bit codes, two a byte (bnb, ModelOpt: high nibble the even column; torchao: the low one), 64 columns at a time;
 * one table per group of w->group columns (32: two tables a step). Rows [n0, n0 + rows), columns [k0, k0 + kc),
 * into dst (row stride ld); the next chunk of each row is prefetched. */
static inline __attribute__((always_inline)) void chunk_nib_fmt(const qs_weight *w, const int fmt, int64_t n0,
                                                                int rows, int64_t k0, int64_t kc, uint16_t *dst,
                                                                int64_t ld) {
    const int64_t k = w->k, g = w->group;
    const int hi_first = fmt != QS_FMT_INT4_GROUPED, f16 = w->round_dtype == QS_F16;
    const nib_src src = nib_source(w, fmt);
    /* the group of column k0: groups are numbered per row for torchao, over the flat weight otherwise (k0 is a
     * multiple of 64, and so of g when g is 32) */
    const int pow2 = !(g & (g - 1)), gs = __builtin_ctzll((unsigned long long)g);
    const int64_t g0 = pow2 ? k0 >> gs : k0 / g, left0 = g - (pow2 ? k0 & (g - 1) : k0 % g);
    const int64_t per_row = fmt == QS_FMT_INT4_GROUPED ? 0 : (pow2 ? k >> gs : k / g);
    const int64_t stride = fmt == QS_FMT_BNB4 ? k / 2 : w->data_stride;
    const int next = k0 + kc < k;
    const __m512i second_group = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
    const __m512i low4 = _mm512_set1_epi16(0x0F);
    for (int r = 0; r < rows; r++, dst += ld) {
        const int64_t n = n0 + r;
        const uint8_t *q = w->data + n * stride;
        int64_t gi = n * per_row + g0, left = left0;
        if (next) {
            for (int64_t c = k0 + kc; c < k0 + 2 * kc && c < k; c += 128) _mm_prefetch((const char *)(q + c / 2), _MM_HINT_T0);
            if (src.absmax) _mm_prefetch((const char *)(src.absmax + gi + (kc >> gs)), _MM_HINT_T0);
            if (fmt == QS_FMT_INT4_GROUPED) { /* the next chunk's scales and zero points */
                const int64_t at = n * src.ssn + (gi + (pow2 ? kc >> gs : kc / g)) * src.ssg;
                _mm_prefetch((const char *)src.scale + at * dtype_size(src.scale_dtype), _MM_HINT_T0);
                _mm_prefetch((const char *)src.zero + at * dtype_size(src.zero_dtype), _MM_HINT_T0);
            }
        }
        uint16_t *o = dst;
        __m512i tab = _mm512_setzero_si512();
        int fresh = 1; /* the group changed: make its table */
        for (int64_t c = k0; c < k0 + kc; c += 64, o += 64) {
            __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + c / 2)));
            __m512i h = _mm512_srli_epi16(b, 4);
            if (g == 32) { /* bytes 16-31 hold the next group's codes: their indices select entries 16-31 */
                tab = table_two(nib_table(&src, fmt, n, gi), nib_table(&src, fmt, n, gi + 1), f16 ? QS_F16 : QS_F32);
                gi += 2;
                h = _mm512_or_si512(h, second_group);
                b = _mm512_ternarylogic_epi32(b, low4, second_group, 0xEA); /* (b & 15) | group */
            } else { /* one table in entries 0-15: the low nibbles masked (a vector AND, off the shuffle port) */
                if (fresh) tab = table_lo(nib_table(&src, fmt, n, gi), f16 ? QS_F16 : QS_F32);
                b = _mm512_and_si512(b, low4);
                fresh = (left -= 64) == 0;
                if (fresh) { gi++; left = g; }
            }
            _mm512_storeu_si512(o, _mm512_permutexvar_epi16(hi_first ? h : b, tab));
            _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(hi_first ? b : h, tab));
        }
    }
}

static void chunk_nib(const qs_weight *w, int64_t n0, int rows, int64_t k0, int64_t kc, uint16_t *dst, int64_t ld) {
    switch (w->fmt) {
    case QS_FMT_BNB4: chunk_nib_fmt(w, QS_FMT_BNB4, n0, rows, k0, kc, dst, ld); break;
    case QS_FMT_INT4_GROUPED: chunk_nib_fmt(w, QS_FMT_INT4_GROUPED, n0, rows, k0, kc, dst, ld); break;
    default: chunk_nib_fmt(w, QS_FMT_INT4_BLOCKS, n0, rows, k0, kc, dst, ld); break;
    }
}

/* int8 rows: q - zero, exact in bf16 for integer zero points */
static void chunk_int8(const qs_weight *w, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const int8_t *q = (const int8_t *)(w->data + n * w->data_stride) + k0;
    const __m512 z = _mm512_set1_ps(w->zero ? load_f(w->zero, w->zero_dtype, n) : 0.0f);
    for (int64_t i = 0; i < kc; i += 32) {
        __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16))));
        if (w->zero) { a = _mm512_sub_ps(a, z); b = _mm512_sub_ps(b, z); }
        _mm512_storeu_si512(dst + i, bf16x32(a, b));
    }
}

/* float8: the code's value, exact in bf16, looked up by its 7 magnitude bits in a 128-entry bf16 table (the four
 * 32-entry quarters of the table in four registers; bit 6 picks the pair), then given the code's sign */
static void chunk_fp8(const qs_weight *w, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    static uint16_t tables[2][128] __attribute__((aligned(64)));
    static int ready[2];
    const int e5m2 = w->kind == 1;
    if (!__atomic_load_n(&ready[e5m2], __ATOMIC_ACQUIRE)) { /* the same values from every thread: a benign race */
        for (int i = 0; i < 128; i++) tables[e5m2][i] = float_to_bf16_bits(fp8_to_float((uint8_t)i, e5m2));
        __atomic_store_n(&ready[e5m2], 1, __ATOMIC_RELEASE);
    }
    const uint16_t *t = tables[e5m2];
    const __m512i t0 = _mm512_load_si512(t), t1 = _mm512_load_si512(t + 32), t2 = _mm512_load_si512(t + 64),
                  t3 = _mm512_load_si512(t + 96);
    const __m512i low7 = _mm512_set1_epi16(0x7F), bit6 = _mm512_set1_epi16(0x40), sign = _mm512_set1_epi16((short)0x8000);
    const uint8_t *q = w->data + n * w->data_stride + k0;
    for (int64_t i = 0; i < kc; i += 32) {
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + i)));
        const __m512i mag = _mm512_and_si512(b, low7);
        const __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, bit6), _mm512_permutex2var_epi16(t0, mag, t1),
                                                  _mm512_permutex2var_epi16(t2, mag, t3));
        _mm512_storeu_si512(dst + i, _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(b, 8), sign, 0xF8)); /* v | (b<<8 & sign) */
    }
}

#ifdef QS_GGUF_AVX512
/* Q4_0: d * (q - 8), low nibbles the block's first 16 weights */
static void chunk_q4_0(const qs_weight *w, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const uint8_t *b = w->data + n * w->data_stride + k0 / 32 * 18;
    const __m512 levels = _mm512_loadu_ps(NIB_M8_F);
    for (int64_t i = 0; i < kc; i += 32, b += 18) {
        const __m512i tab = table_dup(_mm512_mul_ps(_mm512_set1_ps(h2f_hw(b)), levels), QS_F32);
        const __m256i q = _mm256_cvtepu8_epi16(ld128(b + 2));
        const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
        _mm512_storeu_si512(dst + i, _mm512_permutexvar_epi16(idx, tab));
    }
}

/* Q8_0: q * d */
static void chunk_q8_0(const qs_weight *w, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const uint8_t *b = w->data + n * w->data_stride + k0 / 32 * 34;
    for (int64_t i = 0; i < kc; i += 32, b += 34) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 2)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 18)));
        _mm512_storeu_si512(dst + i, bf16x32(_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d)));
    }
}

/* Q4_K: (d * sc) * q - dmin * m per 32 weights; 64 weights share 32 code bytes (low nibbles, then high ones). The
 * eight d * sc and dmin * m of a block at once; the two tables of 64 weights in one 32-entry VPERMW table. */
static void chunk_q4_k(const qs_weight *w, int64_t n, int64_t k0, int64_t kc, uint16_t *dst) {
    const uint8_t *b = w->data + n * w->data_stride + k0 / 256 * 144;
    const __m512 nib = _mm512_loadu_ps(NIB_F);
    const __m512i low4 = _mm512_set1_epi16(0x0F), sixteen = _mm512_set1_epi16(16);
    for (int64_t i = 0; i < kc; i += 256, b += 144) {
        uint8_t sc[8], mn[8];
        for (int j = 0; j < 8; j++) k_scale_min(b + 4, j, &sc[j], &mn[j]);
        float ds[8], dm[8];
        uint64_t sc8, mn8;
        memcpy(&sc8, sc, 8);
        memcpy(&mn8, mn, 8);
        _mm256_storeu_ps(ds, _mm256_mul_ps(_mm256_set1_ps(h2f_hw(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc8)))));
        _mm256_storeu_ps(dm, _mm256_mul_ps(_mm256_set1_ps(h2f_hw(b + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8)))));
        for (int g = 0; g < 4; g++) {
            const __m512 t0 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds[2 * g]), nib), _mm512_set1_ps(dm[2 * g]));
            const __m512 t1 = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ds[2 * g + 1]), nib), _mm512_set1_ps(dm[2 * g + 1]));
            const __m512i tab = bf16x32(t0, t1);
            const __m512i q = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(b + 16 + 32 * g)));
            _mm512_storeu_si512(dst + i + 64 * g, _mm512_permutexvar_epi16(_mm512_and_si512(q, low4), tab));
            _mm512_storeu_si512(dst + i + 64 * g + 32,
                                _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(q, 4), sixteen), tab));
        }
    }
}
#endif
#endif /* QS_AVX512 */

/* float32 row -> bf16 (round to nearest even, exact: NaN kept quiet), zero-padded to kp */
static void row_to_bf16(const float *src, int64_t k, int64_t kp, uint16_t *dst) {
    int64_t i = 0;
#ifdef QS_AVX512
    for (; i + 16 <= k; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_v(_mm512_loadu_ps(src + i))), 16)));
#endif
    for (; i < k; i++) dst[i] = float_to_bf16_bits(src[i]);
    for (; i < kp; i++) dst[i] = 0;
}

#ifdef QS_AVX512
static inline void prefetch_range(const void *p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* prefetch the packed bytes of row n's columns [c0, c0 + kc) (the next chunk): a panel reads 64 rows a few hundred
 * bytes each, more streams than the hardware prefetcher follows */
static void prefetch_chunk(const qs_weight *w, int kind, int64_t n, int64_t c0, int64_t kc) {
    const uint8_t *row = w->data + n * w->data_stride;
    switch (kind) {
    case DEC_INT8: case DEC_FP8: prefetch_range(row + c0, kc); break;
    case DEC_Q4_0: prefetch_range(row + c0 / 32 * 18, kc / 32 * 18); break;
    case DEC_Q8_0: prefetch_range(row + c0 / 32 * 34, kc / 32 * 34); break;
    case DEC_Q4_K: prefetch_range(row + c0 / 256 * 144, kc / 256 * 144); break;
    default: break;
    }
}
#endif

/* rows [n0, n0 + nb) x columns [k0, k0 + kc) into the bf16 panel (row stride ld); rows past N are zeros.
 * `scratch`: k floats (the generic decoder's row). 0, or -1 when a row does not decode. */
static int decode_panel_bf16(const qs_weight *w, const plan_t *p, int64_t n0, int nb, int64_t k0, int64_t kc,
                             uint16_t *panel, int64_t ld, float *scratch) {
#ifdef QS_AVX512
    if (p->kind == DEC_NIB) { /* all rows in one call: its setup once per chunk */
        const int rows = (int)(w->n - n0 < nb ? w->n - n0 : nb);
        chunk_nib(w, n0, rows, k0, kc, panel, ld);
        for (int r = rows; r < nb; r++) memset(panel + r * ld, 0, (size_t)kc * 2);
        return 0;
    }
#endif
    for (int r = 0; r < nb; r++) {
        const int64_t n = n0 + r;
        uint16_t *dst = panel + r * ld;
        if (n >= w->n) { memset(dst, 0, (size_t)kc * 2); continue; }
#ifdef QS_AVX512
        if (p->kind != DEC_GENERIC && k0 + 2 * kc < w->k) prefetch_chunk(w, p->kind, n, k0 + 2 * kc, kc);
#endif
        switch (p->kind) {
#ifdef QS_AVX512
        case DEC_INT8: chunk_int8(w, n, k0, kc, dst); break;
        case DEC_FP8: chunk_fp8(w, n, k0, kc, dst); break;
#ifdef QS_GGUF_AVX512
        case DEC_Q4_0: chunk_q4_0(w, n, k0, kc, dst); break;
        case DEC_Q8_0: chunk_q8_0(w, n, k0, kc, dst); break;
        case DEC_Q4_K: chunk_q4_k(w, n, k0, kc, dst); break;
#endif
#endif
        default: /* generic: the whole row (k0 = 0, kc = the padded K) */
            if (qs_decode_row(w, n, scratch, w->round_dtype) != 0) return -1;
            row_to_bf16(scratch, w->k, kc, dst);
        }
    }
    return 0;
}

/* ---- activations ---------------------------------------------------------------------------------------------- */
/* the K column stored at panel position `pos` */
static inline int64_t column_of(int64_t pos, int eo) {
    if (!eo) return pos;
    const int64_t base = pos & ~(int64_t)63, t = pos & 63;
    return base + (t < 32 ? 2 * t : 2 * (t - 32) + 1);
}

/* bf16 x (m x k) -> rows of kp bf16 in the panel's column order, mp rows (rows past m: zeros) */
static void pack_rows_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t kp, int64_t mp, int eo, uint16_t *out) {
    for (int64_t r = 0; r < mp; r++) {
        uint16_t *o = out + r * kp;
        if (r >= m) { memset(o, 0, (size_t)kp * 2); continue; }
        const uint16_t *src = x + r * k;
        int64_t i = 0;
#ifdef QS_AVX512
        if (eo) {
            const __m512i even = _mm512_set_epi16(62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30,
                                                  28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
            for (; i + 64 <= k; i += 64) {
                const __m512i a = _mm512_loadu_si512(src + i), b = _mm512_loadu_si512(src + i + 32);
                _mm512_storeu_si512(o + i, _mm512_permutex2var_epi16(a, even, b));
                _mm512_storeu_si512(o + i + 32, _mm512_permutex2var_epi16(a, odd, b));
            }
        }
#endif
        if (!eo) { memcpy(o, src, (size_t)k * 2); i = k; }
        for (; i < k; i++) o[i] = src[column_of(i, eo)];
        for (; i < kp; i++) o[i] = 0;
    }
}

/* ---- the matmul paths ----------------------------------------------------------------------------------------- */
#define NB_CHUNKED 64   /* weight rows per panel with a chunk decoder */
#define NB_GENERIC 32   /* ... with the generic (whole-row) decoder */
#define KC_AMX 256      /* columns per chunk */
#define KC_DPBF16 512

#ifdef QS_AMX
typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void amx_configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
    _tile_loadconfig(&c);
}

/* acc (nb x mp float32, row stride mp) += panel (nb x kc bf16, stride ld) . xv^T over columns [k0, k0 + kc).
 * xv: the activations as bf16 pairs, per 16 rows a block of kp/2 lines of 16 pairs. tmm0-3: C, tmm4-5: A, tmm6-7: B */
static void amx_chunk(const uint16_t *panel, int64_t ld, int nb, const uint16_t *xv, int64_t kp, int64_t mp,
                      int64_t k0, int64_t kc, float *acc, int first) {
    const int mt = (int)(mp / 16);
    const size_t lda = (size_t)ld * 2, ldc = (size_t)mp * 4;
    if (mt == 1 && nb % 64 == 0) { /* one activation tile: four weight tiles, four independent accumulators */
        for (int i = 0; i < nb / 16; i += 4) {
            float *c = acc + (int64_t)(i * 16) * mp;
            if (first) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
            else {
                _tile_loadd(0, c, ldc); _tile_loadd(1, c + 16 * mp, ldc);
                _tile_loadd(2, c + 32 * mp, ldc); _tile_loadd(3, c + 48 * mp, ldc);
            }
            const uint16_t *a = panel + (int64_t)(i * 16) * ld, *b = xv + k0 * 16;
            for (int64_t kk = 0; kk < kc; kk += 32) {
                _tile_loadd(6, b + kk * 16, 64);
                _tile_loadd(4, a + kk, lda);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(5, a + 16 * ld + kk, lda);
                _tile_dpbf16ps(1, 5, 6);
                _tile_loadd(7, a + 32 * ld + kk, lda);
                _tile_dpbf16ps(2, 7, 6);
                _tile_loadd(4, a + 48 * ld + kk, lda);
                _tile_dpbf16ps(3, 4, 6);
            }
            _tile_stored(0, c, ldc); _tile_stored(1, c + 16 * mp, ldc);
            _tile_stored(2, c + 32 * mp, ldc); _tile_stored(3, c + 48 * mp, ldc);
        }
        return;
    }
    for (int i = 0; i < nb / 16; i += 2) {
        for (int j = 0; j < mt; j += 2) {
            const int both = j + 1 < mt;
            float *c00 = acc + (int64_t)(i * 16) * mp + j * 16, *c10 = c00 + 16 * mp;
            if (first) { _tile_zero(0); _tile_zero(1); if (both) { _tile_zero(2); _tile_zero(3); } }
            else {
                _tile_loadd(0, c00, ldc); _tile_loadd(1, c10, ldc);
                if (both) { _tile_loadd(2, c00 + 16, ldc); _tile_loadd(3, c10 + 16, ldc); }
            }
            const uint16_t *a0 = panel + (int64_t)(i * 16) * ld, *a1 = a0 + 16 * ld;
            const uint16_t *b0 = xv + (int64_t)j * kp * 16 + k0 * 16, *b1 = b0 + kp * 16;
            if (both) {
                for (int64_t kk = 0; kk < kc; kk += 32) {
                    _tile_loadd(4, a0 + kk, lda);
                    _tile_loadd(6, b0 + kk * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(5, a1 + kk, lda);
                    _tile_dpbf16ps(1, 5, 6);
                    _tile_loadd(7, b1 + kk * 16, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            } else {
                for (int64_t kk = 0; kk < kc; kk += 32) {
                    _tile_loadd(4, a0 + kk, lda);
                    _tile_loadd(6, b0 + kk * 16, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_loadd(5, a1 + kk, lda);
                    _tile_dpbf16ps(1, 5, 6);
                }
            }
            _tile_stored(0, c00, ldc); _tile_stored(1, c10, ldc);
            if (both) { _tile_stored(2, c00 + 16, ldc); _tile_stored(3, c10 + 16, ldc); }
        }
    }
}

/* the tile products of two 16-row weight tiles (A at a and a + 16 rows, stride lda) over columns [0, len) of the
 * chunk into C0 and C1, the activation tile's pairs at b: two independent accumulation chains, two A and two B
 * registers in turn (a load need not wait for the product before it) */
#define QS_AMX_ROW_TILES(C0, C1, a, b, len, lda, ld)                                                                \
    for (int64_t kk = 0; kk < (len); kk += 32) {                                                                    \
        if ((kk & 32) == 0) {                                                                                       \
            _tile_loadd(6, (b) + kk * 16, 64);                                                                      \
            _tile_loadd(4, (a) + kk, (lda));                                                                        \
            _tile_dpbf16ps(C0, 4, 6);                                                                               \
            _tile_loadd(5, (a) + 16 * (ld) + kk, (lda));                                                            \
            _tile_dpbf16ps(C1, 5, 6);                                                                               \
        } else {                                                                                                    \
            _tile_loadd(7, (b) + kk * 16, 64);                                                                      \
            _tile_loadd(4, (a) + kk, (lda));                                                                        \
            _tile_dpbf16ps(C0, 4, 7);                                                                               \
            _tile_loadd(5, (a) + 16 * (ld) + kk, (lda));                                                            \
            _tile_dpbf16ps(C1, 5, 7);                                                                               \
        }                                                                                                           \
    }

/* One panel on AMX: decode, a chunk at a time, and multiply. Each 16 (or 32) decoded rows go to the tiles at once, so
 * the tile unit multiplies them while the vector units decode the next rows. With one activation tile (M <= 16) and
 * 64 rows the four accumulator tiles stay in registers across the whole of K. */
static int amx_panel(const qs_weight *w, const plan_t *p, int64_t n0, int nb, const uint16_t *xv, int64_t kp,
                     int64_t mp, int64_t kc, uint16_t *panel, float *scratch, float *acc) {
    const int mt = (int)(mp / 16);
    const size_t lda = (size_t)kc * 2, ldc = (size_t)mp * 4;
    if (mt == 1 && nb == 64) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t k0 = 0; k0 < kp; k0 += kc) {
            const int64_t len = kp - k0 < kc ? kp - k0 : kc;
            const uint16_t *b = xv + k0 * 16;
            if (decode_panel_bf16(w, p, n0, 32, k0, len, panel, kc, scratch) != 0) return -1;
            QS_AMX_ROW_TILES(0, 1, panel, b, len, lda, kc)
            if (decode_panel_bf16(w, p, n0 + 32, 32, k0, len, panel + 32 * kc, kc, scratch) != 0) return -1;
            QS_AMX_ROW_TILES(2, 3, panel + 32 * kc, b, len, lda, kc)
        }
        _tile_stored(0, acc, ldc); _tile_stored(1, acc + 16 * mp, ldc);
        _tile_stored(2, acc + 32 * mp, ldc); _tile_stored(3, acc + 48 * mp, ldc);
        return 0;
    }
    for (int64_t k0 = 0; k0 < kp; k0 += kc) {
        const int64_t len = kp - k0 < kc ? kp - k0 : kc;
        for (int r0 = 0; r0 < nb; r0 += 32) {
            if (decode_panel_bf16(w, p, n0 + r0, 32, k0, len, panel + r0 * kc, kc, scratch) != 0) return -1;
            amx_chunk(panel + r0 * kc, kc, 32, xv, kp, mp, k0, len, acc + r0 * mp, k0 == 0);
        }
    }
    return 0;
}

/* rows (mp x kp bf16) -> bf16 pairs: xv[r / 16][p][r % 16] = the pair (rows[r][2p], rows[r][2p + 1]) */
static void pack_pairs(const uint16_t *rows, int64_t kp, int64_t mp, uint16_t *xv) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)(kp / 2)));
    for (int64_t t = 0; t < mp / 16; t++) {
        const uint32_t *src = (const uint32_t *)(rows + t * 16 * kp);
        uint32_t *dst = (uint32_t *)(xv + t * 16 * kp);
        for (int64_t p = 0; p < kp / 2; p++)
            _mm512_storeu_si512(dst + p * 16, _mm512_i32gather_epi32(idx, (const void *)(src + p), 4));
    }
}
#endif

#ifdef QS_DPBF16
/* accv (nb x mp x 16 lanes) += panel (nb x kc bf16, stride ld) . rows[:, k0 : k0 + kc]^T, 4 x 4 at a time */
static void dpbf16_chunk(const uint16_t *panel, int64_t ld, int nb, const uint16_t *rows, int64_t kp, int64_t mp,
                         int64_t k0, int64_t kc, __m512 *accv, int first) {
    for (int r = 0; r < nb; r += 4)
        for (int64_t t = 0; t < mp; t += 4) {
            __m512 s[4][4];
            for (int j = 0; j < 4; j++)
                for (int u = 0; u < 4; u++) s[j][u] = first ? _mm512_setzero_ps() : accv[(r + j) * mp + t + u];
            for (int64_t kk = 0; kk < kc; kk += 32) {
                __m512bh a[4];
                for (int j = 0; j < 4; j++) a[j] = (__m512bh)_mm512_loadu_si512(panel + (r + j) * ld + kk);
                for (int u = 0; u < 4; u++) {
                    const __m512bh xb = (__m512bh)_mm512_loadu_si512(rows + (t + u) * kp + k0 + kk);
                    for (int j = 0; j < 4; j++) s[j][u] = _mm512_dpbf16_ps(s[j][u], a[j], xb);
                }
            }
            for (int j = 0; j < 4; j++)
                for (int u = 0; u < 4; u++) accv[(r + j) * mp + t + u] = s[j][u];
        }
}
#endif

/* acc (nb x mp) = panel (nb x kp float32) . rows (mp x kp float32)^T, 4 x 4 at a time, 16 independent lanes */
static void portable_panel(const float *panel, int nb, const float *rows, int64_t kp, int64_t mp, float *acc) {
    for (int r = 0; r < nb; r += 4)
        for (int64_t t = 0; t < mp; t += 4) {
            float s[4][4][16];
            memset(s, 0, sizeof s);
            for (int64_t kk = 0; kk < kp; kk += 16)
                for (int j = 0; j < 4; j++) {
                    const float *a = panel + (r + j) * kp + kk;
                    for (int u = 0; u < 4; u++) {
                        const float *b = rows + (t + u) * kp + kk;
                        for (int l = 0; l < 16; l++) s[j][u][l] += a[l] * b[l];
                    }
                }
            for (int j = 0; j < 4; j++)
                for (int u = 0; u < 4; u++) {
                    float v = 0.0f;
                    for (int l = 0; l < 16; l++) v += s[j][u][l];
                    acc[(r + j) * mp + t + u] = v;
                }
        }
}

/* y[m][n0 + r] = acc[r][m] * post_scale(n) + bias in y's dtype (y's rows written contiguously) */
static void write_out(const qs_weight *w, const plan_t *p, int64_t n0, int nb, const float *acc, int64_t mp, int64_t m,
                      void *y, int32_t y_dtype, const float *bias) {
    const int64_t nout = w->n;
    const int rows = (int)(nout - n0 < nb ? nout - n0 : nb);
    float scale[NB_CHUNKED > NB_GENERIC ? NB_CHUNKED : NB_GENERIC], add[NB_CHUNKED > NB_GENERIC ? NB_CHUNKED : NB_GENERIC];
    for (int r = 0; r < rows; r++) {
        scale[r] = p->post ? post_scale(w, n0 + r) : 1.0f;
        add[r] = bias ? bias[n0 + r] : 0.0f;
    }
    for (int64_t t = 0; t < m; t++) {
        int r = 0;
#ifdef QS_AVX512
        const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32((int)mp));
        for (; r + 16 <= rows; r += 16) {
            __m512 v = _mm512_i32gather_ps(idx, acc + r * mp + t, 4);
            if (p->post) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + r));
            v = _mm512_add_ps(v, _mm512_loadu_ps(add + r));
            void *dst = (char *)y + (t * nout + n0 + r) * (y_dtype == QS_F32 ? 4 : 2);
            if (y_dtype == QS_F32) _mm512_storeu_ps(dst, v);
            else if (y_dtype == QS_BF16)
                _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16_v(v)), 16)));
            else _mm256_storeu_si256((__m256i *)dst, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
#endif
        for (; r < rows; r++) {
            float v = acc[r * mp + t];
            if (p->post) v = v * scale[r];
            v = v + add[r];
            const int64_t at = t * nout + n0 + r;
            if (y_dtype == QS_F32) ((float *)y)[at] = v;
            else if (y_dtype == QS_BF16) ((uint16_t *)y)[at] = float_to_bf16_bits(v);
            else ((uint16_t *)y)[at] = float_to_half_bits(v);
        }
    }
}

static float x_at(const void *x, int32_t dtype, int64_t i) {
    return dtype == QS_F32 ? ((const float *)x)[i] : load_f(x, dtype, i);
}

int qs_gemm(const qs_weight *w, const void *x, int32_t x_dtype, int64_t m, void *y, int32_t y_dtype,
            const float *bias, int32_t path) {
    if (qs_supported(w->fmt, w->kind) != 0 || m < 0 || m > QS_GEMM_MAX_M) return -1;
    if (x_dtype != QS_F32 && x_dtype != QS_BF16 && x_dtype != QS_F16) return -1;
    if (y_dtype != QS_F32 && y_dtype != QS_BF16 && y_dtype != QS_F16) return -1;
    if (path == QS_GEMM_AUTO) path = best_path(x_dtype);
    if (qs_gemm_available(path) != 0) return -1;
    if (path != QS_GEMM_PORTABLE && x_dtype != QS_BF16) return -1;
    if (m == 0 || w->n == 0) return 0;
    const int64_t k = w->k, nout = w->n, kp = (k + 31) / 32 * 32;
    const plan_t plan = plan_for(w, path);
    const int chunked = plan.kind != DEC_GENERIC;
    const int nb = chunked ? NB_CHUNKED : NB_GENERIC;
    int64_t kc = kp;
    if (chunked) kc = (path == QS_GEMM_AMX ? KC_AMX : KC_DPBF16) / plan.unit * plan.unit;
    if (kc < plan.unit) kc = plan.unit;
    const int64_t panels = (nout + nb - 1) / nb;
    /* activations, once per call: bf16 rows in the panel's column order (and as pairs for AMX), or float32 rows */
    int64_t mp = path == QS_GEMM_AMX ? (m + 15) / 16 * 16 : (m + 3) / 4 * 4;
    void *xs = NULL, *xv = NULL;
    if (path == QS_GEMM_PORTABLE) {
        float *xf = (float *)malloc((size_t)(mp * kp) * sizeof(float));
        if (!xf) return -1;
        for (int64_t r = 0; r < mp; r++)
            for (int64_t i = 0; i < kp; i++) xf[r * kp + i] = (r < m && i < k) ? x_at(x, x_dtype, r * k + i) : 0.0f;
        xs = xf;
    } else {
        uint16_t *rows = (uint16_t *)malloc((size_t)(mp * kp) * 2);
        if (!rows) return -1;
        pack_rows_bf16((const uint16_t *)x, m, k, kp, mp, plan.eo, rows);
        xs = rows;
#ifdef QS_AMX
        if (path == QS_GEMM_AMX) {
            if (!(xv = malloc((size_t)(mp * kp) * 2))) { free(xs); return -1; }
            pack_pairs(rows, kp, mp, (uint16_t *)xv);
        }
#endif
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (nout * k >= QS_PARALLEL_MIN_WEIGHTS)
    {
        const size_t panel_bytes = (size_t)(nb * kc) * (path == QS_GEMM_PORTABLE ? 4 : 2);
        void *panel = aligned_alloc(64, (panel_bytes + 63) / 64 * 64);
        float *acc = (float *)aligned_alloc(64, (size_t)(nb * mp) * sizeof(float));
        float *scratch = chunked ? NULL : (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
        void *accv = NULL;
#ifdef QS_DPBF16
        if (path == QS_GEMM_DPBF16) accv = aligned_alloc(64, (size_t)(nb * mp) * 64);
#endif
        if (!panel || !acc || (!chunked && !scratch) || (path == QS_GEMM_DPBF16 && !accv)) failed = 1;
#ifdef QS_AMX
        if (!failed && path == QS_GEMM_AMX) amx_configure();
#endif
#pragma omp for schedule(dynamic) /* panels to whichever thread is free: on a busy machine one descheduled thread
                                    does not hold the whole call */
        for (int64_t pi = 0; pi < panels; pi++) {
            if (failed) continue;
            const int64_t n0 = pi * nb;
            if (path == QS_GEMM_PORTABLE) {
                float *pf = (float *)panel;
                for (int r = 0; r < nb; r++) {
                    float *row = pf + r * kp;
                    if (n0 + r >= nout) { memset(row, 0, (size_t)kp * 4); continue; }
                    if (qs_decode_row(w, n0 + r, row, w->round_dtype) != 0) { failed = 1; break; }
                    for (int64_t i = k; i < kp; i++) row[i] = 0.0f;
                }
                if (failed) continue;
                portable_panel(pf, nb, (const float *)xs, kp, mp, acc);
            } else {
#ifdef QS_AMX
                if (path == QS_GEMM_AMX &&
                    amx_panel(w, &plan, n0, nb, (const uint16_t *)xv, kp, mp, kc, (uint16_t *)panel, scratch, acc) != 0)
                    failed = 1;
#endif
                for (int64_t k0 = 0; k0 < kp && !failed && path != QS_GEMM_AMX; k0 += kc) {
                    const int64_t len = kp - k0 < kc ? kp - k0 : kc;
                    if (decode_panel_bf16(w, &plan, n0, nb, k0, len, (uint16_t *)panel, kc, scratch) != 0) {
                        failed = 1;
                        break;
                    }
#ifdef QS_DPBF16
                    if (path == QS_GEMM_DPBF16)
                        dpbf16_chunk((const uint16_t *)panel, kc, nb, (const uint16_t *)xs, kp, mp, k0, len,
                                     (__m512 *)accv, k0 == 0);
#endif
                }
                if (failed) continue;
#ifdef QS_DPBF16
                if (path == QS_GEMM_DPBF16)
                    for (int64_t i = 0; i < nb * mp; i++) acc[i] = _mm512_reduce_add_ps(((__m512 *)accv)[i]);
#endif
            }
            write_out(w, &plan, n0, nb, acc, mp, m, y, y_dtype, bias);
        }
#ifdef QS_AMX
        if (path == QS_GEMM_AMX) _tile_release();
#endif
        free(panel);
        free(acc);
        free(scratch);
        free(accv);
    }
    free(xs);
    free(xv);
    return failed ? -1 : 0;
}
