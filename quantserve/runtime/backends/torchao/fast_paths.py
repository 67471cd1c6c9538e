"""Where quantserve builds what torchao would, faster or where torchao's own handler refuses: float8 dynamic
quantization off CUDA, int8wo through the C quantizer, int4wo in quantserve's int4_grouped.
"""

from __future__ import annotations

from typing import Any

import torch

from ....kernels.int4 import Int4Grouped, int4_grouped_from_unsigned, quantize_int4_grouped
from ...chunking import map_rows, needs_chunks
from ...errors import BackendUnavailableError, ConfigValueError
from .serialization import _describe, _rebuild
from .weights import Int4GroupedWeight, _float8_dynamic_needs, _scaled_mm_problem

def _float8_dynamic_off_cuda(name: str, weight: torch.Tensor, cfg: Any) -> torch.Tensor:
    """What torchao's Float8DynamicActivationFloat8WeightConfig handler builds, without its CUDA-only gate."""
    from torchao.float8.inference import _granularity_is_a_1_128_w_128_128
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs
    from torchao.quantization.quantize_.workflows.float8.float8_packing_format import Float8PackingFormat

    problem = _scaled_mm_problem(weight.device)
    if problem is not None:
        raise _float8_dynamic_needs(weight.device, problem)
    if cfg.packing_format != Float8PackingFormat.PLAIN or _granularity_is_a_1_128_w_128_128(cfg.granularity):
        raise BackendUnavailableError(
            f"TorchAoConfig.quant_type: float8 dynamic quantization with packing {cfg.packing_format.value!r} and "
            f"granularity {cfg.granularity} needs a CUDA GPU with compute capability >= 8.9; on {weight.device} only "
            "plain packing with PerTensor or PerRow granularity runs")
    act_granularity, weight_granularity = cfg.granularity
    if isinstance(weight_granularity, PerRow) and weight.dtype != torch.bfloat16:
        raise ConfigValueError("load_model", "torch_dtype", weight.dtype, [torch.bfloat16],
                               hint=f"layer {name!r}: torchao's per-row float8 quantization takes bfloat16 "
                                    "weights only")
    act = QuantizeTensorToFloat8Kwargs(cfg.activation_dtype, act_granularity, hp_value_lb=cfg.activation_value_lb,
                                       hp_value_ub=cfg.activation_value_ub, kernel_preference=cfg.kernel_preference)
    return Float8Tensor.from_hp(weight, float8_dtype=cfg.weight_dtype, granularity=weight_granularity,
                                mm_config=cfg.mm_config, kernel_preference=cfg.kernel_preference, act_quant_kwargs=act)


def _int8_weight_in_c(w: torch.Tensor, quantize_one: Any) -> torch.Tensor | None:
    """int8wo through quantserve's C quantizer (torchao's per-row symmetric arithmetic, one pass, no temporaries):
    torchao quantizes two probe rows first, for the subclass's description and to check that the C kernel gives
    its very bytes with this torchao; None (use torchao) when anything differs or the CPU kernels are unavailable."""
    if w.device.type != "cpu" or w.dim() != 2 or w.shape[0] < 2 or w.dtype not in (torch.float32, torch.bfloat16,
                                                                                  torch.float16):
        return None
    from ....kernels import cpu as cpu_kernels
    from ....kernels import cpu_build

    if cpu_build.problem() is not None:
        return None
    probe = quantize_one(w[:2].contiguous())
    desc = _describe(probe)
    if (desc.get("_type") != "Int8Tensor" or sorted(desc.get("_tensor_data_names") or []) != ["qdata", "scale", "zero_point"]
            or list((desc.get("_data") or {}).get("block_size") or []) != [1, w.shape[1]]
            or getattr(probe, "zero_point", None) is None or bool(probe.zero_point.any())):
        return None
    eps = torch.finfo(torch.float32).eps
    q2, s2 = cpu_kernels.quantize_int8_symmetric(w[:2], eps)
    if not (torch.equal(q2, probe.qdata) and probe.scale.dtype == s2.dtype and torch.equal(s2, probe.scale)
            and tuple(probe.scale.shape) == (2, 1)):
        return None
    if probe.zero_point.dtype != torch.int8 or tuple(probe.zero_point.shape) != (2, 1):
        return None
    qdata, scale = cpu_kernels.quantize_int8_symmetric(w, eps)
    return _rebuild(desc, {"qdata": qdata, "scale": scale, "zero_point": torch.zeros(w.shape[0], 1, dtype=torch.int8)})


def _int4_weight(weight: torch.Tensor, cfg: Any, chunk_elements: int | None = None) -> Int4GroupedWeight:
    """int4wo: min-max (torchao's default) or HQQ (torchao's own HQQ solver) qparams, in int4_grouped.

    Min-max is per group of a row, so it runs over row chunks (same bytes); HQQ stays whole: its solver stops on
    the error of the whole tensor, so chunks would take different iteration counts."""
    from torchao.quantization.quantize_.workflows.int4.int4_choose_qparams_algorithm import Int4ChooseQParamsAlgorithm

    group = int(cfg.group_size)
    if cfg.int4_choose_qparams_algorithm == Int4ChooseQParamsAlgorithm.HQQ:
        from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

        codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
            weight, nbits=4, group_size=group, axis=1, compute_dtype=torch.bfloat16, device=weight.device,
            verbose=False, raw_output=False)
        return Int4GroupedWeight(int4_grouped_from_unsigned(codes, scale, zero, group), {"qparams": "hqq"})
    if chunk_elements is None or not needs_chunks(weight, chunk_elements):
        return Int4GroupedWeight(quantize_int4_grouped(weight, group), {"qparams": "minmax"})
    parts = map_rows(lambda c: quantize_int4_grouped(c, group), weight, chunk_elements)
    packed = Int4Grouped(torch.cat([p.qdata for p in parts]), torch.cat([p.scale for p in parts], dim=1),
                         torch.cat([p.zero_point for p in parts], dim=1), group)
    return Int4GroupedWeight(packed, {"qparams": "minmax"})


def _int4_from_torchao(t: torch.Tensor) -> Int4GroupedWeight | None:
    """A torchao Int4Tensor (what a GPU writes for int4wo) as int4_grouped, when it is the plain bf16 kind."""
    block = list(t.block_size)
    if t.qdata.dim() != 2 or block[0] != 1 or t.act_pre_scale is not None or t.activation_dtype != torch.bfloat16:
        return None
    return Int4GroupedWeight(Int4Grouped(t.qdata.contiguous(), t.scale.contiguous(), t.zero_point.contiguous(),
                                         block[-1]), {"qparams": "torchao Int4Tensor"})
