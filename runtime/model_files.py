"""Where a model's files are and how its tensors stream out of them, one at a time, with errors naming file and tensor.

Only safetensors (single or sharded with an index) and GGUF are read: no pickle, ever.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, or disagrees with the model's config; the message names file and tensor."""


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model directory, as a dict; errors name the file."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a diffusers model directory holds config.json beside its weights)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class TensorSource:
    """Tensors by name, read lazily from one or more files. Subclasses: safetensors, GGUF."""

    path: Path

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


class SafetensorsSource(TensorSource):
    """One safetensors file, or a sharded set named by an index file; tensors are read one at a time."""

    def __init__(self, files: dict[str, Path], path: Path):
        from safetensors import safe_open

        self.path = path
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for key_file in sorted(set(files.values())):
            if not key_file.is_file():
                raise CheckpointError(f"{key_file}: missing (named by {path.name})")
            try:
                handle = self._stack.enter_context(safe_open(str(key_file), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                self._stack.close()
                raise CheckpointError(f"{key_file}: not a readable safetensors file: {exc}") from exc
            self._handles[key_file] = handle
        for key, key_file in files.items():
            if key == "*":
                for k in self._handles[key_file].keys():
                    self._where[k] = key_file
            else:
                self._where[key] = key_file

    @classmethod
    def for_directory(cls, folder: Path) -> SafetensorsSource:
        index = folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (needs a weight_map): {exc}") from exc
            return cls({k: folder / v for k, v in weight_map.items()}, index)
        single = folder / SAFE_WEIGHTS
        candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
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
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self._where[key]}: tensor {key!r} cannot be read: {exc}") from exc

    def metadata(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for handle in self._handles.values():
            merged.update(handle.metadata() or {})
        return merged

    def close(self) -> None:
        self._stack.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)
