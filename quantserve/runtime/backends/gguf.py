"""GGUF: weights as raw ggml blocks (Q4_0 ... Q6_K, IQ4_NL, IQ4_XS), read from and written to .gguf files.

A GGUF checkpoint is pre-quantized: the file decides per tensor which type it has (`read_checkpoint_layer`).
Quantize on load (the gguf-* schemes) packs a dense weight into blocks of the scheme's `gguf_type`. The blocks
stay packed in memory; each forward dequantizes them (torch reference in `quantserve.kernels.gguf`) and runs a
dense matmul, until the router gives the layer a fused kernel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...kernels.formats import GGUFBlocks
from ...kernels.gguf import BLOCK_SIZES, QUANTIZED_TYPES, block_size, dequantize_gguf, qtype_name, row_bytes
from ..config import GGUFQuantizationConfig
from ..model_files import CheckpointError
from .base import Backend, QuantizedWeight

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.gguf"
# types a QuantLinear may hold: the block-quantized ones, and BF16 (raw bf16 bytes) for completeness
WEIGHT_TYPES = (*QUANTIZED_TYPES, "BF16")
# the types the gguf-* schemes quantize into on load (named by `scheme_name`)
ON_LOAD_TYPES = ("Q8_0", "Q4_0", "Q4_K", "Q6_K")


class GGUFWeight(QuantizedWeight):
    """Raw ggml blocks of one (out_features, in_features) weight: a uint8 buffer (out, bytes per row) + its type."""

    backend = "gguf"

    def __init__(self, raw: torch.Tensor, qtype: Any, shape: tuple[int, int] | list[int]):
        name = qtype_name(qtype)
        if name not in WEIGHT_TYPES:
            raise ValueError(f"GGUFWeight: qtype {name!r} is not supported; accepted: {', '.join(WEIGHT_TYPES)}")
        out_features, in_features = (int(s) for s in shape)
        if raw.dtype != torch.uint8:
            raise TypeError(f"GGUFWeight: raw blocks must be uint8, got {raw.dtype}")
        per_row = row_bytes(name, in_features)  # raises when in_features is not a multiple of the block size
        if raw.numel() != out_features * per_row:
            raise ValueError(f"GGUFWeight: {raw.numel()} bytes of {name} do not make a ({out_features}, {in_features}) "
                             f"weight ({out_features * per_row} bytes)")
        super().__init__(out_features, in_features, f"gguf:{name}", {"qtype": name, "shape": [out_features, in_features]})
        self.register_buffer("data", raw.reshape(out_features, per_row))

    @property
    def qtype(self) -> str:
        return self.meta["qtype"]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_gguf(self.data, self.qtype, (self.out_features, self.in_features), dtype)

    def _packed(self) -> GGUFBlocks:
        return GGUFBlocks(self.data, self.qtype, (self.out_features, self.in_features))


def scheme_name(qtype: str) -> str:
    """The name of the scheme that quantizes into `qtype` on load (schemes.py builds its gguf-* rows with it)."""
    return f"gguf-{qtype.lower()}"


class GGUFBackend(Backend, config=GGUFQuantizationConfig):
    name = "gguf"
    config: GGUFQuantizationConfig

    # planning
    def gguf_type(self) -> str | None:
        """The ggml type quantize-on-load packs into (a gguf-* scheme's option); None when loading a .gguf."""
        value = self.options.get("gguf_type")
        if value is None:
            return None
        name = qtype_name(value)
        if name not in WEIGHT_TYPES:
            raise ValueError(f"gguf backend: option gguf_type={value!r} is not supported; accepted: "
                             f"{', '.join(WEIGHT_TYPES)}")
        return name

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        ok, why = super().can_quantize(name, module)
        qtype = self.gguf_type()
        if not ok or qtype is None:
            return ok, why  # reading a .gguf: the file decides per tensor
        bs = block_size(qtype)
        if module.in_features % bs:
            return False, (f"in_features={module.in_features} is not a multiple of the {qtype} block size {bs} "
                           "(kept dense)")
        return True, ""

    # loading
    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        from ..gguf_quantize import quantize_gguf

        qtype = self.gguf_type()
        if qtype is None:
            raise ValueError(f"gguf backend: cannot quantize {name!r}: no gguf_type given. GGUFQuantizationConfig alone "
                             f"only reads .gguf files; to quantize on load use a gguf-* scheme: "
                             + ", ".join(f"{scheme_name(t)} ({t})" for t in ON_LOAD_TYPES))
        if weight.dim() != 2:
            raise ValueError(f"gguf backend: {name!r}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        raw = quantize_gguf(weight, qtype, chunk_elements=self.chunk_elements).to(weight.device)
        return GGUFWeight(raw, qtype, tuple(weight.shape))

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        return GGUFWeight(tensors["data"], meta["qtype"], (out_features, in_features))

    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """The layer's blocks straight from a GGUFSource (shared with the file mapping, no copy); None for
        F32/F16/BF16 weights (the loader reads them dense) and for other sources."""
        from ..gguf_file import GGUFSource

        key = f"{name}.weight"
        if not isinstance(source, GGUFSource) or key not in source or not source.is_quantized(key):
            return None
        qtype, shape = source.qtype(key), source.shape(key)
        if qtype not in BLOCK_SIZES:
            logger.warning("%s: tensor %r is %s, which quantserve's kernels do not run; it is dequantized to a dense "
                           "weight (by gguf-py) instead", source.path, key, qtype)
            return None
        if len(shape) != 2:
            raise CheckpointError(f"{source.path}: tensor {key!r} of a Linear layer has shape {list(shape)}; "
                                  "expected (out_features, in_features)")
        raw, _, _ = source.raw(key)
        return GGUFWeight(raw, qtype, shape)

    # saving
    def writes_own_checkpoint(self) -> bool:
        return True

    def save_checkpoint(self, model: nn.Module, out_dir: Any) -> list[str]:
        """`out_dir/model.gguf`: every QuantLinear as `{layer}.weight` in its ggml type, every other tensor of the
        state dict in its own dtype (F32, F16, BF16; integer buffers as I8..I64)."""
        from ..gguf_file import write_gguf
        from ..quant_linear import QuantLinear

        tensors: dict[str, tuple] = {}
        packed_keys: set[str] = set()
        for mname, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            q = module.qweight
            if not isinstance(q, GGUFWeight):
                raise ValueError(f"gguf backend: layer {mname!r} holds a {type(q).__name__} ({q.fmt}); a .gguf file "
                                 "stores only GGUF blocks")
            packed_keys.update(f"{mname}.qweight.{b}" for b, _ in q.named_buffers())
            tensors[f"{mname}.weight"] = (q.data.detach().cpu(), q.qtype, (q.out_features, q.in_features))
        for key, tensor in model.state_dict().items():
            if key in packed_keys:
                continue
            if key in tensors:
                raise ValueError(f"gguf backend: state dict key {key!r} clashes with a quantized layer's weight")
            tensors[key] = (tensor.detach().cpu(), None)
        metadata = {"general.name": type(model).__name__, "quantserve.class_name": type(model).__name__}
        write_gguf(Path(out_dir) / CHECKPOINT_NAME, tensors, metadata)
        return [CHECKPOINT_NAME]
