/* GGUF (ggml) block decoders: one row of raw ggml blocks -> float32, bit for bit the values of kernels/gguf.py.
 *
 * Every decoder does the reference's float32 operations in the reference's order (kernels/gguf.py, itself
 * bit-exact against gguf-py): e.g. Q4_K computes (d * sc) * q - (dmin * m) with every product and difference
 * rounded to float32; the build has -ffp-contract=off, so nothing is fused into an FMA. fp16 scale fields are
 * converted exactly (subnormals included).
 *
 * Two implementations of each type:
 *   - the portable one (dec_*_c): plain C, inner loops over fixed 16/32-weight runs that gcc auto-vectorizes;
 *     its fp16 conversion is done in integer arithmetic, so it needs no F16C;
 *   - under __AVX512F__ (with AVX512BW/VL and F16C), intrinsics (dec_*_avx512) for every type but F32, BF16
 *     and Q8_0, which gcc vectorizes well by itself.
 * qs_gguf_decode_row uses the best one the build has; qs_gguf_decode_row_portable (not in qs_cpu.h; the tests
 * call it) always runs the portable one, so both are held against the reference on an AVX-512 machine.
 *
 * Block layouts (ggml's block_* structs; weights per block, bytes per block):
 *   Q4_0   32, 18: d f16, qs[16]        w[j] = d * (nib - 8); low nibbles are weights 0-15, high ones 16-31
 *   Q4_1   32, 20: d, m f16, qs[16]     w = d * nib + m
 *   Q5_0   32, 22: d, qh u32, qs[16]    q = nib | bit j of qh << 4; w = d * (q - 16)
 *   Q5_1   32, 24: d, m, qh u32, qs[16] w = d * q + m
 *   Q8_0   32, 34: d, qs int8[32]       w = q * d
 *   Q2_K  256, 84: scales[16], qs[64], d, dmin   w = (d * (sc & 15)) * q2 - dmin * (sc >> 4), 16 per scale
 *   Q3_K  256,110: hmask[32], qs[64], scales[12], d   w = (d * (sc6 - 32)) * (q2 - (hbit ? 0 : 4))
 *   Q4_K  256,144: d, dmin, scales[12], qs[128]  w = (d * sc6) * nib - dmin * m6, 32 per scale
 *   Q5_K  256,176: d, dmin, scales[12], qh[32], qs[128]   as Q4_K with a fifth bit from qh
 *   Q6_K  256,210: ql[128], qh[64], scales int8[16], d    w = (d * sc) * (q6 - 32), 16 per scale
 *   IQ4_NL 32, 18: d, qs[16]            w = d * levels[nib]
 *   IQ4_XS 256,136: d, scales_h u16, scales_l[4], qs[128]  w = (d * (sc6 - 32)) * levels[nib], 32 per scale
 *   F32, F16, BF16: one weight per element.
 */
#include "qs_cpu.h"

#include <string.h>

/* sum_k W[k] * x[k] for one row of k weights of ggml type qtype (raw blocks at `row`), x float32.
 * Writes the sum to *out and returns 0, or returns -1 for a type without a fused dot (the caller then decodes). */
int qs_gguf_dot_row(int32_t qtype, const uint8_t *row, int64_t k, const float *x, float *out);

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>
#define QS_GGUF_AVX512 1
#endif

enum {
    GT_F32 = 0, GT_F16 = 1, GT_Q4_0 = 2, GT_Q4_1 = 3, GT_Q5_0 = 6, GT_Q5_1 = 7, GT_Q8_0 = 8,
    GT_Q2_K = 10, GT_Q3_K = 11, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14, GT_IQ4_NL = 20, GT_IQ4_XS = 23,
    GT_BF16 = 30
};

static const int8_t IQ4_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float IQ4_LEVELS_F[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                       1.f, 13.f, 25.f, 38.f, 53.f, 69.f, 89.f, 113.f};

/* ---- helpers ------------------------------------------------------------------------------------------------ */

static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t ld32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp16 -> float32, exact, in integer arithmetic (no F16C). */
static inline float h2f_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));          /* inf, nan (payload kept) */
    if (e != 0) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));        /* normal */
    if (m == 0) return bits_f32(sign);                                          /* +-0 */
    /* subnormal: m * 2^-24, exact (m < 2^10; the result is a normal float32) */
    uint32_t mag;
    float f = (float)m * 0x1p-24f;
    memcpy(&mag, &f, 4);
    return bits_f32(sign | mag);
}

/* the 6-bit scale and min j (0..7) of a Q4_K/Q5_K block's 12 scale bytes */
static inline void k_scale_min(const uint8_t *s, int j, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = s[j] & 0x3F;
        *mn = s[j + 4] & 0x3F;
    } else {
        *sc = (uint8_t)((s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30));
        *mn = (uint8_t)((s[j + 4] >> 4) | ((s[j] >> 2) & 0x30));
    }
}

/* ---- portable decoders: nb blocks from `b` into `o` ------------------------------------------------------------ */

static void dec_q4_0_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 18, o += 32) {
        const float d = h2f_soft(ld16(b));
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) o[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
        for (int j = 0; j < 16; j++) o[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static void dec_q4_1_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 20, o += 32) {
        const float d = h2f_soft(ld16(b)), m = h2f_soft(ld16(b + 2));
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) o[j] = d * (float)(qs[j] & 0x0F) + m;
        for (int j = 0; j < 16; j++) o[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void dec_q5_0_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 22, o += 32) {
        const float d = h2f_soft(ld16(b));
        const uint32_t qh = ld32(b + 2);
        const uint8_t *qs = b + 6;
        for (int j = 0; j < 16; j++)
            o[j] = d * (float)((int)((qs[j] & 0x0F) | (((qh >> j) & 1u) << 4)) - 16);
        for (int j = 0; j < 16; j++)
            o[j + 16] = d * (float)((int)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16);
    }
}

static void dec_q5_1_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 24, o += 32) {
        const float d = h2f_soft(ld16(b)), m = h2f_soft(ld16(b + 2));
        const uint32_t qh = ld32(b + 4);
        const uint8_t *qs = b + 8;
        for (int j = 0; j < 16; j++)
            o[j] = d * (float)((qs[j] & 0x0F) | (((qh >> j) & 1u) << 4)) + m;
        for (int j = 0; j < 16; j++)
            o[j + 16] = d * (float)((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) + m;
    }
}

static void dec_q8_0_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 34, o += 32) {
        const float d = h2f_soft(ld16(b));
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) o[j] = (float)qs[j] * d;
    }
}

static void dec_q2_k_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 84, o += 256) {
        const uint8_t *scales = b, *qs = b + 16;
        const float d = h2f_soft(ld16(b + 80)), dmin = h2f_soft(ld16(b + 82));
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int half = 0; half < 2; half++) {
                    const int sb = h * 8 + s * 2 + half;          /* 16 weights per scale */
                    const float dl = d * (float)(scales[sb] & 0x0F), ml = dmin * (float)(scales[sb] >> 4);
                    const uint8_t *q = qs + h * 32 + half * 16;
                    float *w = o + sb * 16;
                    for (int j = 0; j < 16; j++) w[j] = dl * (float)((q[j] >> (2 * s)) & 3) - ml;
                }
    }
}

/* 64 bytes -> 256 two-bit codes in the K-quant order: weight h*128 + s*32 + j is bits 2s..2s+1 of byte h*32 + j */
static inline void crumbs256(const uint8_t *restrict qs, uint8_t *restrict q) {
    for (int h = 0; h < 2; h++)
        for (int s = 0; s < 4; s++)
            for (int j = 0; j < 32; j++) q[h * 128 + s * 32 + j] = (qs[h * 32 + j] >> (2 * s)) & 3;
}

static void dec_q3_k_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 110, o += 256) {
        const uint8_t *hmask = b, *sc = b + 96;
        const float d = h2f_soft(ld16(b + 108));
        uint8_t q[256];
        float f[256];
        crumbs256(b + 32, q);
        /* weight t*32 + j loses 4 unless bit t of hmask[j] is set */
        for (int t = 0; t < 8; t++)
            for (int j = 0; j < 32; j++) q[t * 32 + j] = (uint8_t)(q[t * 32 + j] - (((hmask[j] >> t) & 1) ^ 1) * 4);
        for (int j = 0; j < 256; j++) f[j] = (float)(int8_t)q[j];
        for (int sb = 0; sb < 16; sb++) {
            const int low = sb < 8 ? (sc[sb] & 0x0F) : (sc[sb - 8] >> 4);
            const int high = (sc[8 + (sb & 3)] >> (2 * (sb >> 2))) & 3;
            const float dl = d * (float)((low | (high << 4)) - 32);
            for (int j = 0; j < 16; j++) o[sb * 16 + j] = dl * f[sb * 16 + j];
        }
    }
}

static void dec_q4_k_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 144, o += 256) {
        const float d = h2f_soft(ld16(b)), dmin = h2f_soft(ld16(b + 2));
        const uint8_t *qs = b + 16;
        for (int g = 0; g < 4; g++) {
            uint8_t sc0, m0, sc1, m1;
            k_scale_min(b + 4, 2 * g, &sc0, &m0);
            k_scale_min(b + 4, 2 * g + 1, &sc1, &m1);
            const float d0 = d * (float)sc0, dm0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, dm1 = dmin * (float)m1;
            const uint8_t *q = qs + 32 * g;
            float *w = o + 64 * g;
            for (int j = 0; j < 32; j++) w[j] = d0 * (float)(q[j] & 0x0F) - dm0;
            for (int j = 0; j < 32; j++) w[j + 32] = d1 * (float)(q[j] >> 4) - dm1;
        }
    }
}

static void dec_q5_k_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 176, o += 256) {
        const float d = h2f_soft(ld16(b)), dmin = h2f_soft(ld16(b + 2));
        const uint8_t *qh = b + 16, *qs = b + 48;
        for (int g = 0; g < 4; g++) {
            uint8_t sc0, m0, sc1, m1;
            k_scale_min(b + 4, 2 * g, &sc0, &m0);
            k_scale_min(b + 4, 2 * g + 1, &sc1, &m1);
            const float d0 = d * (float)sc0, dm0 = dmin * (float)m0;
            const float d1 = d * (float)sc1, dm1 = dmin * (float)m1;
            const uint8_t *q = qs + 32 * g;
            const int t0 = 2 * g, t1 = 2 * g + 1;
            float *w = o + 64 * g;
            for (int j = 0; j < 32; j++) w[j] = d0 * (float)((q[j] & 0x0F) | (((qh[j] >> t0) & 1) << 4)) - dm0;
            for (int j = 0; j < 32; j++) w[j + 32] = d1 * (float)((q[j] >> 4) | (((qh[j] >> t1) & 1) << 4)) - dm1;
        }
    }
}

static void dec_q6_k_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 210, o += 256) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = h2f_soft(ld16(b + 208));
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++) {          /* weights h*128 + s*32 + j, j < 32 */
                const uint8_t *l = ql + h * 64 + (s & 1) * 32, *hh = qh + h * 32;
                const int lshift = (s >> 1) * 4, hshift = 2 * s;
                for (int half = 0; half < 2; half++) {
                    const int sb = h * 8 + s * 2 + half;
                    const float dl = d * (float)scales[sb];
                    float *w = o + sb * 16;
                    for (int j = 0; j < 16; j++) {
                        const int jj = half * 16 + j;
                        const int q = ((l[jj] >> lshift) & 0x0F) | (((hh[jj] >> hshift) & 3) << 4);
                        w[j] = dl * (float)(q - 32);
                    }
                }
            }
    }
}

static void dec_iq4_nl_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 18, o += 32) {
        const float d = h2f_soft(ld16(b));
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) o[j] = d * (float)IQ4_LEVELS[qs[j] & 0x0F];
        for (int j = 0; j < 16; j++) o[j + 16] = d * (float)IQ4_LEVELS[qs[j] >> 4];
    }
}

static void dec_iq4_xs_c(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    for (int64_t ib = 0; ib < nb; ib++, b += 136, o += 256) {
        const float d = h2f_soft(ld16(b));
        const uint16_t sh = ld16(b + 2);
        const uint8_t *sl = b + 4, *qs = b + 8;
        for (int g = 0; g < 8; g++) {
            const int low = (sl[g >> 1] >> (4 * (g & 1))) & 0x0F, high = (sh >> (2 * g)) & 3;
            const float dl = d * (float)((low | (high << 4)) - 32);
            const uint8_t *q = qs + 16 * g;
            float *w = o + 32 * g;
            for (int j = 0; j < 16; j++) w[j] = dl * IQ4_LEVELS_F[q[j] & 0x0F];
            for (int j = 0; j < 16; j++) w[j + 16] = dl * IQ4_LEVELS_F[q[j] >> 4];
        }
    }
}

static void dec_f32_c(const uint8_t *restrict b, int64_t n, float *restrict o) { memcpy(o, b, (size_t)n * 4); }

static void dec_f16_c(const uint8_t *restrict b, int64_t n, float *restrict o) {
    for (int64_t i = 0; i < n; i++) o[i] = h2f_soft(ld16(b + 2 * i));
}

static void dec_bf16_c(const uint8_t *restrict b, int64_t n, float *restrict o) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)ld16(b + 2 * i) << 16;
        memcpy(o + i, &u, 4);
    }
}

/* ---- AVX-512 decoders ---------------------------------------------------------------------------------------- */
#ifdef QS_GGUF_AVX512

static inline float h2f_hw(const uint8_t *p) { return _cvtsh_ss(ld16(p)); }
static inline __m128i ld128(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
/* 16 bytes -> 16 floats */
static inline __m512 u8_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
static inline __m512 i8_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
static inline __m128i lo_nib(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(0x0F)); }
static inline __m128i hi_nib(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F)); }

static void dec_f16_avx512(const uint8_t *restrict b, int64_t n, float *restrict o) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + 2 * i))));
    for (; i < n; i++) o[i] = h2f_hw(b + 2 * i);
}

/* vpermps reads only the low 4 bits of each index: with a 16-float table it is the nibble lookup and the
 * int -> float conversion in one (the table holds exactly the floats the reference converts to) */
static inline __m512 lut16(__m128i bytes, __m512 table) {
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(bytes), table);
}
static const float NIB_F[16] = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f};
static const float NIB_M8_F[16] = {-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
static const float CRUMB_F[16] = {0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f};

static void dec_q4_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(NIB_M8_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 18, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b));
        const __m128i qs = ld128(b + 2);
        _mm512_storeu_ps(o, _mm512_mul_ps(d, lut16(qs, t)));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(d, lut16(_mm_srli_epi16(qs, 4), t)));
    }
}

static void dec_q4_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(NIB_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 20, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b)), m = _mm512_set1_ps(h2f_hw(b + 2));
        const __m128i qs = ld128(b + 4);
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(d, lut16(qs, t)), m));
        _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(d, lut16(_mm_srli_epi16(qs, 4), t)), m));
    }
}

static void dec_q2_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(CRUMB_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 84, o += 256) {
        const uint8_t *scales = b, *qs = b + 16;
        const float d = h2f_hw(b + 80), dmin = h2f_hw(b + 82);
        for (int h = 0; h < 2; h++)
            for (int half = 0; half < 2; half++) {
                const __m128i q = ld128(qs + h * 32 + half * 16);
                for (int s = 0; s < 4; s++) {
                    const int sb = h * 8 + s * 2 + half;
                    const __m512 dl = _mm512_set1_ps(d * (float)(scales[sb] & 0x0F));
                    const __m512 ml = _mm512_set1_ps(dmin * (float)(scales[sb] >> 4));
                    const __m512 v = lut16(_mm_srli_epi16(q, 2 * s), t);
                    _mm512_storeu_ps(o + sb * 16, _mm512_sub_ps(_mm512_mul_ps(dl, v), ml));
                }
            }
    }
}

static void dec_q4_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(NIB_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 144, o += 256) {
        const float d = h2f_hw(b), dmin = h2f_hw(b + 2);
        const uint8_t *qs = b + 16;
        for (int g = 0; g < 4; g++) {
            const __m128i q0 = ld128(qs + 32 * g), q1 = ld128(qs + 32 * g + 16);
            uint8_t sc, mn;
            k_scale_min(b + 4, 2 * g, &sc, &mn);
            __m512 dl = _mm512_set1_ps(d * (float)sc), ml = _mm512_set1_ps(dmin * (float)mn);
            float *w = o + 64 * g;
            _mm512_storeu_ps(w, _mm512_sub_ps(_mm512_mul_ps(dl, lut16(q0, t)), ml));
            _mm512_storeu_ps(w + 16, _mm512_sub_ps(_mm512_mul_ps(dl, lut16(q1, t)), ml));
            k_scale_min(b + 4, 2 * g + 1, &sc, &mn);
            dl = _mm512_set1_ps(d * (float)sc);
            ml = _mm512_set1_ps(dmin * (float)mn);
            _mm512_storeu_ps(w + 32, _mm512_sub_ps(_mm512_mul_ps(dl, lut16(_mm_srli_epi16(q0, 4), t)), ml));
            _mm512_storeu_ps(w + 48, _mm512_sub_ps(_mm512_mul_ps(dl, lut16(_mm_srli_epi16(q1, 4), t)), ml));
        }
    }
}

static void dec_q5_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m128i m16 = _mm_set1_epi8(16);
    for (int64_t ib = 0; ib < nb; ib++, b += 22, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b));
        const uint32_t qh = ld32(b + 2);
        const __m128i qs = ld128(b + 6);
        /* nib - 16, plus 16 where the fifth bit is set: (nib | bit << 4) - 16 as int8 */
        __m128i lo = _mm_sub_epi8(lo_nib(qs), m16), hi = _mm_sub_epi8(hi_nib(qs), m16);
        lo = _mm_mask_add_epi8(lo, (__mmask16)(qh & 0xFFFF), lo, m16);
        hi = _mm_mask_add_epi8(hi, (__mmask16)(qh >> 16), hi, m16);
        _mm512_storeu_ps(o, _mm512_mul_ps(d, i8_ps(lo)));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(d, i8_ps(hi)));
    }
}

static void dec_q5_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m128i m16 = _mm_set1_epi8(16);
    for (int64_t ib = 0; ib < nb; ib++, b += 24, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b)), m = _mm512_set1_ps(h2f_hw(b + 2));
        const uint32_t qh = ld32(b + 4);
        const __m128i qs = ld128(b + 8);
        __m128i lo = lo_nib(qs), hi = hi_nib(qs);
        lo = _mm_mask_add_epi8(lo, (__mmask16)(qh & 0xFFFF), lo, m16);
        hi = _mm_mask_add_epi8(hi, (__mmask16)(qh >> 16), hi, m16);
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(d, u8_ps(lo)), m));
        _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(d, u8_ps(hi)), m));
    }
}

static void dec_q3_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m128i m3 = _mm_set1_epi8(3), m4 = _mm_set1_epi8(4);
    for (int64_t ib = 0; ib < nb; ib++, b += 110, o += 256) {
        const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
        const float d = h2f_hw(b + 108);
        float dl[16];
        for (int sb = 0; sb < 16; sb++) {
            const int low = sb < 8 ? (sc[sb] & 0x0F) : (sc[sb - 8] >> 4);
            const int high = (sc[8 + (sb & 3)] >> (2 * (sb >> 2))) & 3;
            dl[sb] = d * (float)((low | (high << 4)) - 32);
        }
        const __m128i hm[2] = {ld128(hmask), ld128(hmask + 16)};
        for (int h = 0; h < 2; h++) {
            const __m128i q[2] = {ld128(qs + h * 32), ld128(qs + h * 32 + 16)};
            for (int s = 0; s < 4; s++) {
                const __m128i bit = _mm_set1_epi8((char)(1 << (h * 4 + s)));
                for (int half = 0; half < 2; half++) {
                    const int sb = h * 8 + s * 2 + half;
                    __m128i v = _mm_and_si128(_mm_srli_epi16(q[half], 2 * s), m3);
                    const __mmask16 set = _mm_test_epi8_mask(hm[half], bit);
                    v = _mm_mask_sub_epi8(v, (__mmask16)~set, v, m4);
                    _mm512_storeu_ps(o + sb * 16, _mm512_mul_ps(_mm512_set1_ps(dl[sb]), i8_ps(v)));
                }
            }
        }
    }
}

static void dec_q5_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m128i m16 = _mm_set1_epi8(16);
    for (int64_t ib = 0; ib < nb; ib++, b += 176, o += 256) {
        const float d = h2f_hw(b), dmin = h2f_hw(b + 2);
        const uint8_t *qs = b + 48;
        const __m128i qh[2] = {ld128(b + 16), ld128(b + 32)};
        for (int g = 0; g < 4; g++) {
            for (int t = 0; t < 2; t++) {
                uint8_t sc, mn;
                k_scale_min(b + 4, 2 * g + t, &sc, &mn);
                const __m512 dl = _mm512_set1_ps(d * (float)sc), ml = _mm512_set1_ps(dmin * (float)mn);
                const __m128i bit = _mm_set1_epi8((char)(1 << (2 * g + t)));
                for (int half = 0; half < 2; half++) {
                    const __m128i q = ld128(qs + 32 * g + 16 * half);
                    __m128i v = t ? hi_nib(q) : lo_nib(q);
                    v = _mm_mask_add_epi8(v, _mm_test_epi8_mask(qh[half], bit), v, m16);
                    _mm512_storeu_ps(o + 64 * g + 32 * t + 16 * half,
                                     _mm512_sub_ps(_mm512_mul_ps(dl, u8_ps(v)), ml));
                }
            }
        }
    }
}

static void dec_q6_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(3), m32 = _mm_set1_epi8(32);
    for (int64_t ib = 0; ib < nb; ib++, b += 210, o += 256) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *scales = (const int8_t *)(b + 192);
        const float d = h2f_hw(b + 208);
        for (int h = 0; h < 2; h++)
            for (int half = 0; half < 2; half++) {
                const __m128i hh = ld128(qh + h * 32 + half * 16);
                const __m128i l0 = ld128(ql + h * 64 + half * 16), l1 = ld128(ql + h * 64 + 32 + half * 16);
                /* weights h*128 + s*32 + half*16 + j */
                const __m128i lows[4] = {_mm_and_si128(l0, m4), _mm_and_si128(l1, m4),
                                         _mm_and_si128(_mm_srli_epi16(l0, 4), m4),
                                         _mm_and_si128(_mm_srli_epi16(l1, 4), m4)};
                for (int s = 0; s < 4; s++) {
                    const __m128i high = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(hh, 2 * s), m2), 4);
                    const __m128i q = _mm_sub_epi8(_mm_or_si128(lows[s], high), m32);
                    const int sb = h * 8 + s * 2 + half;
                    const __m512 dl = _mm512_set1_ps(d * (float)scales[sb]);
                    _mm512_storeu_ps(o + sb * 16, _mm512_mul_ps(dl, i8_ps(q)));
                }
            }
    }
}

static void dec_iq4_nl_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 levels = _mm512_loadu_ps(IQ4_LEVELS_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 18, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b));
        const __m128i qs = ld128(b + 2);
        const __m512 lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo_nib(qs)), levels);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi_nib(qs)), levels);
        _mm512_storeu_ps(o, _mm512_mul_ps(d, lo));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(d, hi));
    }
}

static void dec_iq4_xs_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 levels = _mm512_loadu_ps(IQ4_LEVELS_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 136, o += 256) {
        const float d = h2f_hw(b);
        const uint16_t sh = ld16(b + 2);
        const uint8_t *sl = b + 4, *qs = b + 8;
        for (int g = 0; g < 8; g++) {
            const int low = (sl[g >> 1] >> (4 * (g & 1))) & 0x0F, high = (sh >> (2 * g)) & 3;
            const __m512 dl = _mm512_set1_ps(d * (float)((low | (high << 4)) - 32));
            const __m128i q = ld128(qs + 16 * g);
            const __m512 lo = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(lo_nib(q)), levels);
            const __m512 hi = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(hi_nib(q)), levels);
            _mm512_storeu_ps(o + 32 * g, _mm512_mul_ps(dl, lo));
            _mm512_storeu_ps(o + 32 * g + 16, _mm512_mul_ps(dl, hi));
        }
    }
}


/* ---- fused dequantize-dot (AVX-512) ----------------------------------------------------------------------------
 * sum_k w[k] * x[k] for one row without a float32 buffer. The scales leave the inner loop through the 16-entry
 * tables that vpermps reads: once per (sub-)block the table of code values is scaled to the weights themselves
 * (e.g. Q4_K: T[c] = (d * sc) * c - dmin * m, one FMA for 32 weights; the products are exact in float32, so T
 * holds exactly the reference's weights), and every 16 weights then cost one vpermps and one vfmadd231ps with x.
 * Q8_0 (no table) factors d out: d * sum(q * x) per block. Q6_K (64 codes) converts its codes and scales them
 * with one FMA per 16-weight sub-block. Eight float32 accumulators, summed at the end. */

static const float NIB_M16_F[16] = {-16.f, -15.f, -14.f, -13.f, -12.f, -11.f, -10.f, -9.f,
                                    -8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f};
static const float NIB_P16_F[16] = {16.f, 17.f, 18.f, 19.f, 20.f, 21.f, 22.f, 23.f,
                                    24.f, 25.f, 26.f, 27.f, 28.f, 29.f, 30.f, 31.f};
/* Q3_K: index crumb | hbit << 2 (bit 3 ignored) -> crumb - (hbit ? 0 : 4) */
static const float Q3_F[16] = {-4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f};

#define QS_INLINE static inline __attribute__((always_inline))
QS_INLINE __m512i zx16(const uint8_t *p) { return _mm512_cvtepu8_epi32(ld128(p)); }
QS_INLINE __m512 perm(__m512i idx, __m512 t) { return _mm512_permutexvar_ps(idx, t); }
QS_INLINE __m512 fma_x(__m512 w, const float *x, __m512 acc) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
QS_INLINE float hsum8(const __m512 *a) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])),
                                   _mm512_add_ps(_mm512_add_ps(a[4], a[5]), _mm512_add_ps(a[6], a[7])));
    return _mm512_reduce_add_ps(s);
}

/* Software prefetch of the raw blocks PF_<type> bytes ahead, one _mm_prefetch per 64-byte cache line: pf is the next
 * line to fetch, and each step fetches every line up to its own end + the distance (past the row's end too: a GEMV's
 * rows are contiguous, so those are the next rows' lines). Without it a row streamed from DRAM at k = 12288 (x, 48 KB,
 * no longer in L1) ran at half to a third of the k = 3072 speed. Prefetching x as well did not help. -DQS_PF_ALL=n
 * sets every distance (for tuning). */
#ifdef QS_PF_ALL
#define PF(name) QS_PF_ALL
#else
#define PF(name) PF_##name
#endif
#define PF_q4_0 8192
#define PF_q4_1 8192
#define PF_q5_0 8192
#define PF_q5_1 8192
#define PF_q8_0 8192
#define PF_iq4_nl 8192
#define PF_q2_k 6144
#define PF_q3_k 6144
#define PF_q4_k 6144
#define PF_q5_k 6144
#define PF_q6_k 6144
#define PF_iq4_xs 6144
QS_INLINE const uint8_t *pf_start(const uint8_t *b, int dist) {
    return (const uint8_t *)(((uintptr_t)b + (uintptr_t)dist) & ~(uintptr_t)63);
}
QS_INLINE const uint8_t *pf_upto(const uint8_t *pf, const uint8_t *end) {
    while (pf < end) { _mm_prefetch((const char *)pf, _MM_HINT_T0); pf += 64; }
    return pf;
}

/* 32-weight blocks: 2 vectors each, four blocks per step over the eight accumulators */
QS_INLINE void blk_q4_0(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 t = _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b)), _mm512_loadu_ps(NIB_M8_F));
    const __m512i q = zx16(b + 2);
    a[0] = fma_x(perm(q, t), x, a[0]);
    a[1] = fma_x(perm(_mm512_srli_epi32(q, 4), t), x + 16, a[1]);
}
QS_INLINE void blk_q4_1(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(h2f_hw(b)), _mm512_loadu_ps(NIB_F), _mm512_set1_ps(h2f_hw(b + 2)));
    const __m512i q = zx16(b + 4);
    a[0] = fma_x(perm(q, t), x, a[0]);
    a[1] = fma_x(perm(_mm512_srli_epi32(q, 4), t), x + 16, a[1]);
}
QS_INLINE void blk_q5_0(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 d = _mm512_set1_ps(h2f_hw(b));
    const __m512 lo = _mm512_mul_ps(d, _mm512_loadu_ps(NIB_M16_F)), hi = _mm512_mul_ps(d, _mm512_loadu_ps(NIB_F));
    const uint32_t qh = ld32(b + 2);
    const __m512i q = zx16(b + 6), c16 = _mm512_set1_epi32(16);
    __m512i i0 = _mm512_and_si512(q, _mm512_set1_epi32(15)), i1 = _mm512_srli_epi32(q, 4);
    i0 = _mm512_mask_or_epi32(i0, (__mmask16)(qh & 0xFFFF), i0, c16);
    i1 = _mm512_mask_or_epi32(i1, (__mmask16)(qh >> 16), i1, c16);
    a[0] = fma_x(_mm512_permutex2var_ps(lo, i0, hi), x, a[0]);
    a[1] = fma_x(_mm512_permutex2var_ps(lo, i1, hi), x + 16, a[1]);
}
QS_INLINE void blk_q5_1(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 d = _mm512_set1_ps(h2f_hw(b)), m = _mm512_set1_ps(h2f_hw(b + 2));
    const __m512 lo = _mm512_fmadd_ps(d, _mm512_loadu_ps(NIB_F), m), hi = _mm512_fmadd_ps(d, _mm512_loadu_ps(NIB_P16_F), m);
    const uint32_t qh = ld32(b + 4);
    const __m512i q = zx16(b + 8), c16 = _mm512_set1_epi32(16);
    __m512i i0 = _mm512_and_si512(q, _mm512_set1_epi32(15)), i1 = _mm512_srli_epi32(q, 4);
    i0 = _mm512_mask_or_epi32(i0, (__mmask16)(qh & 0xFFFF), i0, c16);
    i1 = _mm512_mask_or_epi32(i1, (__mmask16)(qh >> 16), i1, c16);
    a[0] = fma_x(_mm512_permutex2var_ps(lo, i0, hi), x, a[0]);
    a[1] = fma_x(_mm512_permutex2var_ps(lo, i1, hi), x + 16, a[1]);
}
QS_INLINE void blk_q8_0(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 2)));
    const __m512 c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 18)));
    const __m512 p = fma_x(c1, x + 16, _mm512_mul_ps(c0, _mm512_loadu_ps(x)));
    a[0] = _mm512_fmadd_ps(_mm512_set1_ps(h2f_hw(b)), p, a[0]);
}
QS_INLINE void blk_iq4_nl(const uint8_t *b, const float *x, __m512 *a) {
    const __m512 t = _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b)), _mm512_loadu_ps(IQ4_LEVELS_F));
    const __m512i q = zx16(b + 2);
    a[0] = fma_x(perm(q, t), x, a[0]);
    a[1] = fma_x(perm(_mm512_srli_epi32(q, 4), t), x + 16, a[1]);
}

#define DOT_32(name, bytes, step)                                                                                   \
    static float dot_##name(const uint8_t *restrict b, int64_t nb, const float *restrict x) {                      \
        __m512 a[8];                                                                                                \
        for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();                                                     \
        const uint8_t *pf = pf_start(b, PF(name));                                                                  \
        int64_t ib = 0;                                                                                             \
        for (; ib + 4 <= nb; ib += 4, b += 4 * (bytes), x += 128) {                                                 \
            pf = pf_upto(pf, b + 4 * (bytes) + PF(name));                                                           \
            for (int u = 0; u < 4; u++) blk_##name(b + u * (bytes), x + 32 * u, a + (step) * u);                    \
        }                                                                                                           \
        for (; ib < nb; ib++, b += (bytes), x += 32) blk_##name(b, x, a);                                           \
        return hsum8(a);                                                                                            \
    }
DOT_32(q4_0, 18, 2)
DOT_32(q4_1, 20, 2)
DOT_32(q5_0, 22, 2)
DOT_32(q5_1, 24, 2)
DOT_32(q8_0, 34, 1)
DOT_32(iq4_nl, 18, 2)

/* 256-weight blocks: 16 vectors each, vector v into accumulator v & 7 (inner loops fully unrolled, so the
 * accumulators stay in registers) */
/* Q2_K: the 16 sub-block scales as vectors (lane sb: d * (sc & 15), dmin * (sc >> 4)), expanded into four tables of
 * four sub-blocks each (lane 4i + c: dl_i * c - ml_i); index crumb | i << 2 */
static float dot_q2_k(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 crumbs = _mm512_loadu_ps(CRUMB_F);
    const __m512i c3 = _mm512_set1_epi32(3), c15 = _mm512_set1_epi32(15);
    const __m512i quarter = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
    const uint8_t *pf = pf_start(b, PF(q2_k));
    for (int64_t ib = 0; ib < nb; ib++, b += 84, x += 256) {
        pf = pf_upto(pf, b + 84 + PF(q2_k));
        const uint8_t *qs = b + 16;
        const __m512i sc = zx16(b);
        const __m512 dl = _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b + 80)), _mm512_cvtepi32_ps(_mm512_and_si512(sc, c15)));
        const __m512 ml = _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b + 82)), _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4)));
        __m512 t[4];
        _Pragma("GCC unroll 4")
        for (int z = 0; z < 4; z++) {
            const __m512i e = _mm512_add_epi32(quarter, _mm512_set1_epi32(4 * z));
            t[z] = _mm512_fmsub_ps(perm(e, dl), crumbs, perm(e, ml));
        }
        _Pragma("GCC unroll 2")
        for (int h = 0; h < 2; h++)
            _Pragma("GCC unroll 2")
            for (int half = 0; half < 2; half++) {
                const __m512i q = zx16(qs + h * 32 + half * 16);
                _Pragma("GCC unroll 4")
                for (int s = 0; s < 4; s++) {
                    const int sb = h * 8 + s * 2 + half;
                    /* 0xEA: (a & b) | c */
                    const __m512i i = _mm512_ternarylogic_epi32(_mm512_srli_epi32(q, 2 * s), c3,
                                                                _mm512_set1_epi32(4 * (sb & 3)), 0xEA);
                    a[sb & 7] = fma_x(perm(i, t[sb >> 2]), x + sb * 16, a[sb & 7]);
                }
            }
    }
    return hsum8(a);
}

/* Q3_K: the 16 sub-block scales d * (sc6 - 32) as one vector, expanded into eight tables of two sub-blocks each
 * (lane 8i + c: dl_i * (c - 4)); index crumb | hbit << 2 | i << 3 */
static float dot_q3_k(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 levels = _mm512_loadu_ps(Q3_F);
    const __m512i c3 = _mm512_set1_epi32(3), c4 = _mm512_set1_epi32(4), c15 = _mm512_set1_epi32(15);
    const __m512i eighth = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 3);
    /* lane sb: the low four bits are byte sb & 7 >> (sb < 8 ? 0 : 4), the high two byte 8 + (sb & 3) >> 2 * (sb >> 2) */
    const __m512i low_shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m512i high_shift = _mm512_setr_epi32(0, 8, 16, 24, 2, 10, 18, 26, 4, 12, 20, 28, 6, 14, 22, 30);
    const uint8_t *pf = pf_start(b, PF(q3_k));
    for (int64_t ib = 0; ib < nb; ib++, b += 110, x += 256) {
        pf = pf_upto(pf, b + 110 + PF(q3_k));
        const uint8_t *hmask = b, *qs = b + 32, *sc = b + 96;
        const __m128i s8 = _mm_loadl_epi64((const __m128i *)sc);
        const __m512i low = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi64(s8, s8)), low_shift), c15);
        const __m512i high = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)ld32(sc + 8)), high_shift), c3);
        const __m512i s6 = _mm512_sub_epi32(_mm512_or_si512(low, _mm512_slli_epi32(high, 4)), _mm512_set1_epi32(32));
        const __m512 dl = _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b + 108)), _mm512_cvtepi32_ps(s6));
        __m512 t[8];
        _Pragma("GCC unroll 8")
        for (int z = 0; z < 8; z++)
            t[z] = _mm512_mul_ps(perm(_mm512_add_epi32(eighth, _mm512_set1_epi32(2 * z)), dl), levels);
        const __m128i hm[2] = {ld128(hmask), ld128(hmask + 16)};
        _Pragma("GCC unroll 2")
        for (int h = 0; h < 2; h++)
            _Pragma("GCC unroll 2")
            for (int half = 0; half < 2; half++) {
                const __m512i q = zx16(qs + h * 32 + half * 16);
                _Pragma("GCC unroll 4")
                for (int s = 0; s < 4; s++) {
                    const int sb = h * 8 + s * 2 + half;
                    const __mmask16 set = _mm_test_epi8_mask(hm[half], _mm_set1_epi8((char)(1 << (h * 4 + s))));
                    __m512i i = _mm512_ternarylogic_epi32(_mm512_srli_epi32(q, 2 * s), c3,
                                                          _mm512_set1_epi32(8 * (sb & 1)), 0xEA);
                    i = _mm512_mask_or_epi32(i, set, i, c4);
                    a[sb & 7] = fma_x(perm(i, t[sb >> 1]), x + sb * 16, a[sb & 7]);
                }
            }
    }
    return hsum8(a);
}

static float dot_q4_k(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 nib = _mm512_loadu_ps(NIB_F);
    const uint8_t *pf = pf_start(b, PF(q4_k));
    for (int64_t ib = 0; ib < nb; ib++, b += 144, x += 256) {
        pf = pf_upto(pf, b + 144 + PF(q4_k));
        const float d = h2f_hw(b), dmin = h2f_hw(b + 2);
        const uint8_t *qs = b + 16;
        _Pragma("GCC unroll 16")
        for (int g = 0; g < 4; g++) {
            uint8_t sc0, m0, sc1, m1;
            k_scale_min(b + 4, 2 * g, &sc0, &m0);
            k_scale_min(b + 4, 2 * g + 1, &sc1, &m1);
            const __m512 t0 = _mm512_fmsub_ps(_mm512_set1_ps(d * (float)sc0), nib, _mm512_set1_ps(dmin * (float)m0));
            const __m512 t1 = _mm512_fmsub_ps(_mm512_set1_ps(d * (float)sc1), nib, _mm512_set1_ps(dmin * (float)m1));
            const __m512i q0 = zx16(qs + 32 * g), q1 = zx16(qs + 32 * g + 16);
            const float *xg = x + 64 * g;
            const int o = (g & 1) * 4;
            a[o + 0] = fma_x(perm(q0, t0), xg, a[o + 0]);
            a[o + 1] = fma_x(perm(q1, t0), xg + 16, a[o + 1]);
            a[o + 2] = fma_x(perm(_mm512_srli_epi32(q0, 4), t1), xg + 32, a[o + 2]);
            a[o + 3] = fma_x(perm(_mm512_srli_epi32(q1, 4), t1), xg + 48, a[o + 3]);
        }
    }
    return hsum8(a);
}

static float dot_q5_k(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 nib = _mm512_loadu_ps(NIB_F), nib16 = _mm512_loadu_ps(NIB_P16_F);
    const __m512i c15 = _mm512_set1_epi32(15), c16 = _mm512_set1_epi32(16);
    const uint8_t *pf = pf_start(b, PF(q5_k));
    for (int64_t ib = 0; ib < nb; ib++, b += 176, x += 256) {
        pf = pf_upto(pf, b + 176 + PF(q5_k));
        const float d = h2f_hw(b), dmin = h2f_hw(b + 2);
        const uint8_t *qs = b + 48;
        const __m128i qh[2] = {ld128(b + 16), ld128(b + 32)};
        _Pragma("GCC unroll 16")
        for (int g = 0; g < 4; g++) {
            const __m512i q[2] = {zx16(qs + 32 * g), zx16(qs + 32 * g + 16)};
            _Pragma("GCC unroll 16")
            for (int t = 0; t < 2; t++) {
                uint8_t sc, mn;
                k_scale_min(b + 4, 2 * g + t, &sc, &mn);
                const __m512 dl = _mm512_set1_ps(d * (float)sc), ml = _mm512_set1_ps(dmin * (float)mn);
                const __m512 lo = _mm512_fmsub_ps(dl, nib, ml), hi = _mm512_fmsub_ps(dl, nib16, ml);
                const __m128i bit = _mm_set1_epi8((char)(1 << (2 * g + t)));
                _Pragma("GCC unroll 16")
                for (int half = 0; half < 2; half++) {
                    __m512i i = t ? _mm512_srli_epi32(q[half], 4) : _mm512_and_si512(q[half], c15);
                    i = _mm512_mask_or_epi32(i, _mm_test_epi8_mask(qh[half], bit), i, c16);
                    const int v = 4 * g + 2 * t + half;
                    a[v & 7] = fma_x(_mm512_permutex2var_ps(lo, i, hi), x + 16 * v, a[v & 7]);
                }
            }
        }
    }
    return hsum8(a);
}

static float dot_q6_k(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512i c15 = _mm512_set1_epi32(15), c48 = _mm512_set1_epi32(0x30), c32 = _mm512_set1_epi32(32);
    const uint8_t *pf = pf_start(b, PF(q6_k));
    for (int64_t ib = 0; ib < nb; ib++, b += 210, x += 256) {
        pf = pf_upto(pf, b + 210 + PF(q6_k));
        const uint8_t *ql = b, *qh = b + 128;
        /* the 16 sub-block scales d * sc at once, read back as broadcast memory operands */
        float dls[16] __attribute__((aligned(64)));
        _mm512_store_ps(dls, _mm512_mul_ps(_mm512_set1_ps(h2f_hw(b + 208)),
                                           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 192)))));
        _Pragma("GCC unroll 16")
        for (int h = 0; h < 2; h++)
            _Pragma("GCC unroll 16")
            for (int half = 0; half < 2; half++) {
                const __m512i l0 = zx16(ql + h * 64 + half * 16), l1 = zx16(ql + h * 64 + 32 + half * 16);
                const __m512i hh = zx16(qh + h * 32 + half * 16);
                /* q6 of weights h*128 + s*32 + half*16 + j: low nibble | two high bits << 4 (0xF8: a | (b & c)) */
                const __m512i q[4] = {
                    _mm512_ternarylogic_epi32(_mm512_and_si512(l0, c15), _mm512_slli_epi32(hh, 4), c48, 0xF8),
                    _mm512_ternarylogic_epi32(_mm512_and_si512(l1, c15), _mm512_slli_epi32(hh, 2), c48, 0xF8),
                    _mm512_ternarylogic_epi32(_mm512_srli_epi32(l0, 4), hh, c48, 0xF8),
                    _mm512_ternarylogic_epi32(_mm512_srli_epi32(l1, 4), _mm512_srli_epi32(hh, 2), c48, 0xF8)};
                _Pragma("GCC unroll 16")
                for (int s = 0; s < 4; s++) {
                    const int sb = h * 8 + s * 2 + half;
                    /* (d * sc) * (q - 32): both products exact in float32, as in the reference */
                    const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q[s], c32)),
                                                   _mm512_set1_ps(dls[sb]));
                    a[sb & 7] = fma_x(w, x + sb * 16, a[sb & 7]);
                }
            }
    }
    return hsum8(a);
}

static float dot_iq4_xs(const uint8_t *restrict b, int64_t nb, const float *restrict x) {
    __m512 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
    const __m512 levels = _mm512_loadu_ps(IQ4_LEVELS_F);
    const uint8_t *pf = pf_start(b, PF(iq4_xs));
    for (int64_t ib = 0; ib < nb; ib++, b += 136, x += 256) {
        pf = pf_upto(pf, b + 136 + PF(iq4_xs));
        const float d = h2f_hw(b);
        const uint16_t sh = ld16(b + 2);
        const uint8_t *sl = b + 4, *qs = b + 8;
        _Pragma("GCC unroll 16")
        for (int g = 0; g < 8; g++) {
            const int low = (sl[g >> 1] >> (4 * (g & 1))) & 0x0F, high = (sh >> (2 * g)) & 3;
            const __m512 t = _mm512_mul_ps(_mm512_set1_ps(d * (float)((low | (high << 4)) - 32)), levels);
            const __m512i q = zx16(qs + 16 * g);
            const int o = (g & 3) * 2;
            a[o] = fma_x(perm(q, t), x + 32 * g, a[o]);
            a[o + 1] = fma_x(perm(_mm512_srli_epi32(q, 4), t), x + 32 * g + 16, a[o + 1]);
        }
    }
    return hsum8(a);
}

#define WITH_AVX512(portable, avx512) portable, avx512
#else
#define WITH_AVX512(portable, avx512) portable, portable
#endif

/* ---- dispatch ----------------------------------------------------------------------------------------------- */

typedef void (*decoder)(const uint8_t *restrict, int64_t, float *restrict);

typedef struct { int32_t qtype, block; decoder portable, best; } gguf_type;

#define PORTABLE_ONLY(fn) fn, fn

static const gguf_type *find_type(int32_t qtype);

int qs_gguf_supported(int32_t qtype) { return find_type(qtype) ? 0 : -1; }

static int decode(int32_t qtype, const uint8_t *row, int64_t k, float *out, int portable) {
    const gguf_type *t = find_type(qtype);
    if (!t || k < 0 || k % t->block) return -1;
    (portable ? t->portable : t->best)(row, k / t->block, out);
    return 0;
}

int qs_gguf_decode_row(int32_t qtype, const uint8_t *row, int64_t k, float *out) {
    return decode(qtype, row, k, out, 0);
}

/* The portable decoder, whatever the build vectorizes with (for the tests). */
int qs_gguf_decode_row_portable(int32_t qtype, const uint8_t *row, int64_t k, float *out) {
    return decode(qtype, row, k, out, 1);
}

/* 1 when qs_gguf_decode_row uses the AVX-512 decoders, else 0. */
int qs_gguf_avx512(void) {
#ifdef QS_GGUF_AVX512
    return 1;
#else
    return 0;
#endif
}

static const gguf_type TYPES[] = {
    {GT_F32, 1, PORTABLE_ONLY(dec_f32_c)},
    {GT_F16, 1, WITH_AVX512(dec_f16_c, dec_f16_avx512)},
    {GT_BF16, 1, PORTABLE_ONLY(dec_bf16_c)},
    {GT_Q4_0, 32, WITH_AVX512(dec_q4_0_c, dec_q4_0_avx512)},
    {GT_Q4_1, 32, WITH_AVX512(dec_q4_1_c, dec_q4_1_avx512)},
    {GT_Q5_0, 32, WITH_AVX512(dec_q5_0_c, dec_q5_0_avx512)},
    {GT_Q5_1, 32, WITH_AVX512(dec_q5_1_c, dec_q5_1_avx512)},
    {GT_Q8_0, 32, PORTABLE_ONLY(dec_q8_0_c)},
    {GT_Q2_K, 256, WITH_AVX512(dec_q2_k_c, dec_q2_k_avx512)},
    {GT_Q3_K, 256, WITH_AVX512(dec_q3_k_c, dec_q3_k_avx512)},
    {GT_Q4_K, 256, WITH_AVX512(dec_q4_k_c, dec_q4_k_avx512)},
    {GT_Q5_K, 256, WITH_AVX512(dec_q5_k_c, dec_q5_k_avx512)},
    {GT_Q6_K, 256, WITH_AVX512(dec_q6_k_c, dec_q6_k_avx512)},
    {GT_IQ4_NL, 32, WITH_AVX512(dec_iq4_nl_c, dec_iq4_nl_avx512)},
    {GT_IQ4_XS, 256, WITH_AVX512(dec_iq4_xs_c, dec_iq4_xs_avx512)},
};

static const gguf_type *find_type(int32_t qtype) {
    for (size_t i = 0; i < sizeof(TYPES) / sizeof(TYPES[0]); i++)
        if (TYPES[i].qtype == qtype) return &TYPES[i];
    return NULL;
}

/* ---- fused dot dispatch --------------------------------------------------------------------------------------- */

int qs_gguf_dot_row(int32_t qtype, const uint8_t *row, int64_t k, const float *x, float *out) {
#ifdef QS_GGUF_AVX512
    float (*dot)(const uint8_t *restrict, int64_t, const float *restrict);
    switch (qtype) {
    case GT_Q4_0: dot = dot_q4_0; break;
    case GT_Q4_1: dot = dot_q4_1; break;
    case GT_Q5_0: dot = dot_q5_0; break;
    case GT_Q5_1: dot = dot_q5_1; break;
    case GT_Q8_0: dot = dot_q8_0; break;
    case GT_Q2_K: dot = dot_q2_k; break;
    case GT_Q3_K: dot = dot_q3_k; break;
    case GT_Q4_K: dot = dot_q4_k; break;
    case GT_Q5_K: dot = dot_q5_k; break;
    case GT_Q6_K: dot = dot_q6_k; break;
    case GT_IQ4_NL: dot = dot_iq4_nl; break;
    case GT_IQ4_XS: dot = dot_iq4_xs; break;
    default: return -1;  /* F32, F16, BF16 and unknown types: the caller decodes */
    }
    const gguf_type *t = find_type(qtype);
    if (k < 0 || k % t->block) return -1;
    *out = dot(row, k / t->block, x);
    return 0;
#else
    (void)qtype; (void)row; (void)k; (void)x; (void)out;
    return -1;
#endif
}
