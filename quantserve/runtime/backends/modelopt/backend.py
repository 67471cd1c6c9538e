"""The ModelOpt backend: plans and quantizes each Linear with modelopt itself on a one-layer scaffold, rebuilds
weights from checkpoints, and calibrates the activation amax after loading.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...chunking import absmax, map_rows, needs_chunks
from ...config import NVIDIAModelOptConfig, dtype_name
from ...errors import ConfigValueError
from ..base import Backend
from .common import (
    BACKEND,
    CUDA_ONLY_ACTIVATIONS,
    IGNORED_QUANTIZERS,
    INPUT_AMAX,
    OWNER,
    QTENSOR_CLASSES,
    QUANTIZE_DTYPE,
    SCALE_BUFFERS,
    _from_json,
    _mtq,
    _quantizer_from_state,
    _quantizer_state,
    _quiet,
)
from .plan import LayerPlan, _block_dims, _fmt, _scaffold, classify_input_quantizer, classify_weight_quantizer
from .quant_cfg import _algorithm_name, _entries_from_json, derived_quant_cfg
from .weight import ModelOptWeight, _QuantizeInput

logger = logging.getLogger(__name__)


# --- the backend ----------------------------------------------------------------------------------------------

class ModelOptBackend(Backend, config=NVIDIAModelOptConfig):
    """Quantizes each Linear with modelopt's real quantization; calibrates activation amax in `after_load`.

    Options: `calibration_loop` (a `forward_loop(model)` used when neither `after_load` nor the config gives one).
    """

    name = BACKEND
    config: NVIDIAModelOptConfig

    def __init__(self, config: NVIDIAModelOptConfig, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        super().__init__(config, compute_dtype, **options)
        self._plans: dict[tuple[str, int, int], LayerPlan] = {}
        self._planned_shapes: dict[str, tuple[int, int]] = {}
        self._entries: list[dict[str, Any]] | None = None
        self._warned_ignored = False

    # the quant_cfg -------------------------------------------------------------------------------------------
    def quant_cfg(self) -> list[dict[str, Any]]:
        """The modelopt quant_cfg entries this backend applies (explicit modelopt_config, else derived)."""
        if self._entries is None:
            explicit = self.config.modelopt_config
            if explicit is not None:
                if "quant_cfg" not in explicit:
                    raise ConfigValueError(OWNER, "modelopt_config", dict(explicit), "a dict with a 'quant_cfg' key")
                self._entries = _entries_from_json(explicit["quant_cfg"])
            else:
                if self.config.weight_only and self.config.activation_type is not None:
                    logger.warning("NVIDIAModelOptConfig.quant_type %r names %s activations but weight_only=True: "
                                   "activations stay unquantized (set weight_only=False to quantize them)",
                                   self.config.quant_type, self.config.activation_type)
                self._entries = derived_quant_cfg(self.config)
            self._warn_ignored_quantizers(self._entries)
        return self._entries

    def algorithm(self) -> str:
        explicit = self.config.modelopt_config
        if explicit is not None and "algorithm" in explicit:
            return _algorithm_name(explicit["algorithm"]) or "max"
        return self.config.algorithm

    def _check_algorithm(self) -> None:
        algorithm = self.algorithm()
        if algorithm != "max":
            raise ConfigValueError(OWNER, "algorithm", algorithm, ["max"],
                                   hint=f"{algorithm!r} rewrites weights from activation statistics of the whole "
                                        "bf16 model, which quantize-on-load (one layer at a time) never holds")

    def _warn_ignored_quantizers(self, entries: list[dict[str, Any]]) -> None:
        ignored = sorted({e["quantizer_name"] for e in entries
                          if e.get("enable", True) and "cfg" in e
                          and any(s in e["quantizer_name"] for s in IGNORED_QUANTIZERS)})
        if ignored and not self._warned_ignored:
            self._warned_ignored = True
            logger.warning("modelopt quant_cfg enables %s: quantserve quantizes Linear weights and inputs only; "
                           "attention matmuls, softmax and layer outputs stay in the compute dtype", ignored)

    # planning ------------------------------------------------------------------------------------------------
    def plan(self, name: str, out_features: int, in_features: int) -> LayerPlan:
        """What the quant_cfg makes of Linear `name` of this shape (cached)."""
        key = (name, out_features, in_features)
        self._planned_shapes[name] = (out_features, in_features)
        if key not in self._plans:
            self._plans[key] = self._make_plan(name, out_features, in_features)
        return self._plans[key]

    def _make_plan(self, name: str, out_features: int, in_features: int) -> LayerPlan:
        from modelopt.torch.quantization.conversion import set_quantizer_by_cfg
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        entries = self.quant_cfg()
        leaf = QuantModuleRegistry.convert(nn.Linear(in_features, out_features, bias=False, device="meta"))
        root = _scaffold(name, leaf)
        with _quiet():
            set_quantizer_by_cfg(root, entries)
        wq, iq = leaf.weight_quantizer, leaf.input_quantizer
        if not wq.is_enabled:
            return LayerPlan(None, self._why_disabled(f"{name}.weight_quantizer", leaf, entries))
        kind, fmt = classify_weight_quantizer(wq, f"{name}.weight_quantizer")
        why = self._shape_problem(kind, wq, out_features, in_features)
        if why:
            return LayerPlan(None, why)
        activation = classify_input_quantizer(iq, f"{name}.input_quantizer")
        input_state = _quantizer_state(iq) if activation else None
        return LayerPlan(kind, "", fmt, _quantizer_state(wq), activation, input_state)

    @staticmethod
    def _why_disabled(quantizer_name: str, leaf: nn.Module, entries: list[dict[str, Any]]) -> str:
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        for entry in reversed(entries):
            parent = entry.get("parent_class")
            if parent and not isinstance(leaf, QuantModuleRegistry[parent]):
                continue
            if fnmatch.fnmatch(quantizer_name, entry["quantizer_name"]) and entry.get("enable") is False:
                shown = {k: v for k, v in entry.items() if k != "cfg"}
                return f"modelopt quant_cfg disables its weight quantizer (entry {shown})"
        return "modelopt quant_cfg leaves its weight quantizer disabled"

    @staticmethod
    def _shape_problem(kind: str, quantizer: nn.Module, out_features: int, in_features: int) -> str:
        dims = _block_dims(quantizer._block_sizes)
        block = dims.get(-1)
        if kind in ("int4", "nf4") and in_features % 2:
            return f"in_features {in_features} is odd; {kind} packs two codes per byte along it"
        if kind == "int4" and block and (out_features * in_features) % block:
            return (f"int4 blocks of {block} do not divide the weight's {out_features * in_features} elements "
                    "(modelopt blocks the flattened weight)")
        if kind in ("nvfp4", "int8") and dims:
            shape = (out_features, in_features)
            for dim, size in dims.items():
                if shape[dim] % size:
                    return f"{kind} blocks of {size} do not divide dimension {dim} ({shape[dim]}) of the weight"
        if kind == "nvfp4" and block is not None and block % 2:
            return f"nvfp4 block size {block} is odd; codes are packed two per byte"
        return ""

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        if not ok:
            return ok, why
        plan = self.plan(name, module.out_features, module.in_features)
        return (plan.kind is not None), plan.reason

    # loading -------------------------------------------------------------------------------------------------
    def quantize(self, name: str, weight: torch.Tensor) -> ModelOptWeight:
        """Quantize one (out, in) weight with `mtq.quantize` + `mtq.compress` on a one-layer scaffold named `name`."""
        self._check_algorithm()
        out_features, in_features = weight.shape
        plan = self.plan(name, out_features, in_features)
        if plan.kind is None:
            raise ConfigValueError(OWNER, "quant_cfg", name, "a layer whose weight quantizer the config enables",
                                   hint=plan.reason)
        if not self._row_separable(plan) or not needs_chunks(weight, self.chunk_elements):
            tensors = self._quantize_rows(name, weight, plan, None)
        else:
            # row chunks, each quantized by modelopt as the whole weight would be; a per-tensor amax (FP8's scale,
            # NVFP4's global scale) is the whole weight's, found first in a chunked pass, so the bytes are the same
            amax = absmax(weight, self.chunk_elements).to(QUANTIZE_DTYPE)
            parts = map_rows(lambda c: self._quantize_rows(name, c, plan, amax), weight, self.chunk_elements)
            tensors = {}
            for key, first in parts[0].items():
                if first.dim() == 0:
                    if any(not torch.equal(p[key], first) for p in parts[1:]):
                        raise RuntimeError(f"modelopt {name}: per-tensor {key} differs between row chunks")
                    tensors[key] = first
                else:
                    tensors[key] = torch.cat([p[key] for p in parts])
        meta = self._meta(plan, (out_features, in_features))
        input_quantizer = _quantizer_from_state(plan.input_state, None) if plan.activation else None
        if input_quantizer is not None and input_quantizer._dynamic:
            meta["input_amax"] = "dynamic"
        return ModelOptWeight(plan.fmt, meta, tensors, input_quantizer)

    @staticmethod
    def _row_separable(plan: LayerPlan) -> bool:
        """Whether rows quantize independently given the per-tensor amax: not NF4 (its scales are quantized again in
        blocks that span rows), nor blocks along the output axis."""
        blocks = _from_json(plan.weight_state or {}).get("_block_sizes") or {}
        return plan.kind != "nf4" and set(_block_dims(blocks)) <= {-1, 1}

    def _quantize_rows(self, name: str, weight: torch.Tensor, plan: LayerPlan,
                       global_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """modelopt's quantize ("max" calibration) + compress of some rows of layer `name`, on a one-layer scaffold;
        a per-tensor weight amax is replaced by `global_amax` (the whole weight's) before compressing."""
        mtq = _mtq()
        out_features, in_features = weight.shape
        linear = nn.Linear(in_features, out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().to(QUANTIZE_DTYPE), requires_grad=False)
        root = _scaffold(name, linear)
        with _quiet(), torch.no_grad():
            mtq.quantize(root, {"quant_cfg": self.quant_cfg(), "algorithm": "max"}, forward_loop=None)
            leaf = root.get_submodule(name)
            amax = getattr(leaf.weight_quantizer, "amax", None)
            if global_amax is not None and amax is not None and amax.numel() == 1:
                leaf.weight_quantizer.amax = global_amax.to(amax.dtype).reshape(amax.shape)
            mtq.compress(root)
        qtensor = leaf.weight.get_qtensor()
        expected = QTENSOR_CLASSES[plan.kind]
        if type(qtensor).__name__ != expected:
            raise RuntimeError(f"modelopt made a {type(qtensor).__name__} for {name}, expected {expected} ({plan.fmt})")
        tensors = {"weight": qtensor._quantized_data.detach()}
        for buffer, attr in SCALE_BUFFERS.items():
            value = getattr(leaf.weight_quantizer, attr, None)
            if value is not None:
                tensors[buffer] = value.detach()
        return tensors

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> ModelOptWeight:
        known = {"weight", *SCALE_BUFFERS, INPUT_AMAX}
        unknown = sorted(set(tensors) - known)
        if unknown or "weight" not in tensors:
            raise ValueError(f"modelopt layer {name}: tensors {sorted(tensors)}; expected 'weight' and some of "
                             f"{sorted(known - {'weight'})}")
        if list(meta.get("shape", [])) != [out_features, in_features]:
            raise ValueError(f"modelopt layer {name}: meta.shape {meta.get('shape')} != {[out_features, in_features]}")
        state = meta.get("input_quantizer")
        if meta.get("input_amax") == "calibrated" and INPUT_AMAX not in tensors:
            raise ValueError(f"modelopt layer {name}: meta says its input amax was calibrated, but the checkpoint "
                             f"holds no {INPUT_AMAX!r}")
        input_quantizer = _quantizer_from_state(state, tensors.get(INPUT_AMAX)) if state else None
        weight = ModelOptWeight(fmt, dict(meta), {k: v for k, v in tensors.items() if k != INPUT_AMAX}, input_quantizer)
        expected_fmt = _fmt(meta["kind"], _from_json(meta["weight_quantizer"]).get("_axis"), weight._block_sizes)
        if fmt != expected_fmt:
            raise ValueError(f"modelopt layer {name}: fmt {fmt!r} does not match its meta ({expected_fmt!r})")
        return weight

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """A ModelOpt-compressed layer: its packed weight, the weight quantizer's scales and the input amax."""
        return [k for k in source.keys() if k.startswith((f"{name}.weight", f"{name}.input_quantizer."))]

    def read_checkpoint_layer(self, name: str, source: Any) -> ModelOptWeight | None:
        """Layer `name` as a modelopt-compressed module keeps it in its state dict (what diffusers' save_pretrained
        writes after mtq.compress): `{name}.weight` packed, `{name}.weight_quantizer._scale` (and `_double_scale`,
        `_scale_zeros`), `{name}.input_quantizer._amax`; None when `source` holds no such layer. The layout is read
        with this config's quant_cfg, which must describe the same format (its dtype and shape are checked)."""
        from ...model_files import CheckpointError

        prefix = f"{name}.weight_quantizer."
        if f"{prefix}_scale" not in source:
            if f"{name}.weight" in source and f"{prefix}_amax" in source:
                raise CheckpointError(f"{source.path}: {name}.weight has a modelopt weight_quantizer._amax but no "
                                      f"{prefix}_scale: a fake-quantized (not compressed) modelopt checkpoint")
            return None
        shape = self._planned_shapes.get(name)
        if shape is None:
            raise CheckpointError(f"{source.path}: {name} holds modelopt-packed tensors, but no Linear of that name was "
                                  "planned for quantization")
        plan = self.plan(name, *shape)
        if plan.kind is None:
            raise CheckpointError(f"{source.path}: {name} is stored modelopt-packed, but the config keeps it dense "
                                  f"({plan.reason})")
        tensors = {"weight": source.get(f"{name}.weight")}
        for buffer, attr in SCALE_BUFFERS.items():
            if f"{prefix}{attr}" in source:
                tensors[buffer] = source.get(f"{prefix}{attr}")
        self._check_packed(source.path, name, plan, shape, tensors)
        meta = self._meta(plan, shape)
        amax = source.get(f"{name}.input_quantizer._amax") if f"{name}.input_quantizer._amax" in source else None
        input_quantizer = _quantizer_from_state(plan.input_state, amax) if plan.activation else None
        if input_quantizer is not None and amax is not None:
            meta["input_amax"] = "calibrated"
        elif input_quantizer is not None and input_quantizer._dynamic:
            meta["input_amax"] = "dynamic"
        return ModelOptWeight(plan.fmt, meta, tensors, input_quantizer)

    @staticmethod
    def _check_packed(path: Any, name: str, plan: LayerPlan, shape: tuple[int, int],
                      tensors: dict[str, torch.Tensor]) -> None:
        from ...model_files import CheckpointError

        out_features, in_features = shape
        blocks = _from_json(plan.weight_state).get("_block_sizes") or {}
        block = blocks.get(-1, 1)
        padded = -(-out_features * in_features // block) * block
        expected = {"fp8": (torch.float8_e4m3fn, out_features * in_features),
                    "int8": (torch.int8, out_features * in_features),
                    "int4": (torch.uint8, padded // 2), "nf4": (torch.uint8, padded // 2),
                    "nvfp4": (torch.uint8, out_features * in_features // 2)}[plan.kind]
        needs = {"fp8": ["scale"], "int8": ["scale"], "int4": ["scale"], "nvfp4": ["scale", "double_scale"],
                 "nf4": ["scale", "double_scale", "scale_zeros"]}[plan.kind]
        weight = tensors["weight"]
        if (weight.dtype, weight.numel()) != expected:
            raise CheckpointError(f"{path}: {name}.weight is {dtype_name(weight.dtype)} with {weight.numel()} values; "
                                  f"the config's {plan.fmt} for a {list(shape)} weight stores {dtype_name(expected[0])} "
                                  f"with {expected[1]}")
        missing = [n for n in needs if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: {name} ({plan.fmt}) lacks "
                                  + ", ".join(f"{name}.weight_quantizer.{SCALE_BUFFERS[n]}" for n in missing))

    @staticmethod
    def _meta(plan: LayerPlan, shape: tuple[int, int]) -> dict[str, Any]:
        return {"kind": plan.kind, "shape": list(shape), "dtype": dtype_name(QUANTIZE_DTYPE),
                "weight_quantizer": plan.weight_state, "activation": plan.activation,
                "input_quantizer": plan.input_state, "input_amax": "pending" if plan.activation else None}

    # calibration ---------------------------------------------------------------------------------------------
    def after_load(self, model: nn.Module, forward_loop: Callable[[nn.Module], None] | None = None) -> None:
        """Hook each quantized layer's input quantizer in front of it; calibrate the amax of those still without one.

        The calibration loop is `forward_loop`, else the config's, else the `calibration_loop` option, else a few
        passes over random inputs of the model's shapes (`runtime.dummy_inputs.calibration_loop`). A reloaded
        model (amax stored) runs no loop at all.
        """
        layers = [(name, module) for name, module in model.named_modules()
                  if isinstance(getattr(module, "qweight", None), ModelOptWeight) and module.qweight.activation]
        for _, module in layers:
            if not any(isinstance(h, _QuantizeInput) for h in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_QuantizeInput(module.qweight))
        off_gpu = sorted({m.qweight.activation for _, m in layers
                          if m.qweight.activation in CUDA_ONLY_ACTIVATIONS and m.qweight.weight.device.type != "cuda"})
        for act in off_gpu:
            logger.warning("modelopt: %s activations on a model placed off the GPU: %s", act, CUDA_ONLY_ACTIVATIONS[act])
        pending = [(name, module.qweight) for name, module in layers if module.qweight.meta.get("input_amax") == "pending"]
        if not pending:
            return
        self._check_algorithm()
        loop = forward_loop or self.config.forward_loop or self.options.get("calibration_loop")
        if loop is None:
            from ...dummy_inputs import calibration_loop

            loop = calibration_loop()
        self.calibrate(model, pending, loop)

    @staticmethod
    def calibrate(model: nn.Module, pending: list[tuple[str, ModelOptWeight]], loop: Callable[[nn.Module], None]) -> None:
        """modelopt's max calibration of the given layers' input quantizers over `loop(model)`."""
        from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

        quantizers = nn.ModuleList([weight.input_quantizer for _, weight in pending])
        was_training = model.training
        model.eval()
        enable_stats_collection(quantizers)
        try:
            with torch.no_grad():
                loop(model)
        finally:
            finish_stats_collection(quantizers)
            model.train(was_training)
        missed = []
        for name, weight in pending:
            if weight.input_quantizer.amax is None:
                weight.meta["input_amax"] = "dynamic"
                missed.append(name)
            else:
                weight.meta["input_amax"] = "calibrated"
        if missed:
            logger.warning("modelopt calibration: the forward_loop never reached %d layers %s; their inputs are "
                           "quantized with a per-call (dynamic) amax", len(missed), missed[:8])

    def describe(self) -> str:
        return self.config.summary() + ("" if self.config.modelopt_config is None else " (explicit modelopt_config)")
