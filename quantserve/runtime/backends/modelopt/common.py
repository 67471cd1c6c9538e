"""What the parts of the ModelOpt backend share: its constants, modelopt imported on first use (and kept
quiet), and a quantizer's state as JSON values (a weight's meta holds only JSON).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...config import dtype_name
from ...dtypes import dtype_from_name

OWNER = "NVIDIAModelOptConfig"
BACKEND = "modelopt"
QUANTIZE_DTYPE = torch.float32
# packed-weight kind -> the modelopt QTensor class that holds and dequantizes it (a fixed list: no class is ever
# named by a checkpoint)
QTENSOR_CLASSES = {"fp8": "FP8QTensor", "int8": "INT8QTensor", "int4": "INT4QTensor", "nf4": "NF4QTensor",
                   "nvfp4": "NVFP4QTensor"}
# weight buffers, by the name of the TensorQuantizer attribute modelopt keeps them in (dequantize's keyword)
SCALE_BUFFERS = {"scale": "_scale", "double_scale": "_double_scale", "scale_zeros": "_scale_zeros"}
INPUT_AMAX = "input_quantizer._amax"
# quantizers a modelopt config may enable that have no place in a Linear layer: attention matmuls, softmax, outputs
IGNORED_QUANTIZERS = ("bmm_quantizer", "softmax_quantizer", "output_quantizer")
ACTIVATION_TYPES = ("FP8", "INT8", "NVFP4")
# activations quantized as modelopt's own presets do: per tensor with a calibrated amax (FP8_DEFAULT_CFG,
# INT8_DEFAULT_CFG), NVFP4 in dynamic blocks of 16 with e4m3 scales under a calibrated global amax (NVFP4_DEFAULT_CFG)
ACTIVATION_CFG = {
    "FP8": {"num_bits": (4, 3), "axis": None},
    "INT8": {"num_bits": 8, "axis": None},
    "NVFP4": {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
}
CUDA_ONLY_ACTIVATIONS = {
    "nvfp4": "NVFP4 activation quantization needs a CUDA GPU: modelopt's dynamic block quantization runs only as its "
             "Triton kernel (compute capability >= 8.9) or its CUDA extension; on a CPU modelopt stops with "
             "'amax must be a CUDA tensor for dynamic block quantization.' Use FP8 or INT8 activations on a CPU",
}


def _mtq():
    import modelopt.torch.quantization as mtq

    return mtq


def _dtype(name: Any) -> torch.dtype:
    return dtype_from_name(name, field_name="modelopt weight meta.dtype")


def _qtensor_class(kind: str) -> type:
    import modelopt.torch.quantization.qtensor as qtensor

    return getattr(qtensor, QTENSOR_CLASSES[kind])


@contextlib.contextmanager
def _quiet():
    """modelopt prints 'Inserted N quantizers' per call and warns that real quantization is experimental."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message="Real quantization has been applied")
        warnings.filterwarnings("ignore", message="Skipping extension modelopt_cuda_ext")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


# --- quantizer state <-> JSON (meta holds only JSON values) ---------------------------------------------------

def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _to_json(v) for k, v in value.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"modelopt quantizer state: cannot store {type(value).__name__} {value!r} as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, Mapping):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_from_json(k): _from_json(v) for k, v in value["__items__"]}
        if set(value) == {"__dtype__"}:
            return dtype_from_name(str(value["__dtype__"]), field_name="modelopt quantizer state")
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _quantizer_state(quantizer: nn.Module) -> dict[str, Any]:
    """A TensorQuantizer's properties (num_bits, axis, block sizes, flags) as modelopt saves them, in JSON form."""
    return _to_json(quantizer.get_modelopt_state(properties_only=True))


def _quantizer_from_state(state: Mapping[str, Any], amax: torch.Tensor | None) -> nn.Module:
    """A TensorQuantizer rebuilt by modelopt's `set_from_modelopt_state`, only ever setting modelopt's own properties."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    if not isinstance(state, Mapping):
        raise ValueError(f"modelopt input quantizer state: got {type(state).__name__}; accepted: a dict")
    quantizer = TensorQuantizer()
    allowed = set(quantizer._get_properties_for_modelopt_state())
    decoded = _from_json(state)
    unknown = sorted(set(decoded) - allowed)
    if unknown:
        raise ValueError(f"modelopt input quantizer state: unknown properties {unknown}; accepted: {sorted(allowed)}")
    quantizer.set_from_modelopt_state(decoded, properties_only=True)
    if amax is not None:
        quantizer.amax = amax
    return quantizer
