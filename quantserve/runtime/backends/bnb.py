"""bitsandbytes, driven directly: 4-bit NF4/FP4 (optionally double-quantized absmax) and 8-bit LLM.int8, CPU included.

diffusers' own bitsandbytes loader refuses to run without a GPU; bitsandbytes itself runs both paths on the CPU,
so quantserve calls `bitsandbytes.functional` and `bitsandbytes.matmul*` itself.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from ...kernels.formats import BnB4bit, Int8Rows
from ..config import BitsAndBytesConfig, dtype_name
from ..dtypes import dtype_from_name
from .base import Backend, QuantizedWeight
from ..memory import release_freed_memory
from ..model_files import CheckpointError
from ..chunking import map_rows

BLOCKSIZE_4BIT = 64
# bitsandbytes' CPU quantizer allocates ~15 bytes of temporaries per weight: quantize big layers in row chunks
CHUNK_ELEMENTS = 1 << 22


def _bnb():
    import bitsandbytes

    return bitsandbytes


class BnB4bitWeight(QuantizedWeight):
    """NF4/FP4: two 4-bit codes per byte, an absmax per block of 64 (itself 8-bit quantized when double-quantized)."""

    backend = "bitsandbytes"
    stored_fmts = ("nf4", "fp4")

    @classmethod
    def from_stored(cls, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BnB4bitWeight:
        return cls(tensors["data"], {k: v for k, v in tensors.items() if k != "data"}, meta)

    def __init__(self, packed: torch.Tensor, state_tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        out_features, in_features = meta["shape"]
        super().__init__(out_features, in_features, meta["quant_type"], meta)
        self.register_buffer("data", packed)
        for name, tensor in state_tensors.items():
            self.register_buffer(name, tensor)
        self._state_names = tuple(state_tensors)

    def quant_state(self):
        functional = _bnb().functional
        qs = {name.replace("__", "."): getattr(self, name) for name in self._state_names}
        qs[f"quant_state.bitsandbytes__{self.meta['quant_type']}"] = torch.frombuffer(
            bytearray(json.dumps(self.meta["quant_state"]).encode()), dtype=torch.uint8)
        return functional.QuantState.from_dict(qs, device=self.data.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = _bnb().functional.dequantize_4bit(self.data, self.quant_state(), quant_type=self.meta["quant_type"])
        return w.to(dtype)

    def _packed(self) -> BnB4bit:
        """bitsandbytes' own buffers, viewed as uint8 codes (any quant_storage) with their (nested) absmax."""
        qs = self.meta["quant_state"]
        data = self.data if self.data.dtype == torch.uint8 else self.data.view(torch.uint8)
        nested = getattr(self, "nested_absmax", None)
        extra: dict[str, Any] = {}
        if nested is not None:
            extra = dict(nested_absmax=nested.reshape(-1), nested_quant_map=self.nested_quant_map.reshape(-1),
                         nested_blocksize=int(qs.get("nested_blocksize", 256)),
                         offset=float(qs.get("nested_offset", 0.0)))
        return BnB4bit(data.reshape(-1), self.absmax.reshape(-1), self.quant_map.reshape(-1), tuple(qs["shape"]),
                       blocksize=int(qs["blocksize"]), quant_type=qs["quant_type"], dtype=dtype_from_name(qs["dtype"], field_name="quant_state.dtype"),
                       **extra)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        state = self.quant_state()
        bias = None if bias is None else bias.to(state.dtype)
        y = _bnb().matmul_4bit(x.to(state.dtype), self.data.t(), state, bias=bias)
        return y.to(x.dtype)


class BnBInt8Weight(QuantizedWeight):
    """LLM.int8: int8 rows with a float32 absmax per row; input columns above the threshold run in 16-bit."""

    backend = "bitsandbytes"
    stored_fmts = ("int8_rows",)

    @classmethod
    def from_stored(cls, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BnBInt8Weight:
        return cls(tensors["CB"], tensors["SCB"], meta)

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor, meta: dict[str, Any]):
        super().__init__(cb.shape[0], cb.shape[1], "int8_rows", meta)
        self.register_buffer("CB", cb)
        self.register_buffer("SCB", scb)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.CB.float() * (self.SCB.float()[:, None] / 127.0)).to(dtype)

    def _packed(self) -> Int8Rows:
        return Int8Rows(self.CB, self.SCB.reshape(-1), divisor=127.0)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = _bnb()
        state = bnb.MatmulLtState()
        state.threshold = float(self.meta["threshold"])
        state.has_fp16_weights = False
        state.CB, state.SCB = self.CB, self.SCB
        state.is_training = False
        x16 = x.to(torch.float16)
        y = bnb.matmul(x16, self.CB, state=state, bias=None if bias is None else bias.to(torch.float16))
        return y.to(x.dtype)


def quantize_4bit_chunked(weight: torch.Tensor, cfg: BitsAndBytesConfig, chunk_elements: int = CHUNK_ELEMENTS):
    """`bitsandbytes.functional.quantize_4bit` of the whole weight, computed a few rows at a time.

    Blocks of 64 never straddle rows when in_features is a multiple of 64, so quantizing row chunks with
    bitsandbytes' own op and concatenating gives the very bytes of one whole-tensor call, with bounded temporaries;
    the double-quantization of absmax then runs once over all of it, exactly as bitsandbytes does."""
    functional = _bnb().functional
    rows = max(1, chunk_elements // weight.shape[1])
    if weight.shape[0] <= rows or weight.shape[1] % BLOCKSIZE_4BIT:
        return functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE_4BIT,
                                        compress_statistics=cfg.bnb_4bit_use_double_quant,
                                        quant_type=cfg.bnb_4bit_quant_type, quant_storage=cfg.bnb_4bit_quant_storage)
    op = torch.ops.bitsandbytes.quantize_4bit.default
    parts = []
    for i in range(0, weight.shape[0], rows):
        parts.append(op(weight[i:i + rows].contiguous(), BLOCKSIZE_4BIT, cfg.bnb_4bit_quant_type,
                        cfg.bnb_4bit_quant_storage))
        release_freed_memory()  # the op's temporaries, before the next chunk's
    packed = torch.cat([p[0] for p in parts])
    absmax = torch.cat([p[1] for p in parts])
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=BLOCKSIZE_4BIT, quant_type=cfg.bnb_4bit_quant_type,
                  code=functional.get_4bit_type(cfg.bnb_4bit_quant_type, device=weight.device))
    if not cfg.bnb_4bit_use_double_quant:
        return packed, functional.QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = functional.quantize_blockwise(absmax - offset, blocksize=256)
    return packed, functional.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


class BitsAndBytesBackend(Backend, config=BitsAndBytesConfig):
    name = "bitsandbytes"
    config: BitsAndBytesConfig
    weight_classes = (BnB4bitWeight, BnBInt8Weight)  # `from_packed` rebuilds a fmt with the one that `rebuilds` it

    def skip_patterns(self) -> list[str]:
        return list(self.config.llm_int8_skip_modules or [])

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        if not self.config.is_quantizable():
            return False, "neither load_in_4bit nor load_in_8bit is set"
        return super().can_quantize(name, module)

    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        if self.config.load_in_8bit:
            # LLM.int8 weights: an absmax per row, so row chunks give the same bytes with small fp16/fp32 temporaries
            parts = map_rows(lambda c: _bnb().functional.int8_vectorwise_quant(c.to(torch.float16))[:2], weight,
                             self.chunk_elements)
            cb, scb = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return BnBInt8Weight(cb, scb, {"threshold": self.config.llm_int8_threshold})
        packed, state = quantize_4bit_chunked(weight.to(self.config.bnb_4bit_compute_dtype), self.config,
                                              self.chunk_elements)
        return self._weight_from_state_dict(packed, state.as_dict(packed=True), tuple(weight.shape))

    def _weight_from_state_dict(self, packed: torch.Tensor, qs: dict[str, Any], shape: tuple[int, int]) -> BnB4bitWeight:
        tensors = {k.replace(".", "__"): v for k, v in qs.items() if not k.startswith("quant_state.")}
        blob = next(v for k, v in qs.items() if k.startswith("quant_state."))
        quant_state = json.loads(bytes(blob.tolist()).decode())
        meta = {"shape": list(shape), "quant_type": quant_state["quant_type"], "quant_state": quant_state,
                "storage": dtype_name(packed.dtype)}
        return BnB4bitWeight(packed, tensors, meta)

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        weight_class = self.weight_class(fmt)
        if weight_class is None:
            accepted = ", ".join(repr(f) for c in self.weight_classes for f in c.stored_fmts)
            raise CheckpointError(f"bitsandbytes backend: layer {name!r}: stored fmt {fmt!r} is not a bitsandbytes format; "
                                  f"accepted: {accepted}")
        return weight_class.from_stored(fmt, meta, tensors)

    # checkpoints bitsandbytes' own serialization wrote (through diffusers or transformers)
    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """4-bit: `{name}.weight` packed, beside `.absmax`, `.quant_map` (`.nested_*` when double-quantized) and the
        `.quant_state.bitsandbytes__<type>` blob; 8-bit: `{name}.weight` int8 with `{name}.SCB`."""
        prefix = f"{name}.weight."
        blob = next((k for k in source.keys() if k.startswith(prefix + "quant_state.bitsandbytes__")), None)
        if blob is not None:
            qs = {k[len(prefix):]: source.get(k) for k in source.keys() if k.startswith(prefix)}
            quant_state = json.loads(bytes(qs[blob[len(prefix):]].tolist()).decode())
            return self._weight_from_state_dict(source.get(f"{name}.weight"), qs, tuple(quant_state["shape"]))
        if f"{name}.SCB" in source and f"{name}.weight" in source:
            cb = source.get(f"{name}.weight")
            if cb.dtype == torch.int8:
                return BnBInt8Weight(cb, source.get(f"{name}.SCB").float(), {"threshold": self.config.llm_int8_threshold})
        return None

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        return [k for k in source.keys() if k.startswith(f"{name}.weight") or k == f"{name}.SCB"]
