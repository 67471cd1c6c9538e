/* GGUF (ggml) fused dequantize-dot, AVX-512 only: qs_gguf_dot_row (qs_cpu.h) returns -1 in other builds, and the
 * caller decodes the row instead (qs_gguf_decode.c). */
#include "qs_gguf.h"

#ifdef QS_GGUF_AVX512
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

#endif

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
    const int64_t block = qs_gguf_block(qtype);
    if (k < 0 || k % block) return -1;
    *out = dot(row, k / block, x);
    return 0;
#else
    (void)qtype; (void)row; (void)k; (void)x; (void)out;
    return -1;
#endif
}
