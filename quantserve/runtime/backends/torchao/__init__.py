"""torchao, driven directly: each Linear weight becomes a torchao tensor subclass, run by torchao's own dispatch.

- int8wo/int8dq (`Int8Tensor`), float8wo (`Float8Tensor`, e4m3 or e5m2), uint1wo..uint7wo and int4dq
  (`IntxUnpackedToInt8Tensor`), and any `AOBaseConfig` that yields a subclass on torchao's safetensors allow-list:
  `torchao.quantization.quantize_` makes the subclass; `linear` is `F.linear(x, subclass)`.
- float8dq: torchao's config handler refuses anything but CUDA >= 8.9 / MI300 / XPU, yet its `Float8Tensor` runs on
  a CPU through `torch._scaled_mm`; off CUDA the subclass is built with the same `Float8Tensor.from_hp` call the
  handler makes, after a probe that `_scaled_mm` works on that device.
- int4wo: torchao's `Int4WeightOnlyConfig` needs the GPU library mslk; quantserve's own `int4_grouped`
  (kernels/int4.py) has the same layout and arithmetic and runs everywhere.

Storing: a subclass is kept as its plain component tensors (buffers) plus torchao's own JSON description of it
(`TensorSubclassAttributeJSONEncoder`, the form diffusers writes into safetensors headers) in `meta`; it is rebuilt
only through torchao's allow-listed `object_from_dict`. Sub-byte codes that torchao holds one per int8 are kept
packed in bit planes (n bits per weight) and unpacked when the layer runs.

The parts: `serialization` (subclass <-> plain tensors + JSON, bit planes, format names), `weights` (the two weight
classes), `fast_paths` (what quantserve builds instead of torchao's handler), `backend` (plan, quantize, restore).
"""

from .backend import TorchAoBackend, shape_problem
from .serialization import BITPLANES, FMT_INT4, FMT_PREFIX, fmt_of, pack_bitplanes, unpack_bitplanes
from .weights import _DEVICE_ONLY, _SCALED_MM_OK, Int4GroupedWeight, TorchAoWeight

__all__ = ["BITPLANES", "FMT_INT4", "FMT_PREFIX", "Int4GroupedWeight", "TorchAoBackend", "TorchAoWeight", "fmt_of",
           "pack_bitplanes", "shape_problem", "unpack_bitplanes"]
