"""What every backend provides: a quantized weight in its own layout, and a handler that makes and restores one.

A layer's quantization has a clear lifecycle (build, load, route, run):
- build: the loader plans which Linear layers a backend quantizes (`Backend.can_quantize`);
- load: `Backend.quantize` turns a dense weight into a `QuantizedWeight` (quantize on load), or
  `Backend.from_packed` rebuilds one from the tensors a pre-quantized checkpoint holds;
- route and run: `QuantLinear` calls the kernel the router picked; the backend's own path is `QuantizedWeight.linear`,
  the torch reference is `F.linear(x, QuantizedWeight.dequantize(dtype))`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import QuantizationConfigMixin
from .chunking import CHUNK_ELEMENTS

_BACKENDS: dict[type[QuantizationConfigMixin], type[Backend]] = {}


class QuantizedWeight(nn.Module):
    """A quantized (out_features, in_features) weight; its packed tensors are buffers, so `.to()` and saving work.

    Subclasses register their packed tensors with `register_buffer` and keep everything else needed to rebuild the
    weight in `meta` (JSON values only: block size, quant type, dtype names). `fmt` names the packed layout
    (e.g. "nf4", "int8_rows", "gguf:Q4_K"); it appears in load reports and picks kernels.
    """

    backend: ClassVar[str] = ""

    def __init__(self, out_features: int, in_features: int, fmt: str, meta: dict[str, Any] | None = None):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.fmt = fmt
        self.meta: dict[str, Any] = dict(meta or {})

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight: the torch reference every kernel is held against."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W.T + bias through the backend's own kernel; by default the reference path."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores for this weight, by name (the buffers unless a subclass says otherwise)."""
        return {name: buf for name, buf in self.named_buffers(recurse=False) if buf is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.packed_tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.out_features * self.in_features)

    def extra_repr(self) -> str:
        return f"{self.fmt}, out_features={self.out_features}, in_features={self.in_features}"


class Backend:
    """Makes and restores the QuantizedWeights of one config class; registered per config type.

    Subclass with `class MyBackend(Backend, config=MyConfig)`; `backend_for(config)` then finds it.
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type[QuantizationConfigMixin]]

    def __init_subclass__(cls, config: type[QuantizationConfigMixin] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if config is not None:
            cls.config_type = config
            _BACKENDS[config] = cls

    def __init__(self, config: QuantizationConfigMixin, compute_dtype: torch.dtype = torch.bfloat16, **options: Any):
        """`options` carry what a scheme adds to its config (e.g. `gguf_type="Q4_K"` for the gguf-* schemes)."""
        self.config = config
        self.compute_dtype = compute_dtype
        self.options = options
        # weights per step when a quantizer runs over row chunks of a big layer (bounds its temporaries)
        self.chunk_elements = CHUNK_ELEMENTS

    # planning
    def skip_patterns(self) -> list[str]:
        """Module-name patterns this config keeps unquantized (diffusers matches them as substrings of the name)."""
        return list(getattr(self.config, "modules_to_not_convert", None) or [])

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        """Whether this backend quantizes that layer, and why not when it does not."""
        if not isinstance(module, nn.Linear):
            return False, "not a Linear layer"
        return True, ""

    # loading
    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """A dense (out, in) weight, as stored in the checkpoint, to this backend's quantized weight."""
        raise NotImplementedError

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        """Rebuild a weight from the tensors `QuantizedWeight.packed_tensors` gave when it was saved."""
        raise NotImplementedError

    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """Rebuild layer `name` from a checkpoint this backend's own library (or diffusers) wrote, if `source`
        (a `TensorSource`) holds it in that layout; None when it does not, so the loader tries the next way."""
        return None

    def checkpoint_keys(self, name: str, source: Any) -> list[str]:
        """The tensors of layer `name` that `read_checkpoint_layer` consumed (so the loader counts them as used)."""
        return [k for k in source.keys() if k.startswith(f"{name}.weight")]

    def writes_own_checkpoint(self) -> bool:
        """True when `save_quantized` must call `save_checkpoint` (GGUF writes a .gguf, not safetensors)."""
        return False

    def save_checkpoint(self, model: nn.Module, out_dir: Any) -> list[str]:
        """Write the weights of `model` into `out_dir` in this backend's own file format; return the file names."""
        raise NotImplementedError

    def after_load(self, model: nn.Module, forward_loop: Callable[[nn.Module], None] | None = None) -> None:
        """Hook run once every weight is in place (ModelOpt calibrates activation scales here)."""

    def describe(self) -> str:
        return self.config.summary()


def backend_for(config: QuantizationConfigMixin, compute_dtype: torch.dtype = torch.bfloat16, **options: Any) -> Backend:
    """The backend handler for a config object, by its type."""
    from . import registered  # noqa: F401  (imports every backend module so each registers itself)

    for cls in type(config).__mro__:
        if cls in _BACKENDS:
            return _BACKENDS[cls](config, compute_dtype, **options)
    known = ", ".join(sorted(c.__name__ for c in _BACKENDS))
    raise TypeError(f"quantization_config: no backend handles {type(config).__name__}; known: {known}")


def registered_backends() -> Iterable[type[Backend]]:
    from . import registered  # noqa: F401

    return tuple(_BACKENDS.values())
