"""GGUF files: `GGUFSource` reads one (memory-mapped, quantized weights stay packed), `write_gguf` writes one.

Tensor names are the diffusers state-dict names; a FLUX file in Black Forest Labs' naming (community files) is
presented under diffusers' names, fused tensors split by rows without dequantizing (`gguf_names`). GGUF stores
dimensions innermost first (ggml's ne[0] is the row length); everything here speaks torch order, so a Linear weight
is (out_features, in_features) on both sides.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..kernels.atomic_write import atomic_file
from ..kernels.gguf import BLOCK_SIZES, dequantize_gguf, qtype_name
from .model_files import CheckpointError, TensorSource

ARCHITECTURE = "quantserve"
_MAGIC = 0x46554747  # "GGUF", little-endian
_TORCH_OF = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
_TYPE_OF = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


def _gguf():
    import gguf

    return gguf


@functools.cache
def _reader_class() -> type:
    """gguf.GGUFReader, checking every tensor's extent against the file size so that a truncated file names the
    first tensor that does not fit (gguf-py would fail with a bare numpy reshape error)."""
    gguf = _gguf()

    class _CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            size = len(self.data)
            for field in fields:
                try:
                    _, name_data, _, dims, raw_dtype, offset = field.parts
                    name = str(bytes(name_data), encoding="utf-8")
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError as exc:
                    raise CheckpointError(f"tensor info: {exc}") from exc
                except Exception:  # gguf-py changed its internals: leave the checks to it
                    break
                bs, ts = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64))) if len(dims) else 1
                if (len(dims) and int(dims[0]) % bs) or n < 0:
                    raise CheckpointError(f"tensor {name!r}: shape {list(reversed(dims.tolist()))} does not hold "
                                          f"whole {qtype.name} blocks of {bs}")
                end = int(start_offs) + int(offset[0]) + n // bs * ts
                if end > size:
                    raise CheckpointError(f"tensor {name!r} ({qtype.name}, {list(reversed(dims.tolist()))}) ends at "
                                          f"byte {end}, past the end of the file ({size} bytes): truncated")
            super()._build_tensors(start_offs, fields)

    return _CheckedReader


def _check_header(path: Path) -> None:
    """Magic and sane counts, before gguf-py walks the header (a damaged count would make it loop for long)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24:
        raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF header: truncated or not a GGUF file")
    magic, version = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:8], "little")
    if magic != _MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (the magic is {head[:4]!r}, a .gguf starts with b'GGUF')")
    if version == 0 or version > 0xFFFF:
        raise CheckpointError(f"{path}: GGUF version {version} looks byte-swapped: big-endian GGUF is not supported")
    n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if n_tensors > size // 24 or n_kv > size // 12:
        raise CheckpointError(f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata entries, more "
                              f"than its {size} bytes can hold: truncated or damaged")


class GGUFSource(TensorSource):
    """The tensors of one .gguf file by their (diffusers state-dict) names; the file is memory-mapped, and
    quantized tensors are handed out as their raw ggml blocks without copying."""

    def __init__(self, path: str | os.PathLike[str], config: Mapping[str, Any] | None = None):
        """`config`: the model's config.json, which a BFL-named FLUX file's block counts are checked against."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such .gguf file")
        _check_header(self.path)
        try:
            # 'c' (copy-on-write): numpy views are writable, so torch.from_numpy shares the mapping without a warning
            self._reader = _reader_class()(self.path, "c")
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from exc
        except Exception as exc:  # gguf-py raises ValueError, IndexError, KeyError ... on damaged headers
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc}): "
                                  "truncated or damaged") from exc
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._views: dict[str, Any] | None = None  # diffusers name -> gguf_names.View, for a BFL-named FLUX file
        from .gguf_names import bfl_flux_views, is_bfl_flux

        arch = self._reader.fields.get("general.architecture")
        try:
            arch = arch.contents() if arch is not None else None
        except Exception:
            arch = None
        if is_bfl_flux(list(self._tensors), arch):
            if config is not None and config.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
                raise CheckpointError(f"{self.path}: a FLUX transformer in BFL naming, but its config.json describes "
                                      f"a {config.get('_class_name')}")
            self._views = bfl_flux_views({n: self._stored_shape(n) for n in self._tensors}, self.path, config)

    # -- TensorSource --
    def keys(self) -> list[str]:
        return list(self._views if self._views is not None else self._tensors)

    def qtype(self, key: str) -> str:
        """The ggml type name of a tensor ("Q4_K", "F32", ...)."""
        return self._tensor(key).tensor_type.name

    def is_quantized(self, key: str) -> bool:
        """True for block-quantized types (everything but F32/F16/BF16/F64 and the integer types)."""
        return self.qtype(key) not in _TORCH_OF

    def shape(self, key: str) -> tuple[int, ...]:
        if self._views is not None:
            return self._view(key).shape
        return self._stored_shape(key)

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._stored(key).shape.tolist()))

    def raw(self, key: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        """A quantized (or BF16) tensor as stored: uint8 blocks shaped (*shape[:-1], bytes per row), the ggml type
        name, and the torch shape. Shares memory with the file mapping (no copy; a split part of a fused BFL tensor
        is a view of its rows, the swapped final modulation a copy)."""
        if self._views is not None:
            return self._raw_view(key)
        return self._raw_stored(key)

    def _raw_stored(self, key: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        t = self._stored(key)
        name, shape = t.tensor_type.name, self._stored_shape(key)
        data = self._as_torch(key, t.data)
        if name in _TORCH_OF and name != "BF16":
            data = data.reshape(-1).view(torch.uint8)
            return data.reshape(*shape[:-1], -1) if shape else data, name, shape
        return data, name, shape

    def get(self, key: str) -> torch.Tensor:
        """The tensor, dense: F32/F16/BF16 and integer types as stored (shared with the mapping), quantized ones
        dequantized to float32 (quantserve's reference for the types it knows, gguf-py's for the others)."""
        if self._views is not None:
            return self._get_view(key)
        return self._get_stored(key)

    def _get_stored(self, key: str) -> torch.Tensor:
        t = self._stored(key)
        name, shape = t.tensor_type.name, self._stored_shape(key)
        data = self._as_torch(key, t.data)
        try:
            if name == "BF16":
                return data.reshape(-1).view(torch.bfloat16).reshape(shape)
            if name in _TORCH_OF:
                return data.reshape(shape)
            if name in BLOCK_SIZES:
                return dequantize_gguf(data, name, shape, torch.float32)
            dense = _gguf().quants.dequantize(np.asarray(t.data), t.tensor_type)
            return torch.from_numpy(np.ascontiguousarray(dense)).reshape(shape)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise CheckpointError(f"{self.path}: tensor {key!r} ({name}, {list(shape)}) cannot be read: {exc}") from exc

    def metadata(self) -> dict[str, str]:
        """The GGUF key-values (not the GGUF.* header pseudo-fields), strings as they are, others as JSON."""
        out: dict[str, str] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                value = field.contents()
            except Exception as exc:
                raise CheckpointError(f"{self.path}: metadata {key!r} cannot be read: {exc}") from exc
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    def close(self) -> None:
        # the mapping closes when the last tensor sharing it (a loaded GGUFWeight, say) is gone
        self._tensors = {}
        self._reader = None

    # -- helpers --
    def _tensor(self, key: str) -> Any:
        """The stored tensor behind a (presented) name."""
        try:
            return self._tensors[self._view(key).source if self._views is not None else key]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}") from None

    def _stored(self, key: str) -> Any:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}") from None

    def _view(self, key: str) -> Any:
        try:
            return self._views[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}") from None

    def _row_parts(self, key: str, data: torch.Tensor, qname: str, stored: tuple[int, ...]) -> list[torch.Tensor]:
        """The view's row ranges of a stored tensor's raw bytes (dimension 0; for a 1-D tensor the ranges must hold
        whole blocks)."""
        view = self._view(key)
        if view.rows is None:
            return [data]
        if len(stored) >= 2:
            return [data[a:b] for a, b in view.rows]
        bs, ts = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType[qname]]
        for a, b in view.rows:
            if a % bs or b % bs:
                raise CheckpointError(f"{self.path}: tensor {view.source!r} ({qname}, {list(stored)}) cannot be split "
                                      f"exactly into {key!r}: rows {a}:{b} cut through its {bs}-element blocks")
        return [data.reshape(-1)[a // bs * ts:b // bs * ts] for a, b in view.rows]

    def _raw_view(self, key: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        view = self._view(key)
        data, qname, stored = self._raw_stored(view.source)
        parts = self._row_parts(key, data, qname, stored)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), qname, view.shape

    def _get_view(self, key: str) -> torch.Tensor:
        view = self._view(key)
        if view.rows is None:
            return self._get_stored(view.source)
        qname = self._tensors[view.source].tensor_type.name
        if qname in BLOCK_SIZES and qname not in _TORCH_OF:  # dequantize only the rows presented
            data, _, stored = self._raw_stored(view.source)
            parts = self._row_parts(key, data, qname, stored)
            raw = parts[0] if len(parts) == 1 else torch.cat(parts)
            try:
                return dequantize_gguf(raw, qname, view.shape, torch.float32)
            except (ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{self.path}: tensor {key!r} (rows of {view.source!r}, {qname}) cannot be "
                                      f"read: {exc}") from exc
        dense = self._get_stored(view.source)
        return torch.cat([dense[a:b] for a, b in view.rows])

    def _as_torch(self, key: str, array: np.ndarray) -> torch.Tensor:
        try:
            return torch.from_numpy(array)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: tensor {key!r} cannot be mapped: {exc}") from exc


# --- writing ---------------------------------------------------------------------------------------------------

TensorSpec = tuple  # (tensor, qtype) or (raw uint8 tensor, qtype, torch shape)


def _to_writer_array(name: str, spec: Any) -> tuple[np.ndarray, Any]:
    """(numpy array, ggml raw dtype or None) for GGUFWriter.add_tensor."""
    gguf = _gguf()
    if not isinstance(spec, tuple) or len(spec) not in (2, 3) or not isinstance(spec[0], torch.Tensor):
        raise TypeError(f"write_gguf: tensor {name!r}: expected (tensor, qtype) or (raw uint8 tensor, qtype, shape), "
                        f"got {type(spec).__name__}")
    tensor, qtype = spec[0].detach().to("cpu"), spec[1]
    qname = _TYPE_OF.get(tensor.dtype) if qtype is None else qtype_name(qtype)
    if qname is None:
        raise ValueError(f"write_gguf: tensor {name!r}: dtype {tensor.dtype} has no GGUF type; pass a qtype")
    if qname not in BLOCK_SIZES and qname not in _TORCH_OF:
        raise ValueError(f"write_gguf: tensor {name!r}: qtype {qname!r} is not supported; accepted: "
                         f"{', '.join([*BLOCK_SIZES, *(t for t in _TORCH_OF if t not in BLOCK_SIZES)])}")
    gtype = gguf.GGMLQuantizationType[qname]
    if qname in _TORCH_OF and qname != "BF16" and tensor.dtype != torch.uint8:
        return tensor.to(_TORCH_OF[qname]).contiguous().numpy(), None  # F32/F16/ints: numpy knows them
    if tensor.dtype == torch.uint8:  # raw ggml bytes
        bs, ts = BLOCK_SIZES[qname] if qname in BLOCK_SIZES else (1, _TORCH_OF[qname].itemsize)
        shape = tuple(int(s) for s in spec[2]) if len(spec) == 3 else (*tensor.shape[:-1], tensor.shape[-1] // ts * bs)
        expected = shape[-1] // bs * ts * int(np.prod(shape[:-1], dtype=np.int64)) if shape and shape[-1] % bs == 0 else -1
        if not shape or tensor.numel() != expected:
            raise ValueError(f"write_gguf: tensor {name!r}: {tensor.numel()} bytes of {qname} do not make shape "
                             f"{list(shape)} ({expected} bytes)")
        raw = tensor.contiguous().reshape(*shape[:-1], shape[-1] // bs * ts)
        return raw.numpy(), gtype
    if qname == "BF16":
        if tensor.dim() == 0:  # ggml cannot express a 0-d BF16 tensor; F32 holds every bf16 value exactly
            return tensor.to(torch.float32).numpy(), None
        return tensor.to(torch.bfloat16).contiguous().view(torch.uint8).numpy(), gtype
    from .gguf_quantize import quantize_gguf

    return quantize_gguf(tensor, qname).numpy(), gtype


def _add_metadata(writer: Any, metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or key.startswith("GGUF."):
            raise ValueError(f"write_gguf: metadata key {key!r} is not allowed (a non-empty string, not GGUF.*)")
        if key == "general.architecture":
            continue  # set from `architecture`
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_int64(key, value)
        elif isinstance(value, float):
            writer.add_float64(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_string(key, json.dumps(value))


def write_gguf(path: str | os.PathLike[str], tensors: Mapping[str, TensorSpec],
               metadata: Mapping[str, Any] | None = None, architecture: str = ARCHITECTURE) -> Path:
    """Write a .gguf atomically (a temporary file beside it, then a rename).

    `tensors`: name -> (tensor, qtype) where the tensor is raw ggml bytes (uint8, shaped (..., bytes per row)) or
    dense (F32/F16/BF16 are stored as such, a quantized qtype quantizes it; qtype None keeps the tensor's dtype),
    or (raw uint8 tensor, qtype, torch shape) for raw bytes of any shape. `metadata`: str/int/float/bool values
    (others stored as JSON strings).
    """
    gguf = _gguf()
    path = Path(path)
    arrays = {name: _to_writer_array(name, spec) for name, spec in tensors.items()}
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        _add_metadata(writer, metadata or {})
        for name, (array, raw_dtype) in arrays.items():
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
