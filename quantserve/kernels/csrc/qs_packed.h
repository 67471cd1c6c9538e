/* The private pieces shared by qs_decode.c (row decoders, qs_dequantize) and qs_dot.c (fused row dots, qs_gemv) for
 * the non-GGUF packed formats: the instruction-set switch, the element decoders both use (float8, e2m1, nibbles,
 * BNB4's absmax) and the AVX-512 helpers. Not part of the ABI (that is qs_cpu.h).
 *
 * The AVX-512 paths (intrinsics, under QS_AVX512) compute exactly what the portable paths compute, sixteen lanes at a
 * time. There is no hand-written AVX2 path: on an AVX2 machine (-march=x86-64-v3 or native) the portable C is what
 * runs, auto-vectorized by the compiler; QS_AVX2 only names that build in qs_isa().
 */
#ifndef QS_PACKED_H
#define QS_PACKED_H

#include "qs_cpu.h"
#include "qs_scalar.h"

#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QS_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define QS_AVX2 1 /* a label for qs_isa(): the portable code, auto-vectorized for AVX2; no intrinsics */
#endif

/* Below this many weights a call runs on one thread: waking the pool costs more than it saves, and on a busy
 * machine a descheduled worker would hold the whole call for a time slice. */
#define QS_PARALLEL_MIN_WEIGHTS (1 << 17)

/* float8: e4m3fn through a half (its magnitude bits shifted into a half, times 2^8: exact, subnormals too);
 * e5m2 is the top byte of a half */
static inline float fp8_to_float(uint8_t b, int e5m2) {
    if (e5m2) return half_to_float((uint16_t)b << 8);
    if ((b & 0x7F) == 0x7F) return NAN;
    float v = half_to_float((uint16_t)((b & 0x7F) << 7)) * 256.0f;
    return (b & 0x80) ? -v : v;
}

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* ---- AVX-512 helpers ----------------------------------------------------------------------------------------- */
#ifdef QS_AVX512
/* 8 bytes -> 16 nibble indices (int32), high nibble first when hi_first, else low first */
static inline __m512i nibbles16(const uint8_t *p, int hi_first) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    __m128i seq = hi_first ? _mm_unpacklo_epi8(hi, lo) : _mm_unpacklo_epi8(lo, hi);
    return _mm512_cvtepu8_epi32(seq);
}

/* 16 bytes -> 32 nibble indices (int32) as two vectors, high nibble first when hi_first, else low first */
static inline void nibbles32(const uint8_t *p, int hi_first, __m512i *first, __m512i *second) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4), lo = _mm_and_si128(v, low4);
    *first = _mm512_cvtepu8_epi32(hi_first ? _mm_unpacklo_epi8(hi, lo) : _mm_unpacklo_epi8(lo, hi));
    *second = _mm512_cvtepu8_epi32(hi_first ? _mm_unpackhi_epi8(hi, lo) : _mm_unpackhi_epi8(lo, hi));
}

/* a0 += lut[codes 0..15] * x[0..15], a1 += lut[codes 16..31] * x[16..31] for the 32 codes of 16 bytes at p */
static inline void lut_dot32(const uint8_t *p, int hi_first, __m512 lut, const float *x, __m512 *a0, __m512 *a1) {
    __m512i i0, i1;
    nibbles32(p, hi_first, &i0, &i1);
    *a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(i0, lut), _mm512_loadu_ps(x), *a0);
    *a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(i1, lut), _mm512_loadu_ps(x + 16), *a1);
}

static inline __m512 round_bf16_v(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), v);
}

static inline __m512 round_f16_v(__m512 v) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* 16 float8 bytes -> 16 floats (see fp8_to_float) */
static inline __m512 fp8x16(const uint8_t *p, int e5m2) {
    __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    if (e5m2) return _mm512_cvtph_ps(_mm256_slli_epi16(b, 8));
    __m256i mag = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
    __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
    __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(mag, sign)), _mm512_set1_ps(256.0f));
    __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), _mm256_set1_epi16(0x7F));
    return _mm512_mask_blend_ps(nan, v, _mm512_set1_ps(NAN));
}
#endif

static inline float bnb_absmax(const qs_weight *w, int64_t block) {
    if (!w->nested_map) return ((const float *)w->scale)[block];
    uint8_t code = ((const uint8_t *)w->scale)[block];
    /* reference: codes * scale + offset, each a float32 operation */
    return w->nested_map[code] * w->nested_absmax[block / w->nested_blocksize] + w->offset;
}

/* ModelOpt INT4: (code - 8) / scale, the scale one float32 per block of `group` columns over the flat weight */
static const float INT4_OFFSET8[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

/* decode row n into out (k floats), then round it to `round_dtype` (the format's own dtype, or F32 when the caller
 * rounds to that dtype itself: rounding twice to one dtype is rounding once); 0 or -1 (qs_decode.c) */
QS_INTERNAL int qs_decode_row(const qs_weight *w, int64_t n, float *out, int32_t round_dtype);

#endif
