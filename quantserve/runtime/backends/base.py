"""What every backend provides: a quantized weight in its own layout, and a handler that makes and restores one.

One quantized layer has one lifecycle, read as vLLM's (`create_weights`, `process_weights_after_loading`, `apply`),
on one `Backend` object per config (`backend_for(config)`). One NF4 layer, from config to kernel: runtime/config.py
(`BitsAndBytesConfig`) -> runtime/loader.py (plans, streams the tensors, routes; its errors name file and tensor)
-> this file (`Backend.create` / `load` / `process_after_loading`) -> runtime/backends/bnb.py (the hooks `load`
calls; `BnB4bitWeight.packed()` gives `kernels.formats.BnB4bit`) -> runtime/quant_linear.py (`QuantLinear.forward`
calls the kernel runtime/router.py chose) -> kernels/cpu.py or kernels/triton_matmul.py.

1. create (plan): `Backend.create(name, module)` says whether this backend quantizes that layer, and why not
   (backends override `can_quantize`); the loader keeps the others dense.
2. load: `Backend.load(name, linear_shape, source, stored_layer_meta, pre_quantized)` tries, in order, the
   backend's hooks `read_checkpoint_layer` (a checkpoint the backend's own library or diffusers wrote),
   `from_packed` (quantserve's packed layout: the tensors `QuantizedWeight.packed_tensors` gave when quantserve
   saved it, described by the safetensors metadata; the weight class whose `rebuilds(fmt)` says so rebuilds it,
   looked up in the backend's `weight_classes`), else `quantize` (a dense weight, quantized on load); it reads
   through `source`, a `LayerReader` (the loader: tensors, and errors naming file and tensor). The loader places
   the `QuantizedWeight` it gives into a `QuantLinear` (runtime/quant_linear.py).
3. process after loading: `Backend.process_after_loading(model, forward_loop)` once every weight is in place
   (ModelOpt calibrates activation scales here; backends override `after_load`).
4. apply: `QuantLinear.forward` runs the kernel the router picked (runtime/router.py, runtime/candidates.py):
   quantserve's kernels take `QuantizedWeight.packed()`, a `quantserve.kernels.formats` object over the weight's own
   buffers; the backend's own kernel is `QuantizedWeight.linear` (offered only where a weight class has one); the
   torch reference is `F.linear(x, QuantizedWeight.dequantize(dtype))`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ...kernels.formats import FormatError, PackedWeight
from ..config import QuantizationConfigMixin
from ..chunking import CHUNK_ELEMENTS

_BACKENDS: dict[type[QuantizationConfigMixin], type[Backend]] = {}
_PACKED_CACHE = "_quantserve_packed_format"
QWEIGHT = "qweight"  # quantserve's packed layout stores layer `name`'s tensors as "{name}.qweight.{tensor}"


class NoPackedFormat(FormatError):
    """A weight with no `quantserve.kernels.formats` form (no quantserve kernel takes it), and why."""

    def __init__(self, fmt: str, why: str = ""):
        self.fmt, self.why = fmt, why
        super().__init__(f"format {fmt} has no packed form" + (f": {why}" if why else ""))


class QuantizedWeight(nn.Module):
    """A quantized (out_features, in_features) weight; its packed tensors are buffers, so `.to()` and saving work.

    Subclasses register their packed tensors with `register_buffer` and keep everything else needed to rebuild the
    weight in `meta` (JSON values only: block size, quant type, dtype names). `fmt` names the packed layout
    (e.g. "nf4", "int8_rows", "gguf:Q4_K"); it appears in load reports and keys the autotune cache. `packed()` hands
    the weight to quantserve's kernels as a packed format object; subclasses build it in `_packed`.
    """

    backend: ClassVar[str] = ""
    # the fmt strings this class rebuilds from quantserve's packed layout (`rebuilds`, `from_stored`)
    stored_fmts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, out_features: int, in_features: int, fmt: str, meta: dict[str, Any] | None = None):
        super().__init__()
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.fmt = fmt
        self.meta: dict[str, Any] = dict(meta or {})

    @classmethod
    def rebuilds(cls, fmt: str) -> bool:
        """Whether `from_stored` rebuilds a weight stored under `fmt` (by default: `fmt` is one of `stored_fmts`)."""
        return fmt in cls.stored_fmts

    @classmethod
    def from_stored(cls, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The weight from what quantserve's packed layout stored: its fmt, meta and `packed_tensors`."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight: the torch reference every kernel is held against."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W.T + bias through the backend's own kernel; by default the reference path."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))

    @classmethod
    def has_own_kernel(cls) -> bool:
        """Whether this weight class runs through a kernel of its backend (its own `linear`), not the reference."""
        return cls.linear is not QuantizedWeight.linear

    def packed(self) -> PackedWeight:
        """This weight as a `quantserve.kernels.formats` object (views of its buffers, no copy), built once and
        cached on the weight until its buffers change (e.g. after `.to()`); `NoPackedFormat` says why there is none."""
        key = tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.device)
                    for name, t in self.named_buffers(recurse=False) if t is not None)
        cached = self.__dict__.get(_PACKED_CACHE)
        if cached is not None and cached[0] == key:
            return cached[1]
        packed = self._packed()
        shape = tuple(int(s) for s in packed.shape)
        if shape != (self.out_features, self.in_features):
            raise FormatError(f"{self.fmt}: the packed weight is {shape}, the layer "
                              f"{(self.out_features, self.in_features)}")
        self.__dict__[_PACKED_CACHE] = (key, packed)
        return packed

    def _packed(self) -> PackedWeight:
        """Build the packed format object (subclasses); by default there is none."""
        raise NoPackedFormat(self.fmt)

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


class LayerReader(Protocol):
    """What `Backend.load` reads one layer through (the loader's `_Loader`): the checkpoint, and errors that name
    its file and tensor."""

    source: Any  # the TensorSource, as `read_checkpoint_layer` reads it
    device: torch.device  # where a dense weight is quantized

    def tensor(self, key: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Tensor `key` (checked against `shape` unless None), counted as used; a CheckpointError if absent."""

    def mark_used(self, keys: Iterable[str]) -> None:
        """Count tensors `read_checkpoint_layer` consumed as used."""

    def checkpoint_shape_error(self, name: str, stored: tuple[int, ...], needed: tuple[int, ...]) -> Exception:
        """The error for a layer the backend's own checkpoint holds in another shape than the model's."""

    def packed_shape_error(self, name: str, stored: tuple[int, ...], needed: tuple[int, ...]) -> Exception:
        """The error for a layer quantserve's packed layout stores in another shape than the model's."""


class Backend:
    """Makes and restores the QuantizedWeights of one config class; registered per config type.

    Subclass with `class MyBackend(Backend, config=MyConfig)`; `backend_for(config)` then finds it.
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type[QuantizationConfigMixin]]
    # the weight classes `from_packed` rebuilds, looked up by fmt (`weight_class`)
    weight_classes: ClassVar[tuple[type[QuantizedWeight], ...]] = ()

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

    # 1. create (plan)
    def create(self, name: str, module: nn.Module) -> tuple[bool, str]:
        """Lifecycle step 1: whether this backend quantizes layer `name`, and why not when it does not."""
        return self.can_quantize(name, module)

    def skip_patterns(self) -> list[str]:
        """Module-name patterns this config keeps unquantized (diffusers matches them as substrings of the name)."""
        return list(getattr(self.config, "modules_to_not_convert", None) or [])

    def can_quantize(self, name: str, module: nn.Module) -> tuple[bool, str]:
        """Whether this backend quantizes that layer, and why not when it does not."""
        if not isinstance(module, nn.Linear):
            return False, "not a Linear layer"
        return True, ""

    # 2. load: read_checkpoint_layer, else from_packed, else quantize
    def load(self, name: str, linear_shape: tuple[int, int], source: LayerReader,
             stored_layer_meta: Mapping[str, Any] | None, pre_quantized: bool) -> tuple[QuantizedWeight | None, str]:
        """Lifecycle step 2: layer `name`'s weight, or None and why it stays dense.

        In order: the backend's own checkpoint layout (`read_checkpoint_layer`), quantserve's packed layout
        (`stored_layer_meta`, the layer's entry in the safetensors metadata: `from_packed`), else the dense weight,
        quantized on load (`quantize`); a pre-quantized checkpoint that stores the layer dense keeps it dense."""
        shape = tuple(linear_shape)
        q = self.read_checkpoint_layer(name, source.source)
        if q is not None:
            if (q.out_features, q.in_features) != shape:
                raise source.checkpoint_shape_error(name, (q.out_features, q.in_features), shape)
            source.mark_used(self.checkpoint_keys(name, source.source))
            return q, ""
        if stored_layer_meta is not None:
            entry = stored_layer_meta
            if tuple(entry["shape"]) != shape:
                raise source.packed_shape_error(name, tuple(entry["shape"]), shape)
            tensors = {t: source.tensor(f"{name}.{QWEIGHT}.{t}", None) for t in entry["tensors"]}
            return self.from_packed(name, entry["fmt"], entry["meta"], tensors, *shape), ""
        dense = source.tensor(f"{name}.weight", shape)
        if pre_quantized:
            return None, "stored dense in the pre-quantized checkpoint"
        return self.quantize(name, dense.to(source.device)), ""

    def weight_class(self, fmt: str) -> type[QuantizedWeight] | None:
        """The class in `weight_classes` that rebuilds a weight stored under `fmt`, None when none does."""
        return next((cls for cls in self.weight_classes if cls.rebuilds(fmt)), None)

    def quantize(self, name: str, weight: torch.Tensor) -> QuantizedWeight:
        """A dense (out, in) weight, as stored in the checkpoint, to this backend's quantized weight."""
        raise NotImplementedError

    def from_packed(self, name: str, fmt: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                    out_features: int, in_features: int) -> QuantizedWeight:
        """Rebuild a weight from the tensors `QuantizedWeight.packed_tensors` gave when it was saved (a backend with
        several weight classes finds the one for `fmt` with `weight_class`)."""
        raise NotImplementedError

    def read_checkpoint_layer(self, name: str, source: Any) -> QuantizedWeight | None:
        """Rebuild layer `name` from a checkpoint this backend's own library (or diffusers) wrote, if `source`
        (a `TensorSource`) holds it in that layout; None when it does not, so `load` tries the next way."""
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

    # 3. process after loading
    def process_after_loading(self, model: nn.Module,
                              forward_loop: Callable[[nn.Module], None] | None = None) -> None:
        """Lifecycle step 3, once every weight is in place: the backend's `after_load`."""
        self.after_load(model, forward_loop)

    def after_load(self, model: nn.Module, forward_loop: Callable[[nn.Module], None] | None = None) -> None:
        """Hook run once every weight is in place (ModelOpt calibrates activation scales here)."""


def backend_for(config: QuantizationConfigMixin, compute_dtype: torch.dtype = torch.bfloat16, **options: Any) -> Backend:
    """The backend handler for a config object, by its type."""
    from . import registered  # noqa: F401  (imports every backend module so each registers itself)

    for cls in type(config).__mro__:
        if cls in _BACKENDS:
            return _BACKENDS[cls](config, compute_dtype, **options)
    known = ", ".join(sorted(c.__name__ for c in _BACKENDS))
    raise TypeError(f"quantization_config: no backend handles {type(config).__name__}; known: {known}")

