/* GGUF (ggml) block decoders, the portable ones (dec_*_c), and the dispatch that picks a type's decoder: the best the
 * build has (qs_gguf_decode_row) or always the portable one (qs_gguf_decode_row_portable). The AVX-512 decoders are
 * qs_gguf_decode_avx512.c, the fused dots qs_gguf_dot.c; the block layouts and the arithmetic: qs_gguf.h.
 */
#include "qs_gguf.h"

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

#ifdef QS_GGUF_AVX512
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

int64_t qs_gguf_block(int32_t qtype) {
    const gguf_type *t = find_type(qtype);
    return t ? t->block : 0;
}
