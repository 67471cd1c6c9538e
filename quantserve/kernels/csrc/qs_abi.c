/* The C side of the ABI shared with kernels/cpu_abi.py: the values of the enums of qs_cpu.h and the layout of
 * qs_weight (sizeof, and offsetof/sizeof of each field), by name, so a test holds the ctypes mirror equal to them. */
#include <stddef.h>

#include "qs_cpu.h"

typedef struct { const char *name; int64_t offset, size; } qs_abi_field_t;
typedef struct { const char *name; int64_t value; } qs_abi_enum_t;

#define QS_FIELD(f) {#f, (int64_t)offsetof(qs_weight, f), (int64_t)sizeof(((qs_weight *)0)->f)}
static const qs_abi_field_t QS_WEIGHT_FIELDS[] = {
    QS_FIELD(fmt), QS_FIELD(kind), QS_FIELD(n), QS_FIELD(k), QS_FIELD(data), QS_FIELD(data_stride),
    QS_FIELD(scale), QS_FIELD(scale_dtype), QS_FIELD(scale_stride_n), QS_FIELD(scale_stride_g), QS_FIELD(zero),
    QS_FIELD(zero_dtype), QS_FIELD(group), QS_FIELD(packed_rows), QS_FIELD(lut), QS_FIELD(nested_map),
    QS_FIELD(nested_absmax), QS_FIELD(nested_blocksize), QS_FIELD(offset), QS_FIELD(divisor), QS_FIELD(global_scale),
    QS_FIELD(round_dtype),
};

#define QS_ENUM(e) {#e, (int64_t)(e)}
static const qs_abi_enum_t QS_ENUMS[] = {
    QS_ENUM(QS_FMT_BNB4), QS_ENUM(QS_FMT_INT8_ROWS), QS_ENUM(QS_FMT_FLOAT8), QS_ENUM(QS_FMT_INT4_GROUPED),
    QS_ENUM(QS_FMT_QUANTO), QS_ENUM(QS_FMT_NVFP4), QS_ENUM(QS_FMT_GGUF), QS_ENUM(QS_FMT_INT4_BLOCKS),
    QS_ENUM(QS_F32), QS_ENUM(QS_BF16), QS_ENUM(QS_F16), QS_ENUM(QS_I8), QS_ENUM(QS_U8), QS_ENUM(QS_I16),
    QS_ENUM(QS_I32), QS_ENUM(QS_GEMM_AUTO), QS_ENUM(QS_GEMM_AMX), QS_ENUM(QS_GEMM_DPBF16), QS_ENUM(QS_GEMM_PORTABLE),
};

int64_t qs_abi_weight_size(void) { return (int64_t)sizeof(qs_weight); }

int32_t qs_abi_field(int32_t i, const char **name, int64_t *offset, int64_t *size) {
    if (i < 0 || i >= (int32_t)(sizeof QS_WEIGHT_FIELDS / sizeof QS_WEIGHT_FIELDS[0])) return -1;
    *name = QS_WEIGHT_FIELDS[i].name;
    *offset = QS_WEIGHT_FIELDS[i].offset;
    *size = QS_WEIGHT_FIELDS[i].size;
    return 0;
}

int32_t qs_abi_enum(int32_t i, const char **name, int64_t *value) {
    if (i < 0 || i >= (int32_t)(sizeof QS_ENUMS / sizeof QS_ENUMS[0])) return -1;
    *name = QS_ENUMS[i].name;
    *value = QS_ENUMS[i].value;
    return 0;
}
