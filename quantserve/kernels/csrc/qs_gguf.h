/* GGUF (ggml) kernels, the private pieces their files share: the ggml type ids, the block readers and the AVX-512
 * helpers and tables that both the decoders and the fused dots use. The files:
 *   qs_gguf_decode.c          the portable decoders (dec_*_c), the per-type dispatch table and the exported
 *                             qs_gguf_decode_row / qs_gguf_decode_row_portable / qs_gguf_supported / qs_gguf_avx512;
 *   qs_gguf_decode_avx512.c   the AVX-512 decoders (dec_*_avx512);
 *   qs_gguf_dot.c             the fused dequantize-dot (AVX-512) and qs_gguf_dot_row.
 * Together they build on their own (tests/kernels/test_cpu_gguf.py compiles qs_gguf_*.c alone).
 *
 * The decoders: one row of raw ggml blocks -> float32, bit for bit the values of kernels/gguf.py.
 *
 * Every decoder does the reference's float32 operations in the reference's order (kernels/gguf.py, itself
 * bit-exact against gguf-py): e.g. Q4_K computes (d * sc) * q - (dmin * m) with every product and difference
 * rounded to float32; the build has -ffp-contract=off, so nothing is fused into an FMA. fp16 scale fields are
 * converted exactly (subnormals included).
 *
 * Two implementations of each type:
 *   - the portable one (dec_*_c): plain C, inner loops over fixed 16/32-weight runs that gcc auto-vectorizes;
 *     its fp16 conversion is done in integer arithmetic, so it needs no F16C;
 *   - under __AVX512F__ (with AVX512BW/VL and F16C: QS_GGUF_AVX512), intrinsics (dec_*_avx512, in
 *     qs_gguf_decode_avx512.c) for every type but F32, BF16 and Q8_0, which gcc vectorizes well by itself.
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
#ifndef QS_GGUF_H
#define QS_GGUF_H

#include "qs_cpu.h"

#include <string.h>

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

/* the block size (weights per block) of a type the decoders know, else 0 (qs_gguf_decode.c) */
QS_INTERNAL int64_t qs_gguf_block(int32_t qtype);

#ifdef QS_GGUF_AVX512
static inline float h2f_hw(const uint8_t *p) { return _cvtsh_ss(ld16(p)); }
static inline __m128i ld128(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }
static const float NIB_F[16] = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f};
static const float NIB_M8_F[16] = {-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};
static const float CRUMB_F[16] = {0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f, 0.f, 1.f, 2.f, 3.f};

/* the AVX-512 decoders (qs_gguf_decode_avx512.c): nb blocks from `b` into `o` (F16: n weights) */
QS_INTERNAL void dec_f16_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q4_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q4_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q5_0_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q5_1_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q2_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q3_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q4_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q5_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_q6_k_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_iq4_nl_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
QS_INTERNAL void dec_iq4_xs_avx512(const uint8_t *restrict b, int64_t nb, float *restrict o);
#endif

#endif
