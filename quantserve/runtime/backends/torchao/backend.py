"""The torchao backend: which layers a torchao config quantizes (an FqnToConfig resolved as diffusers does),
quantize on load over row chunks, and weights rebuilt from quantserve's and diffusers' checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref
from typing import Any

import torch
from torch import nn

from ...chunking import absmax, map_rows, needs_chunks
from ...config import TorchAoConfig
from ...errors import BackendUnavailableError, ConfigValueError
from ...model_files import CheckpointError
from ..base import Backend, QuantizedWeight
from .fast_paths import _float8_dynamic_off_cuda, _int4_from_torchao, _int4_weight, _int8_weight_in_c
from .serialization import FMT_INT4, FMT_PREFIX, _describe, _rebuild, _safetensors_utils, _torchao
from .weights import Int4GroupedWeight, TorchAoWeight

def _row_axis(t: torch.Tensor, rows: int) -> int | None:
    """The axis of a component tensor with one entry per weight row (the first such), None when it has none."""
    return next((i for i, n in enumerate(t.shape) if n == rows), None)


# --- the backend ----------------------------------------------------------------------------------------------

def _group_size_problem(cfg: Any, in_features: int) -> str | None:
    sizes = []
    for attr in ("group_size", "granularity", "weight_granularity"):
        value = getattr(cfg, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[-1]
        size = value if isinstance(value, int) and not isinstance(value, bool) else getattr(value, "group_size", None)
        if isinstance(size, int):
            sizes.append(size)
    for size in sizes:
        if size <= 0 or in_features % size:
            return f"in_features {in_features} is not a multiple of group_size {size} ({type(cfg).__name__})"
    return None


def shape_problem(cfg: Any, out_features: int, in_features: int) -> str | None:
    """Why torchao would skip (or fail on) a Linear of this shape under `cfg`, or None."""
    q = _torchao()
    problem = _group_size_problem(cfg, in_features)
    if problem:
        return problem
    if isinstance(cfg, q.Int4WeightOnlyConfig) and in_features % 2:
        return f"in_features {in_features} is odd; int4 packs two codes per byte"
    if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and (in_features % 16 or out_features % 16):
        return (f"torchao float8 dynamic quantization needs in_features and out_features that are multiples of 16, "
                f"got {out_features}x{in_features}")
    if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and out_features == in_features == 128:
        # torchao 0.18 reads a per-tensor scale of a 128x128 weight as 128x128 block scaling, then asserts at run
        # time ("input_tensor must be 1x128 scaled") for more than one input row
        return "torchao float8 dynamic quantization misreads a 128x128 weight's scale as 128x128 blocks"
    return None


def _resolve_fqn(table: dict[str, Any], name: str) -> Any:
    """diffusers' resolution of an FqnToConfig for one Linear: exact '{name}.weight' or '{name}', then the first
    're:' pattern that fully matches either, then '_default' (None: no config, the layer stays dense)."""
    param = f"{name}.weight"
    for fqn in (param, name):
        if fqn in table:
            return table[fqn]
    for fqn in (param, name):
        for pattern, config in table.items():
            if pattern.startswith("re:") and re.fullmatch(pattern[3:], fqn):
                return config
    return table.get("_default")


class TorchAoBackend(Backend, config=TorchAoConfig):
    name = "torchao"
    config: TorchAoConfig
    weight_classes = (Int4GroupedWeight, TorchAoWeight)  # `from_packed` rebuilds a fmt with the one that `rebuilds` it

    def __init__(self, config: TorchAoConfig, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        super().__init__(config, compute_dtype, **options)
        self._ao_config: Any = None
        self._quiet: dict[int, Any] = {}
        self._metadata: weakref.WeakKeyDictionary[Any, dict[str, Any] | None] = weakref.WeakKeyDictionary()

    # planning
    def ao_config(self) -> Any:
        """The torchao config object (built once from the shorthand, or the AOBaseConfig given)."""
        if self._ao_config is None:
            _torchao()
            self._ao_config = self.config.to_ao_config()
        return self._ao_config

    def layer_config(self, name: str) -> Any:
        """The torchao config for layer `name`: an FqnToConfig is resolved as diffusers resolves it (exact
        '{name}.weight' or '{name}', then 're:' patterns, then '_default'); None leaves the layer dense."""
        cfg = self.ao_config()
        fqn_type = getattr(_torchao(), "FqnToConfig", None)
        if fqn_type is None or not isinstance(cfg, fqn_type):
            return cfg
        found = _resolve_fqn(cfg.fqn_to_config, name)
        if isinstance(found, fqn_type):
            raise ConfigValueError("TorchAoConfig", "quant_type", type(found).__name__,
                                   "an FqnToConfig whose entries are plain torchao configs or None",
                                   hint=f"layer {name!r} resolves to a nested FqnToConfig")
        return found

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        if not ok:
            return ok, why
        cfg = self.layer_config(name)
        if cfg is None:
            return False, "the FqnToConfig maps this layer to no config"
        problem = shape_problem(cfg, module.out_features, module.in_features)
        return (False, f"kept dense: {problem}") if problem else (True, "")

    # loading
    def _without_global_side_effects(self, cfg: Any) -> Any:
        """The config with set_inductor_config off: quantize_ would otherwise change torch._inductor's global config."""
        if not getattr(cfg, "set_inductor_config", False) or not dataclasses.is_dataclass(cfg):
            return cfg
        if id(cfg) not in self._quiet:
            self._quiet[id(cfg)] = dataclasses.replace(cfg, set_inductor_config=False)
        return self._quiet[id(cfg)]

    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        q = _torchao()
        cfg = self.layer_config(name)
        if cfg is None:
            raise ConfigValueError("TorchAoConfig", "quant_type", "FqnToConfig", "a config for every layer quantized",
                                   hint=f"layer {name!r} maps to None")
        problem = shape_problem(cfg, *weight.shape)
        if problem:
            raise ConfigValueError("TorchAoConfig", "quant_type", type(cfg).__name__,
                                   "a config that fits the layer's shape", hint=f"layer {name!r}: {problem}")
        w = weight.detach()
        if w.is_floating_point() and w.dtype != self.compute_dtype:
            w = w.to(self.compute_dtype)
        if isinstance(cfg, q.Int4WeightOnlyConfig):
            return _int4_weight(w, cfg, self.chunk_elements)
        if isinstance(cfg, q.Int8WeightOnlyConfig):
            fast = _int8_weight_in_c(w, lambda c: self._quantize_(name, c, cfg))
            if fast is not None:
                return TorchAoWeight.from_subclass(fast)
        if isinstance(cfg, q.Float8DynamicActivationFloat8WeightConfig) and w.device.type not in ("cuda", "xpu"):
            return TorchAoWeight.from_subclass(self._chunked(w, lambda c: _float8_dynamic_off_cuda(name, c, cfg)))
        return TorchAoWeight.from_subclass(self._chunked(w, lambda c: self._quantize_(name, c, cfg)))

    def _chunked(self, w: torch.Tensor, quantize_one: Any) -> torch.Tensor:
        """The subclass `quantize_one(w)` makes, computed over row chunks when its scales allow it (same tensors).

        Per-row and per-group subclasses (block_size[0] == 1) are the chunks' tensors concatenated along the rows;
        a per-tensor Float8Tensor gets its scale from the global amax, then each chunk is quantized with it;
        anything else is quantized whole."""
        if not needs_chunks(w, self.chunk_elements):
            return quantize_one(w)
        first_rows = next(iter(map_rows(lambda c: c.shape[0], w, self.chunk_elements)))
        first = quantize_one(w[:first_rows].contiguous())
        desc = _describe(first)
        block = list(desc["_data"].get("block_size") or [])
        names = list(desc["_tensor_data_names"])
        axes = {n: _row_axis(getattr(first, n), first_rows) for n in names}
        rowwise = len(block) == 2 and block[0] == 1 and None not in axes.values()
        if not rowwise:
            if desc["_type"] == "Float8Tensor" and block == [first_rows, w.shape[1]]:
                return self._float8_per_tensor(w, first, desc)
            return quantize_one(w)
        parts = [first] + map_rows(quantize_one, w[first_rows:], self.chunk_elements)
        for part in parts[1:]:
            if _describe(part) != desc:
                return quantize_one(w)  # a chunk came out differently described: not row-separable after all
        tensors = {n: torch.cat([getattr(p, n) for p in parts], dim=axes[n]) for n in names}
        return _rebuild(desc, tensors)

    def _float8_per_tensor(self, w: torch.Tensor, first: torch.Tensor, desc: dict[str, Any]) -> torch.Tensor:
        """Float8Tensor.from_hp with a per-tensor scale, a chunk at a time: the scale from the exact global amax
        through torchao's own `_choose_scale_float8`, each chunk through its `_quantize_affine_float8`."""
        from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

        float8_dtype = first.qdata.dtype
        amax = absmax(w, self.chunk_elements).reshape(1, 1)
        scale = _choose_scale_float8(amax, block_size=[1, 1], float8_dtype=float8_dtype)
        qdata = torch.cat(map_rows(lambda c: _quantize_affine_float8(c, scale, float8_dtype), w, self.chunk_elements))
        full = json.loads(json.dumps(desc))
        full["_data"]["block_size"] = list(w.shape)
        return _rebuild(full, {"qdata": qdata, "scale": scale.reshape(first.scale.shape)})

    def _quantize_(self, name: str, weight: torch.Tensor, cfg: Any) -> torch.Tensor:
        """torchao.quantization.quantize_ on a one-layer Linear holding `weight`; the subclass it leaves there."""
        from torchao.utils import TorchAOBaseTensor

        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        try:
            _torchao().quantize_(linear, self._without_global_side_effects(cfg))
        except (AssertionError, ImportError, NotImplementedError, RuntimeError) as exc:
            raise BackendUnavailableError(
                f"torchao {type(cfg).__name__} cannot quantize layer {name!r} ({weight.shape[0]}x{weight.shape[1]}, "
                f"{weight.dtype}) on {weight.device}: {type(exc).__name__}: {exc}") from exc
        t = linear.weight
        if not isinstance(t, TorchAOBaseTensor):
            raise BackendUnavailableError(f"torchao {type(cfg).__name__} left layer {name!r} "
                                          f"({weight.shape[0]}x{weight.shape[1]}) unquantized on {weight.device}")
        allowed = _safetensors_utils().ALLOWED_TENSORS_SUBCLASSES
        if type(t).__name__ not in allowed:
            raise BackendUnavailableError(
                f"torchao {type(cfg).__name__} made a {type(t).__name__} for layer {name!r}, which torchao cannot "
                f"store as safetensors; quantserve keeps only {allowed}")
        return t.detach()

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        where = f"layer {name!r} ({fmt})"
        try:
            weight_class = self.weight_class(fmt)
            if weight_class is None:
                raise ValueError(f"not a torchao format; accepted: {FMT_INT4!r} or {FMT_PREFIX!r}...")
            weight = weight_class.from_stored(fmt, meta, tensors)
        except (KeyError, ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: cannot rebuild the torchao weight: {type(exc).__name__}: {exc}") from exc
        if (weight.out_features, weight.in_features) != (out_features, in_features):
            raise CheckpointError(f"{where}: stored as {weight.out_features}x{weight.in_features}, "
                                  f"the model needs {out_features}x{in_features}")
        return weight

    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """A layer diffusers saved with torchao: safetensors tensors '{name}._weight_{part}' and, in the header,
        '{name}.weight' -> torchao's JSON description (torchao's flatten_tensor_state_dict)."""
        entries = self._torchao_entries(source)
        entry = entries.get(f"{name}.weight") if entries else None
        if entry is None or entry.get("_type") == "Tensor":
            return None
        tensors = {}
        for part in entry.get("_tensor_data_names") or []:
            key = f"{name}._weight_{part}"
            if key not in source:
                raise CheckpointError(f"{source.path}: has no tensor {key!r}, which its torchao metadata for "
                                      f"{name}.weight names")
            tensors[part] = source.get(key)
        try:
            t = _rebuild(entry, tensors)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:
            raise CheckpointError(f"{source.path}: {name}.weight: cannot rebuild the torchao tensor: {exc}") from exc
        if type(t).__name__ == "Int4Tensor":
            weight = _int4_from_torchao(t)
            if weight is not None:
                return weight
        return TorchAoWeight.from_subclass(t)

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """diffusers' torchao checkpoints store a layer's parts as '{name}._weight_{part}'."""
        return [k for k in source.keys() if k.startswith(f"{name}._weight_")]

    def _torchao_entries(self, source: Any) -> dict[str, Any] | None:
        """The parsed torchao header of `source` (None when it holds none), once per source."""
        try:
            return self._metadata[source]
        except (KeyError, TypeError):
            pass
        metadata = source.metadata()
        entries = None
        if "tensor_names" in metadata and _safetensors_utils().is_metadata_torchao(metadata):
            entries = {k: json.loads(metadata[k]) for k in json.loads(metadata["tensor_names"]) if k in metadata}
        try:
            self._metadata[source] = entries
        except TypeError:
            pass
        return entries
