/* quantserve's native CPU kernels: dequantize every packed format and run a fused dequantize-GEMV.
 *
 * One descriptor (qs_weight) says where a packed weight's tensors are and how to read them; the Python side
 * (kernels/cpu.py) fills it from a kernels/formats.py dataclass without copying any tensor. Every format has a
 * row decoder that writes one row of the (N, K) weight as float32, with exactly the values of the torch reference
 * (kernels/reference.py): the same float32 operations in the same order, then the same rounding to the format's
 * own dtype. The drivers (dequantize rows, GEMV) are shared by all formats and parallel over rows with OpenMP.
 *
 * Built by kernels/cpu_build.py with -O3 -march=native -ffp-contract=off (no fused multiply-add contraction, so
 * results match the reference bit for bit) and loaded through ctypes.
 */
#ifndef QS_CPU_H
#define QS_CPU_H

#include <stdint.h>

/* A function one source file of the library calls in another, which the library does not export (hidden: not in the
 * dynamic symbol table; only the qs_* functions declared below are). */
#define QS_INTERNAL __attribute__((visibility("hidden")))

/* The enums and qs_weight below are mirrored, once, by kernels/cpu_abi.py (ctypes); qs_abi.c reports their values
 * and layout by name and tests/kernels/test_cpu_abi.py holds the two equal. Change both together. */

/* formats (qs_weight.fmt) */
enum {
    QS_FMT_BNB4 = 1,        /* bitsandbytes NF4/FP4: flat codes, high nibble first, absmax per block (maybe nested) */
    QS_FMT_INT8_ROWS = 2,   /* int8 (N, K): w = (q - zero[n]) * (scale[n] / divisor) */
    QS_FMT_FLOAT8 = 3,      /* float8 (N, K): w = float(q) * scale[n or 0]; kind 0 e4m3fn, 1 e5m2 */
    QS_FMT_INT4_GROUPED = 4,/* torchao int4: int8 (N, K/2), low nibble even column; w = q * scale + zero */
    QS_FMT_QUANTO = 5,      /* optimum-quanto int4/int2 packed along the group axis; kind = bits */
    QS_FMT_NVFP4 = 6,       /* e2m1 codes (N, K/2) low nibble even column, e4m3 scale per block, global scale */
    QS_FMT_GGUF = 7,        /* raw ggml blocks (N, row bytes); kind = ggml type id */
    QS_FMT_INT4_BLOCKS = 8  /* ModelOpt INT4: codes (N, K/2) offset by 8, high nibble even column; w = (q-8)/scale */
};

/* element dtypes of auxiliary tensors and of outputs */
enum { QS_F32 = 0, QS_BF16 = 1, QS_F16 = 2, QS_I8 = 3, QS_U8 = 4, QS_I16 = 5, QS_I32 = 6 };

/* qs_gemm's matmul paths (qs_gemm.c): the best available; AMX tiles; AVX512-BF16 dot products; portable float32 */
enum { QS_GEMM_AUTO = 0, QS_GEMM_AMX = 1, QS_GEMM_DPBF16 = 2, QS_GEMM_PORTABLE = 3 };

typedef struct qs_weight {
    int32_t fmt, kind;
    int64_t n, k;
    const uint8_t *data;       /* the codes */
    int64_t data_stride;       /* bytes from one row of `data` to the next (row-major layouts) */
    const void *scale;         /* per row / group / block scale (absmax for BNB4) */
    int32_t scale_dtype;
    int64_t scale_stride_n;    /* elements between rows (n) */
    int64_t scale_stride_g;    /* elements between groups (g) within a row */
    const void *zero;          /* zero point (INT8_ROWS, INT4_GROUPED) or shift (QUANTO); NULL: none */
    int32_t zero_dtype;
    int64_t group;             /* BNB4 blocksize, INT4/QUANTO group size, NVFP4 block size */
    int64_t packed_rows;       /* QUANTO: rows of `data` */
    const float *lut;          /* BNB4: quant_map (16 floats) */
    const float *nested_map;   /* BNB4 double quantization: 256 floats; NULL when not nested */
    const float *nested_absmax;
    int64_t nested_blocksize;
    float offset;              /* BNB4 nested offset */
    float divisor;             /* INT8_ROWS */
    float global_scale;        /* NVFP4 */
    int32_t round_dtype;       /* round every value to this dtype (QS_F32: none), as the backend's output is */
} qs_weight;

/* 0 when the build has this format (and ggml type), else -1. */
int qs_supported(int32_t fmt, int32_t kind);
/* Rows [n0, n1) of the dequantized weight into `out` ((n1 - n0) x k, row-major) in out_dtype (F32, BF16, F16). */
int qs_dequantize(const qs_weight *w, int64_t n0, int64_t n1, void *out, int32_t out_dtype);
/* y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for m < M; x (M, K) and y (M, N) float32 row-major. */
int qs_gemv(const qs_weight *w, const float *x, int64_t m, float *y, const float *bias);
/* (qs_gemm.c) y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M rows (at most 256), each panel of weight rows
 * decoded once and multiplied against every row: x (M, K) row-major in x_dtype (bf16 for the AMX and AVX512-BF16
 * paths; F32, BF16 or F16 for the portable one), y (M, N) in y_dtype, bias float32 or NULL. `path`: QS_GEMM_*. 0, or
 * -1 (a path this process cannot run, an activation dtype the path does not take, a row that does not decode). */
int qs_gemm(const qs_weight *w, const void *x, int32_t x_dtype, int64_t m, void *y, int32_t y_dtype,
            const float *bias, int32_t path);
/* 0 when this build and process can run qs_gemm's `path` (AMX: the CPU has it and the kernel allowed it), else -1 */
int qs_gemm_available(int32_t path);
/* the path QS_GEMM_AUTO takes for activations of x_dtype */
int32_t qs_gemm_best_path(int32_t x_dtype);
/* which decoder qs_gemm's `path` uses for this weight: 0 the generic one (whole rows through qs_decode_row), else a
 * direct bf16 chunk decoder (1 4-bit table, 2 int8 rows, 3 float8, 4 GGUF Q4_0, 5 Q8_0, 6 Q4_K) */
int32_t qs_gemm_decoder(const qs_weight *w, int32_t path);
/* The number of OpenMP threads the kernels use. */
int qs_threads(void);
/* The instruction set the build targets: "avx512" (the AVX-512 intrinsics paths), "avx2" (the portable C,
 * auto-vectorized for AVX2: there is no hand-written AVX2 path) or "scalar" (the portable C for an older target). */
const char *qs_isa(void);

/* The ABI as the compiler sees it (qs_abi.c): sizeof(qs_weight); field i of qs_weight (name, offsetof, sizeof) and
 * enum constant i (name, value), each 0, or -1 past the last. */
int64_t qs_abi_weight_size(void);
int32_t qs_abi_field(int32_t i, const char **name, int64_t *offset, int64_t *size);
int32_t qs_abi_enum(int32_t i, const char **name, int64_t *value);

/* GGUF (qs_gguf_decode.c): decode one row of `k` weights of ggml type `qtype` from its raw blocks; 0, or -1 for a
 * type the build does not know. Exactly the float32 values of kernels/gguf.py (and so of gguf-py). */
int qs_gguf_decode_row(int32_t qtype, const uint8_t *row, int64_t k, float *out);
int qs_gguf_supported(int32_t qtype);
/* (qs_gguf_dot.c) sum_k W[k] * x[k] of one GGUF row into *out, scales factored out of the inner sums; 0, or -1 when
 * this type has no fused form (the caller decodes the row instead). */
int qs_gguf_dot_row(int32_t qtype, const uint8_t *row, int64_t k, const float *x, float *out);

/* Quantizers (qs_quantize.c). int8 per row by absmax, optimum-quanto's arithmetic: scale[n] = dt(max|w| / 127),
 * q = clamp(rint(dt(w / scale)), -128, 127); w and scale in `dtype` (F32, BF16, F16), q int8 (n, k). */
int qs_quantize_int8_absmax(const void *w, int32_t dtype, int64_t n, int64_t k, int8_t *q, void *scale);
/* int8 per row, symmetric from the row's range, torchao's arithmetic: s = max(dt(max(-min(w, 0), max(w, 0)) / 127.5),
 * eps) kept as float32, q = clamp(rint(w * (1 / s)), -128, 127). */
int qs_quantize_int8_symmetric(const void *w, int32_t dtype, int64_t n, int64_t k, float eps, int8_t *q,
                               float *scale);

#endif
