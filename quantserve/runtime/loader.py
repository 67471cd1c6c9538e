"""load_model and save_quantized: a diffusers model directory (or .gguf, or pipeline) in, a quantized model out.

The model is built on the meta device, each Linear layer is planned (keep dense, or quantize with the backend),
then weights stream from the checkpoint one tensor at a time: peak memory stays near the quantized model plus one
dense layer. A pre-quantized checkpoint (its config.json carries a quantization_config) quantizes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels.atomic_write import atomic_directory
from .backends.base import Backend, backend_for
from .config import GGUFQuantizationConfig, QuantizationConfigMixin, quantization_config_from_dict
from .errors import ConfigTypeError, ConfigValueError
from .memory import release_freed_memory
from .model_classes import library_of_config, library_of_model
from .model_files import CONFIG_NAME, CheckpointError, SafetensorsSource, TensorSource, read_config
from .phases import PhaseTimer, timed
from .quant_linear import QuantLinear
from .report import LoadReport, measure
from .schemes import SCHEMES, get_scheme

logger = logging.getLogger(__name__)

LAYERS_METADATA_KEY = "quantserve.layers"


# --- choosing the model class and the config ------------------------------------------------------------------

def resolve_with_options(spec: Any) -> tuple[QuantizationConfigMixin | None, dict[str, Any], str]:
    """A config, the scheme's backend options (gguf_type), and a label, from None/scheme name/config/dict."""
    if spec is None:
        return None, {}, "bf16"
    if isinstance(spec, str):
        scheme = get_scheme(spec)
        options = {"gguf_type": scheme.gguf_type} if scheme.gguf_type else {}
        return scheme.config(), options, spec
    if isinstance(spec, QuantizationConfigMixin):
        return spec, {}, spec.summary()
    if isinstance(spec, Mapping):
        config = quantization_config_from_dict(spec)
        return config, {}, config.summary()
    raise ConfigTypeError("load_model", "quantization_config", spec,
                          "None, a scheme name (" + ", ".join(SCHEMES) + "), a config object or a dict")


def _choose_config(block: Any, spec: Any, config_path: Path) -> tuple[QuantizationConfigMixin | None, dict[str, Any], str, bool]:
    """The checkpoint's config when it has one (pre-quantized), else the argument's (quantize on load)."""
    from .pipeline_config import from_transformers_form

    try:
        stored = quantization_config_from_dict(from_transformers_form(block)) if block is not None else None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: quantization_config: {exc}") from exc
    wanted, options, label = resolve_with_options(spec)
    if stored is not None:
        if wanted is not None and wanted != stored:
            logger.warning("%s holds a model already quantized with %s; the requested %s is ignored (the "
                           "checkpoint's config wins)", config_path, stored.summary(), label)
        return stored, {}, stored.summary(), True
    return wanted, options, label, False


# --- building and planning ------------------------------------------------------------------------------------

def _matches(name: str, patterns: list[str]) -> str | None:
    """The first pattern naming this module or one of its parents, as diffusers matches skip lists:
    "proj_out" matches "proj_out" and "blocks.0.proj_out.net", not "proj_out_1"."""
    return next((p for p in patterns if p and (name == p or f"{p}." in f"{name}.")), None)


def plan_layers(model: nn.Module, backend: Backend | None,
                keep_dense: list[str] | None = None) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """Which Linear layers to quantize, and for every other one why it stays dense (`keep_dense`: the model class's
    own patterns, `_keep_in_fp32_modules` by default)."""
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or []) if keep_dense is None else keep_dense
    skip = backend.skip_patterns() if backend else []
    planned: dict[str, nn.Linear] = {}
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if backend is None:
            reasons[name] = "no quantization"
        elif hit := _matches(name, keep_fp32):
            reasons[name] = f"kept dense (the model class keeps it out of quantization: _keep_in_fp32_modules: {hit})"
        elif hit := _matches(name, skip):
            reasons[name] = f"skipped ({hit!r} in modules_to_not_convert)"
        else:
            ok, why = backend.create(name, module)
            if ok:
                planned[name] = module
            else:
                reasons[name] = why
    return planned, reasons


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


# --- streaming tensors in -------------------------------------------------------------------------------------

class _Loader:
    """One load: tensors stream from `source` into `model`; errors name the file and the tensor. It is the
    `LayerReader` each quantized layer's `Backend.load` reads through."""

    def __init__(self, model: nn.Module, source: TensorSource, device: torch.device, dtype: torch.dtype,
                 config_path: Path, tied: Mapping[str, str] | None = None, keep_fp32: list[str] | None = None,
                 timer: PhaseTimer | None = None):
        self.model, self.source, self.device, self.dtype = model, source, device, dtype
        self.timer = timer
        self.config_path = config_path
        self.used: set[str] = set()
        self.keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or []) if keep_fp32 is None else keep_fp32
        self.tied = dict(tied or {})  # parameter -> the one it is tied to; the checkpoint may hold only the latter
        self.to_tie: list[str] = []  # tied parameters the checkpoint left out: restored from their source

    def tensor(self, key: str, shape: tuple[int, ...] | None, dense: bool = False) -> torch.Tensor:
        """Tensor `key` as stored. `dense`: only torch's own ops read it (a dense parameter or buffer), so a
        safetensors source maps it in place at any element-aligned offset; quantized kernels' tensors map only when
        `ALIGNMENT`-aligned and are read into an aligned buffer otherwise."""
        if key not in self.source:
            raise CheckpointError(f"{self.source.path}: has no tensor {key!r}, which the model "
                                  f"({self.config_path}) needs")
        with timed(self.timer, "read"):
            tensor = self.source.get(key, 1) if dense and isinstance(self.source, SafetensorsSource) else self.source.get(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{self.source.file_of(key)}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"but {self.config_path} describes a model that needs {tuple(shape)}")
        self.used.add(key)
        return tensor

    def dense_dtype(self, name: str, tensor: torch.Tensor) -> torch.dtype:
        if not tensor.is_floating_point():
            return tensor.dtype
        return torch.float32 if _matches(name, self.keep_fp32) else self.dtype

    # the LayerReader `Backend.load` reads a layer through (`tensor` above, `source`, `device`)
    def mark_used(self, keys: Iterable[str]) -> None:
        self.used.update(keys)

    def checkpoint_shape_error(self, name: str, stored: tuple[int, ...], needed: tuple[int, ...]) -> CheckpointError:
        return CheckpointError(f"{self.source.path}: tensor {name + '.weight'!r} has shape {stored}, but "
                               f"{self.config_path} describes a model that needs {needed}")

    def packed_shape_error(self, name: str, stored: tuple[int, ...], needed: tuple[int, ...]) -> CheckpointError:
        return CheckpointError(f"{self.source.path}: layer {name!r} is stored as {stored}, but {self.config_path} "
                               f"describes {needed}")

    def dense_rest(self) -> None:
        for name, tensor in list(self.model.state_dict(keep_vars=True).items()):
            if not tensor.is_meta and name not in self.source:
                continue  # a buffer the model computed itself at construction
            if not tensor.is_meta and name in self.used:
                continue
            if name in self.tied and name not in self.source and self.tied[name] in self.source:
                self.to_tie.append(name)
                continue  # tied: restored from its source once that is loaded
            loaded = self.tensor(name, tuple(tensor.shape), dense=True)
            if tensor.is_floating_point() and (not loaded.is_floating_point() or loaded.element_size() == 1):
                raise CheckpointError(f"{self.source.file_of(name)}: tensor {name!r} is stored quantized "
                                      f"({loaded.dtype}), but the model keeps that parameter dense: the checkpoint "
                                      "and its config.json's quantization_config disagree")
            module_name, _, attr = name.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            value = loaded.to(self.device, self.dense_dtype(name, loaded))  # no copy when already there
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[attr] = value

    def leftovers(self) -> None:
        missing = [n for n, t in self.model.state_dict(keep_vars=True).items() if t.is_meta]
        if missing:
            raise CheckpointError(f"{self.source.path}: lacks {len(missing)} tensors the model needs: {missing[:8]}")
        unused = [k for k in self.source.keys() if k not in self.used]
        if unused:
            logger.warning("%s: %d tensors the model does not use were ignored: %s", self.source.path, len(unused), unused[:8])


def _open_source(folder: Path, gguf_file: Path | None) -> TensorSource:
    if gguf_file is None:
        ggufs = sorted(folder.glob("*.gguf"))
        has_safetensors = any(folder.glob("*.safetensors"))
        gguf_file = ggufs[0] if len(ggufs) == 1 and not has_safetensors else None
    if gguf_file is not None:
        from .gguf_file import GGUFSource

        return GGUFSource(gguf_file, config=read_config(folder))  # checks a BFL-named FLUX file's blocks
    return SafetensorsSource.for_directory(folder)


def _route(model: nn.Module, device: torch.device, policy: Mapping[str, Any] | None) -> None:
    """Give each quantized layer its kernel: the policy (config, then environment), the autotune cache, the preference.

    A warm cache is only read here; tuning is `quantserve autotune`'s job."""
    from .autotune import TuneCache
    from .router import KernelPolicy, route

    merged = KernelPolicy.from_dict(policy).merged(KernelPolicy.from_env())
    route(model, device, policy=merged, cache=TuneCache().entries(device))


def _load_one(folder: Path, spec: Any, device: torch.device, dtype: torch.dtype, gguf_file: Path | None,
              forward_loop: Callable[[nn.Module], None] | None, progress: bool,
              kernel_policy: Mapping[str, Any] | None = None) -> nn.Module:
    start = time.perf_counter()
    timer = PhaseTimer()
    with timer.phase("skeleton"):
        model, lib, cls, qconfig, backend, planned, reasons, label, pre_quantized = _skeleton(
            folder, spec, device, dtype, gguf_file)
    config_path = folder / CONFIG_NAME
    with timer.phase("skeleton"), _open_source(folder, gguf_file) as source:
        source.timer = timer
        layers_meta = json.loads(source.metadata().get(LAYERS_METADATA_KEY, "{}"))
        loader = _Loader(model, source, device, dtype, config_path, lib.tied_targets(model),
                         lib.fp32_patterns(model, dtype), timer)
        from tqdm.auto import tqdm

        # the quantized layers: each one's packed tensors are used as read (views of the file's pages, see
        # model_files._SafetensorsFile) and moved to the device once: no copy on the CPU
        making = "unpack" if pre_quantized else "quantize"
        for name, linear in tqdm(planned.items(), desc=f"quantize {cls.__name__}" if not pre_quantized else "load",
                                 unit="layer", disable=not progress or not planned):
            with timer.phase(making):
                q, why = backend.load(name, (linear.out_features, linear.in_features), loader,
                                      layers_meta.get(name), pre_quantized)
            if q is None:
                reasons[name] = why
                continue
            bias = loader.tensor(f"{name}.bias", (linear.out_features,), dense=True) if linear.bias is not None else None
            with timer.phase("to_device"):
                bias = bias.to(device, dtype) if bias is not None else None
                _set_submodule(model, name, QuantLinear(q.to(device), bias, compute_dtype=dtype))
            if not pre_quantized:
                with timer.phase("quantize"):
                    del q
                    release_freed_memory()  # the quantizer's freed temporaries, before the next layer's
        with timer.phase("to_device"):
            loader.dense_rest()
            if loader.to_tie:  # as transformers does: a checkpoint holding both tensors keeps both as stored
                lib.tie(model)
            loader.leftovers()
        source.timer = None
    with timer.phase("build"):
        if backend is not None:
            backend.process_after_loading(model, forward_loop)
        model.eval()
        _route(model, device, kernel_policy)
        report = LoadReport(cls.__name__, str(gguf_file or folder), qconfig.quant_method.value if qconfig else "none",
                            label, pre_quantized)
        measure(model, report, reasons)
    report.seconds = time.perf_counter() - start
    report.phases = dict(timer.seconds)
    model.quantserve_config = qconfig
    model.quantserve_backend = backend
    model.quantserve_report = report
    return model


def _skeleton(folder: Path, spec: Any, device: torch.device, dtype: torch.dtype, gguf_file: Path | None) -> tuple:
    """The empty (meta-device) model, its quantization config and backend, and the plan of its Linear layers."""
    config_path = folder / CONFIG_NAME
    model_config = read_config(folder)
    lib, class_name = library_of_config(model_config, config_path)
    cls = lib.model_class(class_name, config_path)
    block = model_config.get("quantization_config")
    if gguf_file is not None and block is None:
        block = GGUFQuantizationConfig(compute_dtype=dtype).to_dict()
    qconfig, options, label, pre_quantized = _choose_config(block, spec, config_path)
    if gguf_file is not None and not isinstance(qconfig, GGUFQuantizationConfig):
        raise CheckpointError(f"{gguf_file}: a .gguf file holds GGUF blocks, but {config_path} says "
                              f"{qconfig.quant_method.value if qconfig else 'not quantized'}")
    backend = backend_for(qconfig, dtype, **options) if qconfig is not None else None
    if qconfig is not None:
        qconfig.check_environment(device)

    model = lib.skeleton(cls, model_config)
    planned, reasons = plan_layers(model, backend, lib.dense_patterns(model))
    return model, lib, cls, qconfig, backend, planned, reasons, label, pre_quantized


def load_model(path: str | os.PathLike[str], quantization_config: Any = None, device: str | torch.device = "cpu",
               torch_dtype: torch.dtype = torch.bfloat16, config: str | os.PathLike[str] | None = None, *,
               forward_loop: Callable[[nn.Module], None] | None = None, progress: bool = False,
               kernel_policy: Mapping[str, Any] | None = None) -> Any:
    """Load a diffusers model (dir), pipeline (dir with model_index.json) or .gguf file, quantized.

    `quantization_config`: a config object, a scheme name ("nf4", "gguf-q4_k", ...), a config.json block, or for a
    pipeline a mapping component -> any of those. A checkpoint that is already quantized keeps its own config.
    `kernel_policy`: {"force": {pattern: kernel}, "disable": {pattern: [kernel, ...]}} for the router (the
    QUANTSERVE_FORCE_KERNEL / QUANTSERVE_DISABLE_KERNELS environment variables add to it).
    The report is at `model.quantserve_report` (see `load_report`).
    """
    path = Path(path)
    device = torch.device(device)
    if path.suffix == ".gguf":
        if config is None:
            raise ConfigValueError("load_model", "config", None, "the model directory or config.json the .gguf belongs to")
        folder = Path(config)
        folder = folder.parent if folder.name == CONFIG_NAME else folder
        if not path.is_file():
            raise CheckpointError(f"{path}: no such .gguf file")
        return _load_one(folder, quantization_config, device, torch_dtype, path, forward_loop, progress, kernel_policy)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    if (path / "model_index.json").is_file():
        from .pipeline import load_pipeline_models

        return load_pipeline_models(path, quantization_config, device, torch_dtype, forward_loop=forward_loop,
                                    progress=progress, kernel_policy=kernel_policy)
    return _load_one(path, quantization_config, device, torch_dtype, None, forward_loop, progress, kernel_policy)


def load_report(model: nn.Module) -> LoadReport:
    """The report `load_model` attached to a model."""
    report = getattr(model, "quantserve_report", None)
    if report is None:
        raise ValueError("load_report: this model was not loaded by quantserve.runtime.load_model")
    return report


# --- saving ---------------------------------------------------------------------------------------------------

def _checkpoint_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            q = module.qweight
            layers[name] = {"backend": q.backend, "fmt": q.fmt, "meta": q.meta,
                            "shape": [q.out_features, q.in_features], "tensors": sorted(q.packed_tensors())}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key not in skip:
            tensors[key] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, layers


def write_model(model: nn.Module, folder: Path) -> None:
    """config.json (with the quantization_config) and the weights of a loaded model, into an existing `folder`:
    safetensors with quantserve's packed layers, or the backend's own file (a .gguf for GGUF)."""
    from .model_files import save_safetensors_aligned

    qconfig = getattr(model, "quantserve_config", None)
    backend = getattr(model, "quantserve_backend", None)
    lib = library_of_model(model)
    lib.write_config(model, folder, qconfig.to_dict() if qconfig is not None else None)
    if backend is not None and backend.writes_own_checkpoint():
        backend.save_checkpoint(model, folder)
        return
    state = model.state_dict()
    tied = {t for t, src in lib.tied_targets(model).items()  # stored once when really shared, as transformers does
            if t in state and src in state and state[t].data_ptr() == state[src].data_ptr()}
    tensors, layers = _checkpoint_tensors(model, tied)
    save_safetensors_aligned(folder / lib.weights_name, tensors, {"format": "pt", LAYERS_METADATA_KEY: json.dumps(layers)})


def save_quantized(model: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Write a pre-quantized checkpoint of a model loaded by `load_model` (config.json with its quantization_config,
    and the packed tensors), or of a whole pipeline loaded by `load_pipeline` (every component, model_index.json).
    Written to a temporary directory, then renamed into place: a failure leaves what was at `out_dir` intact."""
    out = Path(out_dir).absolute()
    with atomic_directory(out) as tmp:
        if isinstance(model, nn.Module):
            write_model(model, tmp)
        else:
            from .pipeline import write_pipeline

            write_pipeline(model, tmp)
    return out
