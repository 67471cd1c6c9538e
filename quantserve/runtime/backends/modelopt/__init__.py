"""NVIDIA ModelOpt, driven through its own code: FP8, INT8, INT4, NF4 and NVFP4 weights stored packed, optionally with
FP8, INT8 or NVFP4 activations, calibrated with modelopt's "max" calibrator.

How one layer is quantized (as modelopt's `mtq.quantize` + `mtq.compress` do it to a model, one layer at a time so
that no bf16 copy of the whole model is ever held):
- the modelopt `quant_cfg` (the config's explicit `modelopt_config`, else one derived from `quant_type` as diffusers
  derives it) is applied by modelopt itself to a one-layer scaffold named like the real layer, so its wildcards and
  its default-disabled list (`*lm_head*`, `*proj_out.*`, ...) match exactly as they would on the whole model;
- `mtq.quantize` calibrates the weight quantizer, `mtq.compress` turns the weight into modelopt's real-quantized
  `QTensor` (float8_e4m3fn bytes, int8, int4 or NF4 codes two per byte, or NVFP4 e2m1 codes with e4m3 block
  scales and an fp32 global scale); quantserve keeps those tensors and scales as buffers;
- `dequantize` is the QTensor's own `dequantize`, fed the stored scales exactly as modelopt's TensorQuantizer does.

Activations: modelopt simulates W8A8/W4A4 on hardware without the low-bit GEMM by fake-quantizing the input of each
layer (quantize then dequantize with a calibrated amax) before a matmul with the dequantized weight; quantserve does
the same, with modelopt's own `TensorQuantizer`, applied by a forward pre-hook on each `QuantLinear` (so every kernel
the router picks sees quantized inputs). `after_load` calibrates the activation amax with the user's `forward_loop`
or, by default, a few passes over random inputs of the model's shapes; the amax is stored with the weight, so a
saved model reloads without calibration and gives bit-identical outputs.

What needs a GPU: NVFP4 activation quantization (modelopt's dynamic block quantization has only CUDA kernels). The
weights of every type quantize, dequantize and run on the CPU.

Where quantserve differs from modelopt run over a whole bf16 model, and why:
- weights are quantized from a float32 copy of each layer (modelopt's numerics on exact values; scales come out fp32);
- calibration runs with the earlier layers' weights already quantized (the dense ones are gone), so the activation
  amax of later layers can differ slightly from modelopt's, which calibrates with dense weights;
- only Linear layers are quantized: a config's attention-matmul, softmax and output quantizers are not applied (a
  warning names them), nor the Conv weight and LayerNorm input quantizers modelopt adds to a whole model;
- only the "max" algorithm: AWQ, SmoothQuant and SVDQuant rewrite weights from statistics of the whole model;
- NF4: modelopt 0.47's NF4QTensor.dequantize fails on weights with more than one scale block; quantserve undoes the
  scale double quantization per scale block (modelopt's formula) and hands it the block scales.

The parts: `quant_cfg` (the config's quant_cfg, explicit or derived), `plan` (what one Linear becomes), `weight` (the
weight and the input-quantizing hook), `backend` (quantize, restore, calibrate), `common` (constants, modelopt import,
quantizer state as JSON).
"""

from .backend import ModelOptBackend
from .common import (
    ACTIVATION_CFG,
    ACTIVATION_TYPES,
    BACKEND,
    CUDA_ONLY_ACTIVATIONS,
    INPUT_AMAX,
    OWNER,
    QTENSOR_CLASSES,
    _quiet,
)
from .plan import LayerPlan, classify_input_quantizer, classify_weight_quantizer
from .quant_cfg import activation_type, derived_quant_cfg
from .weight import ModelOptWeight, _QuantizeInput

__all__ = ["ACTIVATION_CFG", "ACTIVATION_TYPES", "BACKEND", "CUDA_ONLY_ACTIVATIONS", "INPUT_AMAX", "LayerPlan",
           "ModelOptBackend", "ModelOptWeight", "OWNER", "QTENSOR_CLASSES", "activation_type",
           "classify_input_quantizer", "classify_weight_quantizer", "derived_quant_cfg"]
