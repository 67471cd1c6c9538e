"""Where a model's files are and how its tensors stream out of them, one at a time, with errors naming file and tensor.

Only safetensors (single or sharded with an index) and GGUF are read: no pickle, ever.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# transformers' names for the same files (text encoders of a pipeline)
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or disagrees with the model's config; the message names file and tensor."""


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from a file; errors name the file (`missing` says what the file is, when it is absent)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({missing})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model directory, as a dict; errors name the file."""
    return read_json_object(folder / CONFIG_NAME, "a diffusers model directory holds config.json beside its weights")


class TensorSource:
    """Tensors by name, read lazily from one or more files. Subclasses: safetensors, GGUF."""

    path: Path
    timer: Any = None  # a runtime.phases.PhaseTimer the loader sets: reads count as its "read" phase

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor as stored (dense)."""
        raise NotImplementedError

    def file_of(self, key: str) -> Path:
        return self.path

    def metadata(self) -> dict[str, str]:
        """Free-form string metadata stored with the weights (safetensors header, GGUF key-values)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache


# safetensors dtype names -> torch dtypes (the format's own table)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
MAX_HEADER_BYTES = 100 * 2**20


# a tensor is memory-mapped in place only when its first byte is this aligned (quantized kernels load weights with
# aligned vector loads: torch's AVX-512 `_weight_int8pack_mm` crashes on unaligned ones); others are read into a
# fresh, aligned buffer. quantserve pads its own checkpoints' headers so their packed tensors are (`save_safetensors_aligned`).
ALIGNMENT = 64
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14: map the pages now, without copying
MMAP_ENV = "QUANTSERVE_SAFETENSORS_MMAP"  # "0": plain reads for every tensor (the escape hatch, and for measuring)


def mmap_enabled() -> bool:
    return os.environ.get(MMAP_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _populate(window: mmap.mmap) -> None:
    """Fault the window's pages in now (from the page cache, or the disk), so the load pays for the bytes, not the
    first forward; MADV_WILLNEED (read-ahead only) where the kernel lacks MADV_POPULATE_READ."""
    try:
        window.madvise(MADV_POPULATE_READ)
    except (OSError, ValueError):
        window.madvise(mmap.MADV_WILLNEED)


class _SafetensorsFile:
    """One .safetensors file; `get` gives one tensor at a time, with no copy of its bytes where it can.

    How a tensor's bytes arrive (measured on the FLUX-shaped pipeline at real width: benchmarks/cold_start.md):

    - memory-mapped (the default, for a tensor whose first byte is `ALIGNMENT`-aligned, or element-aligned when the
      caller says alignment does not matter): each tensor gets its own private, copy-on-write mapping of the pages
      it lies on, faulted in at once (MADV_POPULATE_READ), and the tensor is a view of it. The page cache's pages
      are the tensor's memory: no buffer is allocated and zeroed, no bytes are copied, and replicas of one model on
      a node share one copy of its weights. The mapping lives exactly as long as the tensor (the tensor holds it):
      a tensor the loader converts (another dtype) or moves (to the GPU) unmaps its pages when it is dropped, so a
      tensor still costs memory only while the caller keeps it. What changes is the accounting: a kept tensor's
      pages count as the process's file-backed resident memory (RssFile, shared and clean) instead of anonymous
      memory (RssAnon), and under memory pressure the kernel may drop them and read them again on the next touch
      rather than swap. An in-place write copies only the written page (copy-on-write): the file never changes.
      A checkpoint replaced by `quantserve quantize` (written aside, then renamed) leaves a running replica's
      mapped file intact; truncating a mapped file in place would not.
    - read (`QUANTSERVE_SAFETENSORS_MMAP=0`, or an unaligned tensor): a plain read into a fresh, aligned buffer:
      one copy, anonymous memory, pages that never count as the file's.
    """

    def __init__(self, path: Path, use_mmap: bool | None = None):
        self.path = path
        self.use_mmap = mmap_enabled() if use_mmap is None else use_mmap
        self.handle = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            self._read_header()
        except BaseException:
            self.handle.close()
            raise

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        head = self.handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: not a readable safetensors file: {size} bytes is shorter than its header")
        length = int.from_bytes(head, "little")
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{self.path}: not a readable safetensors file: header length {length} exceeds the file")
        try:
            header = json.loads(self.handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: not a readable safetensors file: header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a readable safetensors file: header is not a JSON object")
        self.meta = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self.base = 8 + length
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{self.path}: tensor {name!r} has a damaged header entry: {info!r}") from exc
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: {end - begin} bytes stored for shape {shape} "
                                      f"of {info['dtype']}")
            if self.base + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} lies past the end of the file "
                                      f"({self.base + end} > {size} bytes): the file is truncated")
            self.entries[name] = (dtype, shape, begin, end)

    def get(self, name: str, align: int = ALIGNMENT) -> torch.Tensor:
        """Tensor `name`, memory-mapped when its offset is `align`-aligned (and element-aligned), else read."""
        dtype, shape, begin, end = self.entries[name]
        start, size = self.base + begin, end - begin
        if self.use_mmap and size > 0 and start % max(align, dtype.itemsize) == 0:
            page = start - start % mmap.ALLOCATIONGRANULARITY
            window = mmap.mmap(self.handle.fileno(), start - page + size, access=mmap.ACCESS_COPY, offset=page)
            _populate(window)
            buffer = torch.frombuffer(window, dtype=torch.uint8, count=size, offset=start - page)  # holds `window`
            return buffer.view(dtype).reshape(shape)
        buffer = torch.empty(size, dtype=torch.uint8)
        self.handle.seek(start)
        if size > 0 and self.handle.readinto(buffer.numpy()) != size:
            raise CheckpointError(f"{self.path}: tensor {name!r}: the file ended before its data")
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        self.handle.close()


class SafetensorsSource(TensorSource):
    """One safetensors file, or a sharded set named by an index file; tensors are read one at a time."""

    def __init__(self, files: dict[str, Path], path: Path):
        self.path = path
        self._files: dict[Path, _SafetensorsFile] = {}
        self._where: dict[str, Path] = {}
        try:
            for key_file in sorted(set(files.values())):
                if not key_file.is_file():
                    raise CheckpointError(f"{key_file}: missing (named by {path.name})")
                self._files[key_file] = _SafetensorsFile(key_file)
        except BaseException:
            self.close()
            raise
        for key, key_file in files.items():
            if key == "*":
                self._where.update((k, key_file) for k in self._files[key_file].entries)
            else:
                if key not in self._files[key_file].entries:
                    self.close()
                    raise CheckpointError(f"{key_file}: has no tensor {key!r}, which {path.name} places there")
                self._where[key] = key_file

    @classmethod
    def for_directory(cls, folder: Path) -> SafetensorsSource:
        index = next((folder / name for name in (SAFE_INDEX, TRANSFORMERS_INDEX) if (folder / name).is_file()), None)
        if index is not None:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (needs a weight_map): {exc}") from exc
            return cls({k: folder / v for k, v in weight_map.items()}, index)
        singles = [folder / name for name in (SAFE_WEIGHTS, TRANSFORMERS_WEIGHTS) if (folder / name).is_file()]
        candidates = singles[:1] if singles else sorted(folder.glob("*.safetensors"))
        if len(candidates) == 1:
            return cls({"*": candidates[0]}, candidates[0])
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{folder}: holds only pickled weights ({', '.join(pickles)}); quantserve reads "
                                  "safetensors and GGUF only (convert with safetensors.torch.save_file)")
        if not candidates:
            raise CheckpointError(f"{folder}: no {SAFE_WEIGHTS} (or other .safetensors file) beside config.json")
        raise CheckpointError(f"{folder}: several .safetensors files and no {SAFE_INDEX} to say which holds what")

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[self._where[key]].entries[key][1]

    def get(self, key: str, align: int = ALIGNMENT) -> torch.Tensor:
        """Tensor `key` as stored; memory-mapped (no copy) when its offset is `align`-aligned (see _SafetensorsFile):
        pass 1 for a tensor no quantized kernel reads."""
        if key not in self._where:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}")
        from .phases import timed

        with timed(self.timer, "read"):
            return self._files[self._where[key]].get(key, align)

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for handle in self._files.values():
            merged.update(handle.meta)
        return merged

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)


# safetensors' Dtype enum, in its declaration order (its writer sorts tensors by it, descending)
_SAFETENSORS_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                            "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
PAD_KEY = "quantserve.pad"  # spaces in the header's metadata that make the data start ALIGNMENT-aligned


def _header_length(path: Path) -> int:
    """The length of a safetensors header's JSON without the spaces the writer padded it with."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return len(handle.read(length).rstrip(b" "))


def _predicted_header_length(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The JSON length safetensors' writer gives this header (its order: by its dtype enum, last first, then name)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    rank = {name: i for i, name in enumerate(_SAFETENSORS_DTYPE_ORDER)}
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in sorted(tensors, key=lambda k: (-rank.get(names.get(tensors[k].dtype, ""), -1), k)):
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names.get(t.dtype, "?"), "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    return len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())


def save_safetensors_aligned(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the header padded (a metadata entry of spaces) so the data starts
    `ALIGNMENT`-aligned: the packed tensors of a quantized layer (sizes that are multiples of 64 bytes) then all start
    aligned and `_SafetensorsFile` maps them with no copy. Any safetensors reader loads the file. The padding is
    predicted from the header's JSON; when the prediction misses (a reader-invisible detail of the writer's order),
    the file is written once more with the measured padding."""
    from safetensors.torch import save_file

    def padded(length_without_pad: int) -> dict[str, str]:
        base = {**metadata, PAD_KEY: ""}
        return {**base, PAD_KEY: " " * ((ALIGNMENT - 8 - length_without_pad) % ALIGNMENT)}

    guess = padded(_predicted_header_length(tensors, {**metadata, PAD_KEY: ""}))
    save_file(tensors, str(path), metadata=guess)
    if (8 + _header_length(path)) % ALIGNMENT:
        save_file(tensors, str(path), metadata=padded(_header_length(path) - len(guess[PAD_KEY])))
