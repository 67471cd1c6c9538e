"""load_pipeline: a diffusers pipeline directory in, a real DiffusionPipeline out, every weight component quantized
through quantserve's streaming loader.

model_index.json names each component's library and class. Weight components (diffusers models, and transformers
models such as T5EncoderModel, CLIPTextModel or Gemma2Model) load through `loader._load_one`, each with its own
quantization; tokenizers, schedulers and feature extractors load through their own library from the local directory.
Classes are looked up by name inside diffusers or transformers only: a directory never names code to run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigValueError
from .model_classes import ComponentClass, ModelLibrary
from .model_files import CONFIG_NAME, CheckpointError, read_json_object
from .phases import PhaseTimer, merge_phases
from .pipeline_config import component_specs
from .report import LayerReport, LoadReport

logger = logging.getLogger(__name__)

INDEX_NAME = "model_index.json"
LIBRARIES = ("diffusers", "transformers")


class ComponentError(ValueError):
    """A pipeline component failed to load for a reason its own message does not place: this one names it."""


# --- reading model_index.json ---------------------------------------------------------------------------------

def read_index(folder: Path) -> dict[str, Any]:
    """model_index.json as a dict; errors name the file."""
    return read_json_object(folder / INDEX_NAME, "a diffusers pipeline directory holds model_index.json")


def pipeline_class(index: Mapping[str, Any], where: Path) -> type:
    """The diffusers pipeline class model_index.json names."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise CheckpointError(f"{where / INDEX_NAME}: _class_name {name!r} is not a diffusers pipeline class "
                              "(e.g. FluxPipeline, StableDiffusion3Pipeline, PixArtSigmaPipeline, SanaPipeline)")
    return cls


def component_classes(index: Mapping[str, Any], folder: Path) -> dict[str, ComponentClass | None]:
    """Each component of model_index.json: its library and class (None for an absent optional component)."""
    import importlib

    out: dict[str, ComponentClass | None] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if len(entry) != 2 or entry == [None, None]:
            out[name] = None
            continue
        lib, class_name = entry
        if lib not in LIBRARIES:
            raise CheckpointError(f"{folder / INDEX_NAME}: component {name!r} comes from library {lib!r}; quantserve "
                                  f"loads components of {', '.join(LIBRARIES)} only")
        cls = getattr(importlib.import_module(lib), str(class_name), None)
        if not isinstance(cls, type):
            raise CheckpointError(f"{folder / INDEX_NAME}: component {name!r}: {lib} has no class {class_name!r}")
        out[name] = ComponentClass(lib, str(class_name), cls)
    return out


# --- the report -----------------------------------------------------------------------------------------------

@dataclass
class PipelineReport:
    """One load report for a whole pipeline: per component (its LoadReport) and per layer, totals against bf16."""

    pipeline_class: str
    source: str
    components: dict[str, LoadReport] = field(default_factory=dict)
    seconds: float = 0.0
    # the pipeline's own phases (imports, components); `phases` adds every component's
    own_phases: dict[str, float] = field(default_factory=dict)

    @property
    def phases(self) -> dict[str, float]:
        """Exclusive seconds per load phase over the whole pipeline, summing to about `seconds`."""
        return merge_phases(self.own_phases, *(r.phases for r in self.components.values()))

    @property
    def layers(self) -> list[LayerReport]:
        """Every Linear layer of every weight component, named `component.layer`."""
        return [LayerReport(**{**vars(layer), "name": f"{name}.{layer.name}"})
                for name, report in self.components.items() for layer in report.layers]

    @property
    def quantized_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.backend != "dense"]

    @property
    def model_bytes(self) -> int:
        return sum(r.model_bytes for r in self.components.values())

    @property
    def bf16_bytes(self) -> int:
        return sum(r.bf16_bytes for r in self.components.values())

    @property
    def ratio(self) -> float:
        return self.model_bytes / self.bf16_bytes if self.bf16_bytes else 1.0

    @property
    def pre_quantized(self) -> bool:
        return any(r.pre_quantized for r in self.components.values())

    def denoiser(self) -> LoadReport | None:
        return next((self.components[n] for n in ("transformer", "unet") if n in self.components), None)

    @property
    def backend(self) -> str:
        """The denoiser's backend (what serving labels a variant with); 'none' when it is not quantized."""
        report = self.denoiser()
        return report.backend if report is not None else "none"

    @property
    def scheme(self) -> str:
        """'transformer=nf4, text_encoder_2=int8wo', or 'bf16' when nothing is quantized."""
        parts = [f"{name}={r.scheme}" for name, r in self.components.items() if r.backend != "none"]
        return ", ".join(parts) or "bf16"

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline_class": self.pipeline_class, "source": self.source, "scheme": self.scheme,
                "model_bytes": self.model_bytes, "bf16_bytes": self.bf16_bytes, "ratio": self.ratio,
                "seconds": self.seconds, "phases": self.phases, "components": {n: r.to_dict() for n, r in self.components.items()}}

    def summary(self) -> str:
        """One line per component, then the totals."""
        rows = [f"{'component':<16} {'class':<34} {'scheme':<28} {'quantized':>9} {'MiB':>9} {'bf16 MiB':>9} {'ratio':>6}"]
        for name, r in self.components.items():
            rows.append(f"{name:<16} {r.model_class:<34} {r.scheme[:28]:<28} "
                        f"{len(r.quantized_layers):>4}/{len(r.layers):<4} {r.model_bytes / 2**20:>9.2f} "
                        f"{r.bf16_bytes / 2**20:>9.2f} {r.ratio:>6.3f}")
        rows.append(f"{self.pipeline_class}: {len(self.quantized_layers)}/{len(self.layers)} Linear layers quantized; "
                    f"{self.model_bytes / 2**20:.2f} MiB vs bf16 {self.bf16_bytes / 2**20:.2f} MiB = {self.ratio:.3f}x; "
                    f"loaded in {self.seconds:.2f} s")
        return "\n".join(rows)

    def table(self, limit: int | None = None) -> str:
        """Every component's layer table, then the summary."""
        parts = [f"== {name} ==\n{r.table(limit)}" for name, r in self.components.items()]
        return "\n\n".join([*parts, self.summary()])

    def kernels(self) -> dict[str, int]:
        return dict(Counter(layer.kernel for layer in self.layers))


# --- loading --------------------------------------------------------------------------------------------------

def _weight_libraries(classes: Mapping[str, ComponentClass | None]) -> dict[str, str]:
    return {name: c.library for name, c in classes.items() if c is not None and c.is_model}


def load_pipeline_models(path: str | os.PathLike[str], quantization_config: Any = None, device: str | torch.device = "cpu",
                         torch_dtype: torch.dtype = torch.bfloat16, *, forward_loop: Callable[[nn.Module], None] | None = None,
                         progress: bool = False, kernel_policy: Mapping[str, Any] | None = None,
                         gguf_files: Mapping[str, Path] | None = None) -> dict[str, nn.Module]:
    """Every weight component of a pipeline directory, loaded and quantized, by component name (no tokenizers,
    schedulers or pipeline object: see `load_pipeline`)."""
    from .loader import _load_one

    folder = Path(path)
    classes = component_classes(read_index(folder), folder)
    libraries = _weight_libraries(classes)
    specs = component_specs(quantization_config, libraries, str(folder))
    gguf_files = dict(gguf_files or {})
    device = torch.device(device)
    models: dict[str, nn.Module] = {}
    for name in libraries:
        sub = folder / name
        if not (sub / CONFIG_NAME).is_file():
            raise CheckpointError(f"{sub / CONFIG_NAME}: missing: component {name!r} of {folder / INDEX_NAME} has no "
                                  "config.json")
        try:
            models[name] = _load_one(sub, specs[name], device, torch_dtype, gguf_files.get(name), forward_loop,
                                     progress, kernel_policy)
        except (ValueError, TypeError) as exc:
            if str(sub) in str(exc):  # the message already names the component's files
                raise
            kind = CheckpointError if isinstance(exc, CheckpointError) else ComponentError
            raise kind(f"component {name!r} ({sub}): {exc}") from exc
    return models


def load_pipeline(path: str | os.PathLike[str], quantization_config: Any = None, device: str | torch.device = "cpu",
                  torch_dtype: torch.dtype = torch.bfloat16, *, kernel_policy: Mapping[str, Any] | None = None,
                  progress: bool = False, transformer_gguf: str | os.PathLike[str] | None = None,
                  forward_loop: Callable[[nn.Module], None] | None = None) -> Any:
    """A diffusers pipeline directory as the DiffusionPipeline its model_index.json names, every weight component
    (diffusers and transformers models) loaded through quantserve's streaming loader.

    `quantization_config`: None; a scheme name, config object or config.json block (the denoiser only); a mapping
    component -> any of those (transformers' config objects too, for text encoders); or a PipelineQuantizationConfig
    (quantserve's, diffusers', or its dict form). A component whose config.json holds a quantization_config loads
    pre-quantized. `transformer_gguf`: a .gguf file that replaces the directory's transformer weights.
    The whole report is at `pipe.quantserve_report` (a PipelineReport); each model component carries its own.
    """
    start = time.perf_counter()
    timer = PhaseTimer()
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such pipeline directory")
    with timer.phase("imports"):  # diffusers and transformers import a pipeline's modules on first use
        index = read_index(folder)
        pipe_cls = pipeline_class(index, folder)
        classes = component_classes(index, folder)
    gguf = {}
    if transformer_gguf is not None:
        gguf_path = Path(transformer_gguf)
        if not gguf_path.is_file():
            raise CheckpointError(f"{gguf_path}: no such .gguf file (transformer_gguf)")
        if "transformer" not in classes:
            raise ConfigValueError("load_pipeline", "transformer_gguf", str(gguf_path),
                                   f"a pipeline with a transformer component ({folder} has none)")
        gguf["transformer"] = gguf_path
    models = load_pipeline_models(folder, quantization_config, device, torch_dtype, forward_loop=forward_loop,
                                  progress=progress, kernel_policy=kernel_policy, gguf_files=gguf)
    components: dict[str, Any] = {}
    with timer.phase("components"):
        for name, entry in classes.items():
            if entry is None:
                components[name] = None
            elif name in models:
                components[name] = models[name]
            else:
                components[name] = _load_other(name, entry, folder)
        pipe = _assemble(pipe_cls, components, folder)
    report = PipelineReport(pipe_cls.__name__, str(folder),
                            {name: m.quantserve_report for name, m in models.items()}, own_phases=timer.seconds)
    report.seconds = time.perf_counter() - start
    pipe.quantserve_report = report
    pipe.quantserve_configs = {name: m.quantserve_config for name, m in models.items()}
    return pipe


def _load_other(name: str, entry: ComponentClass, folder: Path) -> Any:
    """A tokenizer, scheduler, feature extractor or image processor, through its own library, from disk only."""
    sub = folder / name
    if not sub.is_dir():
        raise CheckpointError(f"{sub}: missing: component {name!r} ({entry.library}.{entry.class_name}) of "
                              f"{folder / INDEX_NAME} has no directory")
    loader = getattr(entry.cls, "from_pretrained", None)
    if loader is None:
        raise CheckpointError(f"{sub}: component {name!r}: {entry.class_name} cannot be loaded from a directory")
    try:
        return loader(str(sub), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{sub}: component {name!r} ({entry.class_name}) did not load: {exc}") from exc


def _assemble(pipe_cls: type, components: dict[str, Any], folder: Path) -> Any:
    """The pipeline object from its components; a component the class needs and the directory lacks is an error."""
    expected, optional = pipe_cls._get_signature_keys(pipe_cls)  # type: ignore[attr-defined]
    optional_modules = set(getattr(pipe_cls, "_optional_components", []) or [])
    missing = [n for n in expected if n not in components and n not in optional_modules and n not in optional]
    if missing:
        raise CheckpointError(f"{folder / INDEX_NAME}: {pipe_cls.__name__} needs component(s) {', '.join(missing)}, "
                              "which the directory does not list")
    extra = [n for n in components if n not in expected]
    if extra:
        logger.warning("%s: components %s are not arguments of %s; ignored", folder, extra, pipe_cls.__name__)
    kwargs = {n: components.get(n) for n in expected if n in components or n in optional_modules}
    pipe = pipe_cls(**kwargs)
    pipe.register_to_config(_name_or_path=str(folder))
    return pipe


# --- saving ---------------------------------------------------------------------------------------------------

def write_pipeline(pipe: Any, folder: Path) -> None:
    """Every component of a pipeline loaded by `load_pipeline` into an existing `folder`, and its model_index.json.

    Weight components are written pre-quantized (their config.json carries the quantization_config); tokenizers,
    schedulers and processors through their own save_pretrained."""
    from .loader import write_model

    if not hasattr(pipe, "quantserve_report"):
        raise TypeError("save_quantized: expected a model loaded by load_model or a pipeline loaded by load_pipeline, "
                        f"got {type(pipe).__name__}")
    for name in pipe.quantserve_report.components:
        (folder / name).mkdir()
        write_model(getattr(pipe, name), folder / name)
    for name, value in pipe.components.items():
        if value is None or name in pipe.quantserve_report.components:
            continue
        if isinstance(value, nn.Module) and any(isinstance(value, ModelLibrary._registry[lib].base_class()) for lib in LIBRARIES):
            raise TypeError(f"save_quantized: component {name!r} was not loaded by quantserve")
        value.save_pretrained(folder / name)
    pipe.save_config(folder)
