"""The C ABI of the native CPU kernels, written once on the Python side: the enums and `qs_weight` of csrc/qs_cpu.h.

csrc/qs_cpu.h declares the same enums and struct for C; the library reports what its compiler made of them
(csrc/qs_abi.c: enum values, sizeof and offsetof by name) and `mismatches()` compares that with this table
(tests/kernels/test_cpu_abi.py), so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import ctypes
from typing import Any

# qs_weight.fmt: one value per packed format (QS_FMT_* in qs_cpu.h)
FORMATS = {"QS_FMT_BNB4": 1, "QS_FMT_INT8_ROWS": 2, "QS_FMT_FLOAT8": 3, "QS_FMT_INT4_GROUPED": 4, "QS_FMT_QUANTO": 5,
           "QS_FMT_NVFP4": 6, "QS_FMT_GGUF": 7, "QS_FMT_INT4_BLOCKS": 8}
# element dtypes of auxiliary tensors and outputs (QS_F32 ... in qs_cpu.h)
DTYPES = {"QS_F32": 0, "QS_BF16": 1, "QS_F16": 2, "QS_I8": 3, "QS_U8": 4, "QS_I16": 5, "QS_I32": 6}
# qs_gemm's matmul paths (QS_GEMM_* in qs_cpu.h)
GEMM_PATHS = {"QS_GEMM_AUTO": 0, "QS_GEMM_AMX": 1, "QS_GEMM_DPBF16": 2, "QS_GEMM_PORTABLE": 3}
ENUMS = {**FORMATS, **DTYPES, **GEMM_PATHS}

FMT_BNB4, FMT_INT8_ROWS, FMT_FLOAT8, FMT_INT4_GROUPED, FMT_QUANTO, FMT_NVFP4, FMT_GGUF, FMT_INT4_BLOCKS = (
    FORMATS.values())
F32, BF16, F16, I8, U8, I16, I32 = DTYPES.values()
GEMM_AUTO, GEMM_AMX, GEMM_DPBF16, GEMM_PORTABLE = GEMM_PATHS.values()


class QsWeight(ctypes.Structure):
    """`qs_weight` of csrc/qs_cpu.h: where a packed weight's tensors are and how to read them (same fields, same
    order; the comments are the C side's)."""

    _fields_ = [
        ("fmt", ctypes.c_int32), ("kind", ctypes.c_int32),         # FORMATS; float8 e5m2, quanto bits, ggml type
        ("n", ctypes.c_int64), ("k", ctypes.c_int64),
        ("data", ctypes.c_void_p), ("data_stride", ctypes.c_int64),  # the codes; bytes between rows
        ("scale", ctypes.c_void_p), ("scale_dtype", ctypes.c_int32),
        ("scale_stride_n", ctypes.c_int64), ("scale_stride_g", ctypes.c_int64),
        ("zero", ctypes.c_void_p), ("zero_dtype", ctypes.c_int32),  # zero point or quanto shift; NULL: none
        ("group", ctypes.c_int64), ("packed_rows", ctypes.c_int64),
        ("lut", ctypes.c_void_p),                                   # BnB4 quant map (16 floats)
        ("nested_map", ctypes.c_void_p), ("nested_absmax", ctypes.c_void_p), ("nested_blocksize", ctypes.c_int64),
        ("offset", ctypes.c_float), ("divisor", ctypes.c_float), ("global_scale", ctypes.c_float),
        ("round_dtype", ctypes.c_int32),                            # DTYPES: the backend's output rounding
    ]


def c_layout(lib: Any) -> tuple[int, dict[str, tuple[int, int]], dict[str, int]]:
    """What the compiled library says: sizeof(qs_weight), {field: (offset, size)}, {enum constant: value}."""
    name, a, b = ctypes.c_char_p(), ctypes.c_int64(), ctypes.c_int64()
    lib.qs_abi_weight_size.argtypes, lib.qs_abi_weight_size.restype = [], ctypes.c_int64
    out = ctypes.POINTER(ctypes.c_int64)
    lib.qs_abi_field.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_char_p), out, out]
    lib.qs_abi_enum.argtypes = [ctypes.c_int32, ctypes.POINTER(ctypes.c_char_p), out]
    lib.qs_abi_field.restype = lib.qs_abi_enum.restype = ctypes.c_int32
    fields, enums, i = {}, {}, 0
    while lib.qs_abi_field(i, ctypes.byref(name), ctypes.byref(a), ctypes.byref(b)) == 0:
        fields[name.value.decode()] = (a.value, b.value)
        i += 1
    i = 0
    while lib.qs_abi_enum(i, ctypes.byref(name), ctypes.byref(a)) == 0:
        enums[name.value.decode()] = a.value
        i += 1
    return int(lib.qs_abi_weight_size()), fields, enums


def mismatches(lib: Any) -> list[str]:
    """Every difference between this table and the compiled library's ABI (empty: they agree)."""
    size, fields, enums = c_layout(lib)
    problems = []
    if size != ctypes.sizeof(QsWeight):
        problems.append(f"sizeof(qs_weight): C {size}, ctypes {ctypes.sizeof(QsWeight)}")
    ours = {f: (getattr(QsWeight, f).offset, getattr(QsWeight, f).size) for f, _ in QsWeight._fields_}
    for field in sorted(set(ours) | set(fields)):
        if ours.get(field) != fields.get(field):
            problems.append(f"qs_weight.{field} (offset, size): C {fields.get(field)}, ctypes {ours.get(field)}")
    for const in sorted(set(ENUMS) | set(enums)):
        if ENUMS.get(const) != enums.get(const):
            problems.append(f"{const}: C {enums.get(const)}, cpu_abi.py {ENUMS.get(const)}")
    return problems


__all__ = ["DTYPES", "ENUMS", "FORMATS", "GEMM_PATHS", "QsWeight", "c_layout", "mismatches"]
