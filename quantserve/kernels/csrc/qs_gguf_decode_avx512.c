/* GGUF (ggml) block decoders with AVX-512 intrinsics (built where QS_GGUF_AVX512: AVX512F/BW/VL and F16C), one for
 * every type but F32, BF16 and Q8_0, which gcc vectorizes well by itself (qs_gguf_decode.c). Each computes exactly
 * what its portable twin (dec_*_c) computes; the tests hold both against the reference. */
#include "qs_gguf.h"

#ifdef QS_GGUF_AVX512
/* 16 bytes -> 16 floats */
static inline __m512 u8_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
static inline __m512 i8_ps(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }
static inline __m128i lo_nib(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(0x0F)); }
static inline __m128i hi_nib(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F)); }

void dec_f16_avx512(const uint8_t *restrict b, int64_t n, float *restrict o) {
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

void dec_q4_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(NIB_M8_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 18, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b));
        const __m128i qs = ld128(b + 2);
        _mm512_storeu_ps(o, _mm512_mul_ps(d, lut16(qs, t)));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(d, lut16(_mm_srli_epi16(qs, 4), t)));
    }
}

void dec_q4_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
    const __m512 t = _mm512_loadu_ps(NIB_F);
    for (int64_t ib = 0; ib < nb; ib++, b += 20, o += 32) {
        const __m512 d = _mm512_set1_ps(h2f_hw(b)), m = _mm512_set1_ps(h2f_hw(b + 2));
        const __m128i qs = ld128(b + 4);
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(d, lut16(qs, t)), m));
        _mm512_storeu_ps(o + 16, _mm512_add_ps(_mm512_mul_ps(d, lut16(_mm_srli_epi16(qs, 4), t)), m));
    }
}

void dec_q2_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q4_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q5_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q5_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q3_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q5_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_q6_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_iq4_nl_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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

void dec_iq4_xs_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o) {
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
#endif
