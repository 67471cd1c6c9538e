"""Packed weight formats: the contract between the backends' tensors and quantserve's kernels.

One frozen dataclass per packed layout, holding plain tensors plus shape metadata; nothing here knows configs,
backends or devices beyond the tensors themselves. Every weight is a (N, K) = (out_features, in_features) matrix
used as `y = x @ W.T`. Each class validates its fields on construction; errors name the field, the value and what
would be accepted.

`dtype` (where present) is the dtype the producing backend's own dequantization returns: the torch reference rounds
to it before casting to the requested dtype, so reference and backend agree bit for bit (None: float32).

| class            | fmt names (QuantizedWeight.fmt)              | convention                                   |
|------------------|----------------------------------------------|----------------------------------------------|
| BnB4bit          | nf4, fp4                                     | bitsandbytes                                 |
| Int8Rows         | int8_rows, torchao:int8_rows, quanto:int8,   | w = (q - zero) * (scale / divisor)           |
|                  | modelopt:int8_axis0                          |                                              |
| Float8           | torchao:float8_*_{rows,tensor}, quanto:float8| w = float(q) * scale, per row or per tensor  |
|                  | modelopt:fp8, modelopt:fp8_axis0             |                                              |
| Int4Grouped      | int4_grouped                                 | torchao Int4Tensor (kernels/int4.py)         |
| QuantoGrouped    | quanto:int4_grouped, quanto:int2_grouped     | optimum-quanto WeightQBitsTensor             |
| NVFP4            | modelopt:nvfp4                               | NVIDIA NVFP4 (e2m1 + e4m3 per 16 + fp32)     |
| Int4Blocks       | modelopt:int4_block*                         | w = (q - 8) / scale per block (ModelOpt INT4)|
| GGUFBlocks       | gguf:Q4_0 ... gguf:Q6_K, IQ4_NL, IQ4_XS, BF16| raw ggml blocks (kernels/gguf.py)            |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

import torch

from .gguf import BLOCK_SIZES as GGUF_BLOCK_SIZES
from .gguf import qtype_name as gguf_qtype_name
from .gguf import row_bytes as gguf_row_bytes
from .int4 import Int4Grouped

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BNB_QUANT_TYPES = ("nf4", "fp4")
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
NATIVE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
# the 16 values of an e2m1 (FP4) code: sign bit 3, exponent bits 1-2, mantissa bit 0 (code 8, "-0", reads as +0.0
# as in modelopt's table)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class FormatError(ValueError):
    """A packed format's field does not fit: the message names the class, the field, the value and what fits."""


def _fail(cls: str, name: str, problem: str) -> FormatError:
    return FormatError(f"{cls}.{name}: {problem}")


def _check_tensor(cls: str, name: str, t: Any, dtypes: tuple[torch.dtype, ...] | None = None,
                  numel: int | None = None, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise _fail(cls, name, f"expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise _fail(cls, name, f"dtype {t.dtype}; accepted: {', '.join(map(str, dtypes))}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise _fail(cls, name, f"shape {tuple(t.shape)}; expected {tuple(shape)}")
    if numel is not None and t.numel() != numel:
        raise _fail(cls, name, f"{t.numel()} elements (shape {tuple(t.shape)}); expected {numel}")


def _check_shape(cls: str, shape: Any) -> tuple[int, int]:
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise _fail(cls, "shape", f"expected (out_features, in_features), got {shape!r}") from None
    if n <= 0 or k <= 0:
        raise _fail(cls, "shape", f"expected positive (out_features, in_features), got {(n, k)}")
    return n, k


def _check_same_device(cls: str, **tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise _fail(cls, "/".join(devices), f"tensors on different devices: {devices}")


def _check_dense_rows(cls: str, name: str, t: torch.Tensor) -> None:
    """Kernels address a 2-D tensor by row stride with unit column stride."""
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise _fail(cls, name, f"expected a 2-D tensor with unit column stride, got shape {tuple(t.shape)} "
                               f"strides {t.stride()}")


def _check_flat(cls: str, name: str, t: torch.Tensor) -> None:
    """Per-row/per-group vectors are read flat: they must be contiguous (any shape, e.g. (N,) or (N, 1))."""
    if not t.is_contiguous():
        raise _fail(cls, name, f"expected a contiguous tensor, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_native(cls: str, dtype: Any) -> None:
    if dtype not in NATIVE_DTYPES:
        raise _fail(cls, "dtype", f"{dtype!r}; accepted: None, torch.float32, torch.bfloat16, torch.float16")


# --- bitsandbytes NF4 / FP4 -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BnB4bit:
    """bitsandbytes 4-bit (NF4/FP4), its own layout.

    The (N, K) weight is flattened row-major; element f = n*K + k sits in byte f // 2 of `data` (high nibble for
    even f, low nibble for odd f) and belongs to absmax block f // blocksize (blocks may span rows; the last may be
    partial). w = quant_map[code] * absmax[block] in float32.

    Double quantization (bitsandbytes' compress_statistics): `absmax` is uint8 codes into `nested_quant_map`
    (256 entries) scaled per `nested_blocksize` codes by `nested_absmax`, plus `offset`:
    absmax[b] = nested_quant_map[absmax_u8[b]] * nested_absmax[b // nested_blocksize] + offset (float32).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    shape: tuple[int, int]
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype | None = None
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: float = 0.0

    def __post_init__(self) -> None:
        c = type(self).__name__
        n, k = _check_shape(c, self.shape)
        object.__setattr__(self, "shape", (n, k))
        if self.quant_type not in BNB_QUANT_TYPES:
            raise _fail(c, "quant_type", f"{self.quant_type!r}; accepted: {', '.join(map(repr, BNB_QUANT_TYPES))}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise _fail(c, "blocksize", f"{self.blocksize}; accepted: {', '.join(map(str, BNB_BLOCKSIZES))}")
        numel = n * k
        _check_tensor(c, "data", self.data, (torch.uint8,), numel=(numel + 1) // 2)
        _check_flat(c, "data", self.data)
        blocks = -(-numel // self.blocksize)
        _check_tensor(c, "quant_map", self.quant_map, (torch.float32,), numel=16)
        _check_native(c, self.dtype)
        if self.nested:
            _check_tensor(c, "absmax", self.absmax, (torch.uint8,), numel=blocks)
            if self.nested_blocksize <= 0:
                raise _fail(c, "nested_blocksize", f"{self.nested_blocksize}; expected a positive block size")
            _check_tensor(c, "nested_absmax", self.nested_absmax, (torch.float32,),
                          numel=-(-blocks // self.nested_blocksize))
            _check_tensor(c, "nested_quant_map", self.nested_quant_map, (torch.float32,), numel=256)
            if not math.isfinite(float(self.offset)):
                raise _fail(c, "offset", f"{self.offset!r}; expected a finite float")
        else:
            _check_tensor(c, "absmax", self.absmax, (torch.float32,), numel=blocks)
            if self.nested_quant_map is not None:
                raise _fail(c, "nested_quant_map", "given without nested_absmax (double quantization needs both)")
        for name in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            if getattr(self, name) is not None:
                _check_flat(c, name, getattr(self, name))
        _check_same_device(c, data=self.data, absmax=self.absmax, quant_map=self.quant_map,
                           nested_absmax=self.nested_absmax, nested_quant_map=self.nested_quant_map)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def fmt(self) -> str:
        return self.quant_type


# --- int8 per row ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int8Rows:
    """int8 codes (N, K) with one scale per row: w = (q - zero_point) * (scale / divisor), in float32.

    bitsandbytes LLM.int8 keeps the row absmax (divisor 127: w = CB * SCB / 127); torchao's Int8Tensor has a scale
    and an int zero point per row; quanto and modelopt a scale per row (no zero point, divisor 1).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    divisor: float = 1.0
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check_tensor(c, "qdata", self.qdata, (torch.int8,))
        _check_dense_rows(c, "qdata", self.qdata)
        n = self.qdata.shape[0]
        _check_tensor(c, "scale", self.scale, (torch.float32, torch.bfloat16, torch.float16), numel=n)
        _check_flat(c, "scale", self.scale)
        if self.zero_point is not None:
            _check_tensor(c, "zero_point", self.zero_point, (torch.int8, torch.uint8, torch.int16, torch.int32),
                          numel=n)
            _check_flat(c, "zero_point", self.zero_point)
        if not (math.isfinite(float(self.divisor)) and float(self.divisor) != 0.0):
            raise _fail(c, "divisor", f"{self.divisor!r}; expected a finite non-zero float (127.0 for LLM.int8)")
        _check_native(c, self.dtype)
        _check_same_device(c, qdata=self.qdata, scale=self.scale, zero_point=self.zero_point)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qdata.shape)

    @property
    def fmt(self) -> str:
        return "int8_rows"


# --- float8 ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Float8:
    """float8 codes (e4m3fn or e5m2) (N, K) with a scale per tensor (1 element) or per row (N elements):
    w = float32(q) * float32(scale)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check_tensor(c, "qdata", self.qdata, FLOAT8_DTYPES)
        _check_dense_rows(c, "qdata", self.qdata)
        n = self.qdata.shape[0]
        _check_tensor(c, "scale", self.scale, (torch.float32, torch.bfloat16, torch.float16))
        if self.scale.numel() not in (1, n):
            raise _fail(c, "scale", f"{self.scale.numel()} elements (shape {tuple(self.scale.shape)}); expected 1 "
                                    f"(per tensor) or {n} (per row)")
        _check_flat(c, "scale", self.scale)
        _check_native(c, self.dtype)
        _check_same_device(c, qdata=self.qdata, scale=self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qdata.shape)

    @property
    def per_row(self) -> bool:
        return self.scale.numel() != 1

    @property
    def e5m2(self) -> bool:
        return self.qdata.dtype == torch.float8_e5m2

    @property
    def fmt(self) -> str:
        kind = "e5m2" if self.e5m2 else "e4m3"
        return f"float8_{kind}_{'rows' if self.scale.numel() != 1 else 'tensor'}"


# --- quanto int4 / int2 grouped -------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantoGrouped:
    """optimum-quanto's int4/int2 weight (WeightQBitsTensor, axis 0), its own layout.

    The (N, K) weight is cut into R = N*K/group_size groups, group r = n*(K/g) + k//g holding columns k % g. Unsigned
    codes (0..2**bits-1) are packed along the group axis (quanto's PackedTensor): with P = ceil(R / (8 // bits))
    packed rows, group r lives in `data` row r % P, in bits [bits*(r // P), bits*(r // P + 1)) of each byte.
    w = round(round(q * scale[r]) - shift[r]), rounded to scale's dtype at each step (as quanto computes it).
    A row that is one group (quanto's group_size None) has group_size == K.
    """

    data: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    shape: tuple[int, int]
    group_size: int
    bits: int = 4

    def __post_init__(self) -> None:
        c = type(self).__name__
        n, k = _check_shape(c, self.shape)
        object.__setattr__(self, "shape", (n, k))
        if self.bits not in (2, 4):
            raise _fail(c, "bits", f"{self.bits}; accepted: 2, 4")
        if self.group_size <= 0 or k % self.group_size:
            raise _fail(c, "group_size", f"{self.group_size} does not divide in_features {k}")
        groups = n * k // self.group_size
        packed_rows = -(-groups // (8 // self.bits))
        _check_tensor(c, "data", self.data, (torch.uint8,), shape=(packed_rows, self.group_size))
        _check_dense_rows(c, "data", self.data)
        for name in ("scale", "shift"):
            _check_tensor(c, name, getattr(self, name), (torch.float32, torch.bfloat16, torch.float16), numel=groups)
            _check_flat(c, name, getattr(self, name))
        if self.shift.dtype != self.scale.dtype:
            raise _fail(c, "shift", f"dtype {self.shift.dtype} differs from scale's {self.scale.dtype}")
        _check_same_device(c, data=self.data, scale=self.scale, shift=self.shift)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def packed_rows(self) -> int:
        return self.data.shape[0]

    @property
    def fmt(self) -> str:
        return f"quanto:int{self.bits}_grouped"


# --- NVFP4 ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NVFP4:
    """NVFP4: e2m1 codes two per byte (N, K/2) (even column in the low nibble), one float8 e4m3 scale per
    `block_size` (16) columns (N, K/16), and a float32 global scale (a multiplier, 1 element):
    w = e2m1(q) * (float32(block_scale) * global_scale), as modelopt's NVFP4QTensor computes it."""

    qdata: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor
    block_size: int = 16

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check_tensor(c, "qdata", self.qdata, (torch.uint8,))
        _check_dense_rows(c, "qdata", self.qdata)
        if self.block_size <= 0 or self.block_size % 2:
            raise _fail(c, "block_size", f"{self.block_size}; expected a positive even block size (16 for NVFP4)")
        n, half_k = self.qdata.shape
        k = 2 * half_k
        if k % self.block_size:
            raise _fail(c, "qdata", f"in_features {k} is not a multiple of block_size {self.block_size}")
        _check_tensor(c, "block_scale", self.block_scale, (torch.float8_e4m3fn,), shape=(n, k // self.block_size))
        _check_dense_rows(c, "block_scale", self.block_scale)
        _check_tensor(c, "global_scale", self.global_scale, (torch.float32,), numel=1)
        _check_same_device(c, qdata=self.qdata, block_scale=self.block_scale, global_scale=self.global_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qdata.shape[0], 2 * self.qdata.shape[1]

    @property
    def fmt(self) -> str:
        return "nvfp4"


# --- int4 blocks (ModelOpt INT4) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Int4Blocks:
    """int4 codes offset by 8 (0..15 for -8..7), two per byte (N, K/2) with the even column in the high nibble, and
    one float32 divisor per block of `block_size` consecutive columns of a row (N * K / block_size, row-major):
    w = float32(q - 8) / scale, as NVIDIA ModelOpt's INT4QTensor dequantizes."""

    qdata: torch.Tensor
    scale: torch.Tensor
    block_size: int = 128

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check_tensor(c, "qdata", self.qdata, (torch.uint8,))
        _check_dense_rows(c, "qdata", self.qdata)
        n, half_k = self.qdata.shape
        k = 2 * half_k
        if self.block_size <= 0 or k % self.block_size:
            raise _fail(c, "block_size", f"{self.block_size} does not divide in_features {k}")
        _check_tensor(c, "scale", self.scale, (torch.float32,), numel=n * k // self.block_size)
        _check_flat(c, "scale", self.scale)
        _check_same_device(c, qdata=self.qdata, scale=self.scale)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qdata.shape[0], 2 * self.qdata.shape[1]

    @property
    def fmt(self) -> str:
        return "int4_blocks"


# --- GGUF -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFBlocks:
    """Raw ggml blocks of one (N, K) weight: `data` uint8 (N, bytes per row), `qtype` a ggml type name."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        c = type(self).__name__
        try:
            name = gguf_qtype_name(self.qtype)
        except TypeError as exc:
            raise _fail(c, "qtype", str(exc)) from None
        if name not in GGUF_BLOCK_SIZES:
            raise _fail(c, "qtype", f"{name!r}; accepted: {', '.join(GGUF_BLOCK_SIZES)}")
        object.__setattr__(self, "qtype", name)
        n, k = _check_shape(c, self.shape)
        object.__setattr__(self, "shape", (n, k))
        try:
            per_row = gguf_row_bytes(name, k)
        except ValueError as exc:
            raise _fail(c, "shape", str(exc)) from None
        _check_tensor(c, "data", self.data, (torch.uint8,), shape=(n, per_row))
        _check_dense_rows(c, "data", self.data)

    @property
    def fmt(self) -> str:
        return f"gguf:{self.qtype}"


PackedWeight = Union[BnB4bit, Int8Rows, Float8, Int4Grouped, QuantoGrouped, NVFP4, Int4Blocks, GGUFBlocks]
FORMAT_CLASSES: tuple[type, ...] = (BnB4bit, Int8Rows, Float8, Int4Grouped, QuantoGrouped, NVFP4, Int4Blocks,
                                    GGUFBlocks)


def is_packed(obj: Any) -> bool:
    return isinstance(obj, FORMAT_CLASSES)


def weight_shape(packed: PackedWeight) -> tuple[int, int]:
    """(N, K) = (out_features, in_features) of any packed format."""
    return tuple(int(s) for s in packed.shape)


def format_name(packed: PackedWeight) -> str:
    return "int4_grouped" if isinstance(packed, Int4Grouped) else packed.fmt


def tensors_of(packed: PackedWeight) -> dict[str, torch.Tensor]:
    """The tensors a packed weight holds, by field name (its bytes are the weight's memory)."""
    return {f: v for f, v in vars(packed).items() if isinstance(v, torch.Tensor)}


def nbytes(packed: PackedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(packed).values())


def device_of(packed: PackedWeight) -> torch.device:
    return next(iter(tensors_of(packed).values())).device


__all__ = [
    "BNB_BLOCKSIZES", "BnB4bit", "E2M1_VALUES", "Float8", "FormatError", "GGUFBlocks", "Int4Blocks", "Int4Grouped",
    "Int8Rows",
    "NVFP4", "PackedWeight", "QuantoGrouped", "device_of", "format_name", "is_packed", "nbytes", "tensors_of",
    "weight_shape",
]
