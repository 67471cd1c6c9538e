"""Which library a model directory belongs to, and what loading needs from that library.

A weight component of a pipeline is a diffusers model (config.json with `_class_name`) or a transformers model
(config.json with `architectures`: T5EncoderModel, CLIPTextModel, Gemma2Model, ...). Both load through the same
streaming loader; this module holds the few places where the libraries differ: finding the class (only by name,
inside the library, never code named by a file), building the empty skeleton, tied weights, and what a saved
directory is called. One `ModelLibrary` per library, looked up by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .model_files import CONFIG_NAME, CheckpointError


class ModelLibrary:
    """How one library's models are found, built empty, tied and saved."""

    name: ClassVar[str]
    weights_name: ClassVar[str]
    examples: ClassVar[str]
    _registry: ClassVar[dict[str, ModelLibrary]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ModelLibrary._registry[cls.name] = cls()

    def base_class(self) -> type:
        raise NotImplementedError

    def module(self) -> Any:
        raise NotImplementedError

    def model_class(self, class_name: Any, where: Path) -> type[nn.Module]:
        """The model class called `class_name` in this library; a CheckpointError names the file otherwise."""
        cls = getattr(self.module(), class_name, None) if isinstance(class_name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, self.base_class())):
            raise CheckpointError(f"{where}: {class_name!r} is not a {self.name} model class (e.g. {self.examples})")
        return cls

    def skeleton(self, cls: type[nn.Module], config: Mapping[str, Any]) -> nn.Module:
        """The model with every parameter on the meta device (buffers it computes itself are real)."""
        from accelerate import init_empty_weights

        clean = {k: v for k, v in config.items() if k != "quantization_config"}
        with init_empty_weights(include_buffers=False):
            return self.build(cls, clean)

    def build(self, cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
        """The model from its config.json (no quantization_config), the way this library builds one."""
        raise NotImplementedError

    def tied_targets(self, model: nn.Module) -> dict[str, str]:
        """Parameter name -> the name it is tied to (the checkpoint stores only the latter)."""
        return {}

    def dense_patterns(self, model: nn.Module) -> list[str]:
        """Module patterns the model class keeps out of quantization (`_keep_in_fp32_modules` and the like)."""
        return list(getattr(model, "_keep_in_fp32_modules", None) or [])

    def fp32_patterns(self, model: nn.Module, dtype: torch.dtype) -> list[str]:
        """Module patterns whose dense weights are stored in float32 when the model loads in `dtype`."""
        return self.dense_patterns(model)

    def tie(self, model: nn.Module) -> None:
        """Restore the ties `tied_targets` names, once the sources are loaded."""

    def write_config(self, model: nn.Module, folder: Path, quantization_config: dict[str, Any] | None) -> None:
        """config.json of `model` in `folder`, with `quantization_config` when given."""
        raise NotImplementedError

    @staticmethod
    def _add_quantization(folder: Path, quantization_config: dict[str, Any] | None) -> None:
        path = folder / CONFIG_NAME
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("quantization_config", None)
        if quantization_config is not None:
            data["quantization_config"] = quantization_config
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class DiffusersModels(ModelLibrary):
    name = "diffusers"
    weights_name = "diffusion_pytorch_model.safetensors"
    examples = "FluxTransformer2DModel, SD3Transformer2DModel, AutoencoderKL"

    def module(self) -> Any:
        import diffusers

        return diffusers

    def base_class(self) -> type:
        import diffusers

        return diffusers.ModelMixin

    def build(self, cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
        return cls.from_config(config)  # type: ignore[attr-defined]

    def write_config(self, model: nn.Module, folder: Path, quantization_config: dict[str, Any] | None) -> None:
        model.save_config(folder)  # type: ignore[attr-defined]
        self._add_quantization(folder, quantization_config)


class TransformersModels(ModelLibrary):
    name = "transformers"
    weights_name = "model.safetensors"
    examples = "T5EncoderModel, CLIPTextModel, CLIPTextModelWithProjection, Gemma2Model"

    def module(self) -> Any:
        import transformers

        return transformers

    def base_class(self) -> type:
        from transformers import PreTrainedModel

        return PreTrainedModel

    def build(self, cls: type[nn.Module], config: dict[str, Any]) -> nn.Module:
        return cls._from_config(cls.config_class.from_dict(config))  # type: ignore[attr-defined]

    def tied_targets(self, model: nn.Module) -> dict[str, str]:
        keys = getattr(model, "_tied_weights_keys", None)
        if isinstance(keys, Mapping):  # transformers >= 5: {target: source}
            return {str(k): str(v) for k, v in keys.items()}
        return {}

    def tie(self, model: nn.Module) -> None:
        model.tie_weights()  # type: ignore[operator]

    def dense_patterns(self, model: nn.Module) -> list[str]:
        return [*super().dense_patterns(model), *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]

    def fp32_patterns(self, model: nn.Module, dtype: torch.dtype) -> list[str]:
        """As transformers loads them: `_keep_in_fp32_modules` in float16 only (T5's `wo` overflows there; bfloat16
        has float32's range), `_keep_in_fp32_modules_strict` in float16 and bfloat16."""
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
        strict = getattr(model, "_keep_in_fp32_modules_strict", None) or []
        return keep + (list(strict) if dtype in (torch.float16, torch.bfloat16) else [])

    def write_config(self, model: nn.Module, folder: Path, quantization_config: dict[str, Any] | None) -> None:
        model.config.save_pretrained(folder)  # type: ignore[union-attr]
        self._add_quantization(folder, quantization_config)


def library(name: str) -> ModelLibrary:
    """The library called `name` ('diffusers' or 'transformers')."""
    try:
        return ModelLibrary._registry[name]
    except KeyError:
        raise CheckpointError(f"library {name!r}: quantserve loads models of {', '.join(ModelLibrary._registry)}") from None


def library_of_config(config: Mapping[str, Any], where: Path) -> tuple[ModelLibrary, str]:
    """The library and class name a model's config.json names: diffusers' `_class_name`, transformers' `architectures`."""
    if isinstance(config.get("_class_name"), str):
        return library("diffusers"), config["_class_name"]
    architectures = config.get("architectures")
    if isinstance(architectures, list) and len(architectures) == 1 and isinstance(architectures[0], str):
        return library("transformers"), architectures[0]
    raise CheckpointError(f"{where}: names no model class (a diffusers config.json has `_class_name`, a transformers one "
                          "a single-entry `architectures` list)")


def library_of_model(model: nn.Module) -> ModelLibrary:
    """The library a loaded model belongs to."""
    for lib in ModelLibrary._registry.values():
        try:
            if isinstance(model, lib.base_class()):
                return lib
        except ImportError:
            continue
    raise TypeError(f"{type(model).__name__} is neither a diffusers nor a transformers model")


@dataclass(frozen=True)
class ComponentClass:
    """A pipeline component's entry in model_index.json: library and class, resolved inside that library."""

    library: str
    class_name: str
    cls: type

    @property
    def is_model(self) -> bool:
        """A weight component: a diffusers or transformers model (not a tokenizer, scheduler or processor)."""
        return self.library in ModelLibrary._registry and issubclass(self.cls, library(self.library).base_class())
