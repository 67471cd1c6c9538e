"""The torchao backend on the CPU: every shorthand through torchao itself, storage, checkpoints diffusers wrote."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from quantserve.kernels.int4 import (
    Int4Grouped,
    dequantize_int4_grouped,
    pack_int4,
    quantize_int4_grouped,
    unpack_int4,
)
from quantserve.runtime.backends import backend_for
from quantserve.runtime.backends import torchao as tao
from quantserve.runtime.compare import relative_error
from quantserve.runtime.config import TorchAoConfig, quantization_config_from_dict
from quantserve.runtime.errors import BackendUnavailableError, ConfigValueError
from quantserve.runtime.model_files import CheckpointError, SafetensorsSource

OUT, IN = 64, 128

# shorthand -> (format, bits per weight the format implies for a 64x128 weight, bound on the relative output error)
# int8 rows: 1 byte + fp32 scale + int8 zero per row; float8 rows: 1 byte + fp32 scale per row (one per tensor for
# float8dq); intx: n bits + bf16 scale + int8 zero per group (64, int4dq 32); int4wo: 4 bits + bf16 scale and zero
# per group of 128. 8-bit is held tighter than 4-bit; 2-bit looser; 1-bit is torchao's {0, min or max} grid, which
# loses about all of a weight drawn symmetric around zero (its error ~1.0 is torchao's, checked bit for bit below).
CASES = {
    "int8wo": ("torchao:int8_rows", 8 + 40 / IN, 0.02),
    "int8dq": ("torchao:int8_rows+dyn_int8", 8 + 40 / IN, 0.02),
    "float8wo_e4m3": ("torchao:float8_e4m3_rows", 8 + 32 / IN, 0.05),
    "float8wo_e5m2": ("torchao:float8_e5m2_rows", 8 + 32 / IN, 0.08),
    "float8wo": ("torchao:float8_e5m2_rows", 8 + 32 / IN, 0.08),
    "float8dq": ("torchao:float8_e4m3_tensor+dyn_float8", 8 + 32 / (IN * OUT), 0.06),
    "float8dq_e4m3_row": ("torchao:float8_e4m3_rows+dyn_float8", 8 + 32 / IN, 0.06),
    "int4dq": ("torchao:int4_grouped_bitplanes+dyn_int8", 4 + 24 / 32, 0.15),
    "int4wo": ("int4_grouped", 4 + 32 / 128, 0.15),
    **{f"uint{n}wo": (f"torchao:int{n}_grouped_bitplanes", n + 24 / 64, bound)
       for n, bound in ((1, 1.1), (2, 0.5), (3, 0.25), (4, 0.15), (5, 0.06), (6, 0.03), (7, 0.02))},
}


@pytest.fixture(scope="module")
def layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT, dtype=torch.bfloat16).requires_grad_(False)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(8, IN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def _dense(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.detach().float(), layer.bias.detach().float())


def _quantize(quant_type, weight: torch.Tensor, **kwargs):
    return backend_for(TorchAoConfig(quant_type, **kwargs)).quantize("layer", weight)


def _reload(backend, q):
    """Through a real safetensors blob: tensors as stored, fmt and meta as JSON in the header."""
    blob = st_save({k: v.contiguous() for k, v in q.packed_tensors().items()},
                   metadata={"fmt": q.fmt, "meta": json.dumps(q.meta)})
    tensors = st_load(blob)
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
    meta = json.loads(header["meta"])
    return backend.from_packed("layer", header["fmt"], meta, tensors, q.out_features, q.in_features)


# --- every shorthand on a 64x128 bf16 layer ---------------------------------------------------------------------

@pytest.mark.parametrize("quant_type", sorted(CASES))
def test_shorthand_accuracy_bytes_and_bit_exact_reload(quant_type, layer, x):
    fmt, bits, bound = CASES[quant_type]
    backend = backend_for(TorchAoConfig(quant_type))
    q = backend.quantize("layer", layer.weight.detach())
    assert q.fmt == fmt and q.backend == "torchao"
    assert q.bits_per_weight == pytest.approx(bits)
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.packed_tensors().values())
    assert set(dict(q.named_buffers())) == set(q.packed_tensors()), "memory holds exactly what is stored"

    y = q.linear(x, layer.bias)
    assert y.dtype == x.dtype and y.shape == (8, OUT)
    dense = _dense(layer, x)
    assert relative_error(y, dense) < bound
    w, deq = layer.weight.detach().float(), q.dequantize(torch.float32)
    cosine = F.cosine_similarity(deq.flatten(), w.flatten(), dim=0)
    if quant_type == "uint1wo":
        # torchao's asymmetric int1 keeps zero exact, so each group's two levels are 0 and its min or max
        levels = deq.reshape(-1, 64)
        assert all(0.0 in g.unique() and g.unique().numel() <= 2 for g in levels)
        assert cosine > 0.2
    else:
        assert cosine > 0.9

    again = _reload(backend, q)
    assert type(again) is type(q) and again.fmt == q.fmt
    assert torch.equal(again.linear(x, layer.bias), y)
    assert torch.equal(again.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))


MEASURED_AGAINST_TORCHAO = ["int8wo", "int8dq", "float8wo", "float8wo_e4m3", "int4dq", "uint1wo", "uint3wo", "uint4wo",
                            "uint7wo"]


@pytest.mark.parametrize("quant_type", MEASURED_AGAINST_TORCHAO)
def test_output_is_torchaos_own_bit_for_bit(quant_type, layer, x):
    """The stored form (bit planes included) rebuilds the very subclass torchao's quantize_ makes."""
    from torchao.quantization import quantize_

    reference = copy.deepcopy(layer)
    quantize_(reference, TorchAoConfig(quant_type).to_ao_config())
    q = _quantize(quant_type, layer.weight.detach())
    assert torch.equal(q.linear(x, layer.bias), reference(x))
    assert torch.equal(q.dequantize(torch.bfloat16), reference.weight.dequantize())


def test_bitplanes_hold_n_bits_per_weight_and_are_unpacked_per_call(layer, x):
    q = _quantize("uint3wo", layer.weight.detach())
    planes = q.packed_tensors()[tao.BITPLANES]
    assert planes.dtype == torch.uint8 and tuple(planes.shape) == (3, OUT * IN // 8)
    q.linear(x, None)
    assert q._cached is None, "no int8 copy of the codes is kept between calls"
    codes = torch.randint(0, 8, (5, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tao.unpack_bitplanes(tao.pack_bitplanes(codes, 3), 35).reshape(5, 7), codes.to(torch.uint8))


def test_int8_subclass_is_cached_and_follows_the_module_across_to(layer, x):
    q = _quantize("int8wo", layer.weight.detach())
    y = q.linear(x, None)
    assert q._cached is not None
    q.to(torch.device("cpu"))
    q._apply(lambda t: t.clone())
    assert q._cached is None
    assert torch.equal(q.linear(x, None), y)


# --- quantserve's int4 path ---------------------------------------------------------------------------------------

def _fbgemm_int4_row_quantize_zp(x: torch.Tensor, group_size: int):
    """torchao Int4Tensor's quantizer (mslk / fbgemm int4_row_quantize_zp + pack_int4), written out as the spec."""
    to_quant = x.reshape(-1, group_size).to(torch.float)
    max_val = to_quant.amax(dim=1, keepdim=True)
    min_val = to_quant.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-6) / 15
    zeros = min_val + scales * 8
    out = to_quant.sub(min_val).div(scales).round().clamp_(0, 15)
    out = (out - 8).to(dtype=torch.int8).reshape(x.shape)
    packed = torch.bitwise_or(torch.bitwise_and(out[:, ::2], 0xF), torch.bitwise_left_shift(out[:, 1::2], 4))
    return packed, scales.view(x.shape[0], -1).t().contiguous(), zeros.view(x.shape[0], -1).t().contiguous()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_grouped_matches_torchaos_int4_weight_only(layer, group_size):
    w = layer.weight.detach()
    packed = quantize_int4_grouped(w, group_size)
    qdata, scale, zero = _fbgemm_int4_row_quantize_zp(w, group_size)
    assert torch.equal(packed.qdata, qdata)
    assert torch.equal(packed.scale, scale.to(torch.bfloat16))
    assert torch.equal(packed.zero_point, zero.to(torch.bfloat16))
    # w = q * scale + zero with the stored (bf16) scale and zero
    codes = unpack_int4(packed.qdata).float().reshape(OUT, IN // group_size, group_size)
    expect = codes * packed.scale.float().t()[..., None] + packed.zero_point.float().t()[..., None]
    assert torch.equal(dequantize_int4_grouped(packed), expect.reshape(OUT, IN))
    assert relative_error(dequantize_int4_grouped(packed), w) < 0.12


def test_int4_pack_roundtrip_and_validation():
    codes = torch.randint(-8, 8, (3, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    with pytest.raises(ValueError, match="group_size"):
        Int4Grouped(pack_int4(codes), torch.zeros(1, 3), torch.zeros(1, 3), 4)


def test_int4wo_group_size_and_hqq_come_from_the_config(layer, x):
    q = _quantize("int4wo", layer.weight.detach(), group_size=32)
    assert q.meta == {"group_size": 32, "qparams": "minmax"} and q.bits_per_weight == pytest.approx(4 + 32 / 32)
    hqq = _quantize("int4wo", layer.weight.detach(), use_hqq=True)
    assert hqq.fmt == "int4_grouped" and hqq.meta["qparams"] == "hqq" and hqq.meta["group_size"] == 128
    assert relative_error(hqq.linear(x, None), F.linear(x.float(), layer.weight.float())) < 0.15


# --- AOBaseConfig instances, FqnToConfig, modules_to_not_convert, shapes ----------------------------------------

def test_aobaseconfig_instances_and_their_json_form(layer, x):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup

    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(32)))
    q = backend_for(config).quantize("layer", layer.weight.detach())
    assert q.fmt == "torchao:int3_grouped_bitplanes" and q.meta["group_size"] == 32
    assert q.bits_per_weight == pytest.approx(3 + 24 / 32)
    # the form the loader writes into config.json and reads back
    back = quantization_config_from_dict(json.loads(config.to_json_string()))
    again = backend_for(back).from_packed("layer", q.fmt, q.meta, q.packed_tensors(), OUT, IN)
    assert torch.equal(again.linear(x, None), q.linear(x, None))

    grouped = backend_for(TorchAoConfig(Int8WeightOnlyConfig(granularity=PerGroup(32)))).quantize("l", layer.weight)
    assert grouped.fmt == "torchao:int8_grouped" and grouped.meta["group_size"] == 32
    assert relative_error(grouped.linear(x, None), F.linear(x.float(), layer.weight.float())) < 0.02


def test_fqn_to_config_is_resolved_per_layer_as_diffusers_does():
    from torchao.quantization import Float8WeightOnlyConfig, FqnToConfig, Int8WeightOnlyConfig

    with warnings.catch_warnings():  # torchao deprecates '_default'; diffusers still resolves it
        warnings.simplefilter("ignore")
        table = FqnToConfig({"blocks.0.attn.to_q": Float8WeightOnlyConfig(), "re:.*\\.to_k": None,
                             "_default": Int8WeightOnlyConfig()})
    backend = backend_for(TorchAoConfig(table))
    linear = torch.nn.Linear(IN, OUT)
    assert backend.can_quantize("blocks.0.attn.to_k", linear) == (False, "the FqnToConfig maps this layer to no config")
    assert backend.quantize("blocks.0.attn.to_q", linear.weight.detach()).fmt == "torchao:float8_e4m3_rows"
    assert backend.quantize("blocks.0.attn.to_v", linear.weight.detach()).fmt == "torchao:int8_rows"


def test_modules_to_not_convert_uses_diffusers_rule():
    from quantserve.runtime.loader import plan_layers

    backend = backend_for(TorchAoConfig("int8wo", modules_to_not_convert=["proj_out", "attn1.to_q"]))
    attn = torch.nn.ModuleDict({"to_q": torch.nn.Linear(IN, OUT), "to_q2": torch.nn.Linear(IN, OUT)})
    model = torch.nn.ModuleDict({"proj_out": torch.nn.Linear(IN, OUT), "proj_out_1": torch.nn.Linear(IN, OUT),
                                 "blocks": torch.nn.ModuleList([torch.nn.ModuleDict({"attn1": attn})]),
                                 "norm": torch.nn.LayerNorm(4)})
    planned, reasons = plan_layers(model, backend)
    assert reasons["proj_out"] == "skipped ('proj_out' in modules_to_not_convert)"
    assert "modules_to_not_convert" in reasons["blocks.0.attn1.to_q"]
    # a key names a module or one of its parents: proj_out_1 and to_q2 are quantized, as diffusers does
    assert set(planned) == {"proj_out_1", "blocks.0.attn1.to_q2"}
    assert backend.can_quantize("norm", torch.nn.LayerNorm(4)) == (False, "not a Linear layer")


@pytest.mark.parametrize(("quant_type", "kwargs", "shape", "words"), [
    ("int4wo", {}, (64, 96), "not a multiple of group_size 128"),
    ("uint4wo", {"group_size": 64}, (64, 96), "not a multiple of group_size 64"),
    ("int4dq", {}, (64, 48), "not a multiple of group_size 32"),
    ("float8dq", {}, (40, 128), "multiples of 16"),
])
def test_shapes_torchao_cannot_take_stay_dense_with_a_reason(quant_type, kwargs, shape, words):
    backend = backend_for(TorchAoConfig(quant_type, **kwargs))
    ok, why = backend.can_quantize("layer", torch.nn.Linear(shape[1], shape[0]))
    assert not ok and words in why
    with pytest.raises(ConfigValueError, match=words):
        backend.quantize("layer", torch.randn(*shape))


# --- float8 with dynamic activations on a CPU ---------------------------------------------------------------------

def test_float8dq_runs_on_this_cpu_through_scaled_mm(layer, x):
    """torchao's handler refuses CPUs; its Float8Tensor + torch._scaled_mm run here and match an emulation."""
    from torchao.quantization import quantize_
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor

    if not torch.cuda.is_available():
        with pytest.raises(AssertionError, match="compute capability"):
            quantize_(copy.deepcopy(layer), TorchAoConfig("float8dq").to_ao_config())
    q = _quantize("float8dq_e4m3_row", layer.weight.detach())
    w = q.subclass()
    xq = _choose_quant_func_and_quantize_tensor(x, w.act_quant_kwargs)
    emulated = xq.dequantize().float() @ w.dequantize().float().T
    assert relative_error(q.linear(x, None), emulated) < 0.01


def test_float8dq_where_scaled_mm_fails_is_a_clear_error(layer, x, monkeypatch):
    q = _quantize("float8dq", layer.weight.detach())
    monkeypatch.setitem(tao._SCALED_MM_OK, "cpu", "RuntimeError: _scaled_mm not implemented for CPU")
    with pytest.raises(BackendUnavailableError, match="compute capability >= 8.9") as err:
        _quantize("float8dq", layer.weight.detach())
    assert "float8wo" in str(err.value), "names what would work instead"
    with pytest.raises(BackendUnavailableError, match="_scaled_mm"):
        q.linear(x, None)


def test_device_only_torchao_types_raise_before_running(layer, x, monkeypatch):
    q = _quantize("int8wo", layer.weight.detach())
    monkeypatch.setitem(tao._DEVICE_ONLY, "Int8Tensor", (("cuda",), "a CUDA GPU (test)"))
    with pytest.raises(BackendUnavailableError, match="runs on a CUDA GPU \\(test\\) only, not on cpu"):
        q.linear(x, None)


@pytest.mark.parametrize(("quant_type", "damage", "words"), [
    ("int8wo", lambda meta, t: meta["torchao"].update(_type="AffineQuantizedTensor"), "allow-list"),
    ("int8wo", lambda meta, t: meta["torchao"]["_data"]["dtype"].update(_data="load"), "not a torch dtype"),
    ("int8wo", lambda meta, t: t.pop("scale"), "needs tensors"),
    ("int8wo", lambda meta, t: meta.update(shape=[OUT, IN * 2]), "meta says"),
    ("uint3wo", lambda meta, t: t.update({tao.BITPLANES: t[tao.BITPLANES][:2]}), "expected uint8"),
    ("int4wo", lambda meta, t: meta.update(group_size=48), "group_size"),
])
def test_damaged_stored_weights_are_refused_naming_the_layer(layer, quant_type, damage, words):
    q = _quantize(quant_type, layer.weight.detach())
    meta, tensors = copy.deepcopy(q.meta), dict(q.packed_tensors())
    damage(meta, tensors)
    with pytest.raises(CheckpointError, match=words) as err:
        backend_for(TorchAoConfig(quant_type)).from_packed("blocks.0.ff", q.fmt, meta, tensors, OUT, IN)
    assert "'blocks.0.ff'" in str(err.value)


# --- checkpoints torchao/diffusers wrote ---------------------------------------------------------------------------

def _torchao_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> SafetensorsSource:
    """What diffusers' save_pretrained writes for torchao: torchao's flatten_tensor_state_dict into safetensors."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors, metadata = flatten_tensor_state_dict(state)
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    return SafetensorsSource({"*": path}, path)


def test_reads_layers_torchao_flattened_into_safetensors(layer, x, tmp_path):
    from torchao.quantization import quantize_

    modules = {}
    for quant_type in ("int8dq", "uint4wo", "float8wo_e4m3"):
        modules[f"blocks.{quant_type}"] = copy.deepcopy(layer)
        quantize_(modules[f"blocks.{quant_type}"], TorchAoConfig(quant_type).to_ao_config())
    modules["dense"] = copy.deepcopy(layer)
    backend = backend_for(TorchAoConfig("int8wo"))
    with _torchao_checkpoint(tmp_path / "w.safetensors", modules) as source:
        assert "blocks.int8dq._weight_qdata" in source and "blocks.int8dq.weight" not in source
        for name, module in modules.items():
            q = backend.read_checkpoint_layer(name, source)
            if name == "dense":
                assert q is None
                continue
            assert torch.equal(q.linear(x, module.bias), module(x))
        assert backend.read_checkpoint_layer("blocks.uint4wo", source).fmt == "torchao:int4_grouped_bitplanes"


def test_reads_a_torchao_int4tensor_as_int4_grouped(layer, x, tmp_path):
    """A GPU's int4wo checkpoint (Int4Tensor, same layout) becomes int4_grouped without a repack."""
    from torchao.quantization import Int4Tensor

    packed = quantize_int4_grouped(layer.weight.detach(), 64)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(Int4Tensor(packed.qdata, packed.scale, packed.zero_point, [1, 64],
                                                  torch.Size([OUT, IN])), requires_grad=False)
    backend = backend_for(TorchAoConfig("int4wo"))
    with _torchao_checkpoint(tmp_path / "int4.safetensors", {"l": holder}) as source:
        q = backend.read_checkpoint_layer("l", source)
    assert q.fmt == "int4_grouped" and q.meta["group_size"] == 64
    assert torch.equal(q.dequantize(torch.float32), dequantize_int4_grouped(packed))


def test_a_checkpoint_diffusers_wrote_loads_bit_identical_to_diffusers(tmp_path):
    """diffusers quantizes a tiny DiT with torchao and saves it; quantserve's loader gives the same outputs."""
    import diffusers
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    from quantserve.runtime.dummy_inputs import dummy_inputs
    from quantserve.runtime.loader import load_model
    from quantserve.runtime.quant_linear import QuantLinear

    from ..tiny_models import save_tiny

    dense = save_tiny("dit", tmp_path / "dense")
    quant = diffusers.TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
                                    modules_to_not_convert=["proj_out"])
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(dense, quantization_config=quant,
                                                             torch_dtype=torch.bfloat16)
    theirs.save_pretrained(tmp_path / "diffusers-uint4")
    ours = load_model(tmp_path / "diffusers-uint4")
    assert ours.quantserve_report.pre_quantized
    assert isinstance(ours.proj_out_1, QuantLinear), "diffusers quantized proj_out_1 despite 'proj_out'"
    assert ours.proj_out_1.qweight.fmt == "torchao:int4_grouped_bitplanes"
    with torch.no_grad():
        for seed in (0, 1):
            expect = theirs(**dummy_inputs(theirs, seed=seed), return_dict=False)[0]
            assert torch.equal(ours(**dummy_inputs(ours, seed=seed), return_dict=False)[0], expect)


# --- through the loader: quantize on load, save, reload --------------------------------------------------------------

@pytest.mark.parametrize(("quant_type", "kwargs", "bound"), [
    ("int8wo", {}, 0.03), ("float8dq", {}, 0.06),
    ("int4wo", {"group_size": 32}, 0.15), ("uint4wo", {"group_size": 32}, 0.15),
])
def test_load_model_quantizes_saves_and_reloads_bit_identical(tmp_path, quant_type, kwargs, bound):
    from quantserve.runtime.dummy_inputs import dummy_inputs
    from quantserve.runtime.loader import load_model, save_quantized

    from ..tiny_models import save_tiny

    def run(model):
        with torch.no_grad():
            return model(**dummy_inputs(model, seed=2), return_dict=False)[0]

    path = save_tiny("dit", tmp_path / "dit")
    reference = run(load_model(path)).float()
    model = load_model(path, TorchAoConfig(quant_type, modules_to_not_convert=["proj_out_2"], **kwargs))
    report = model.quantserve_report
    kept = {layer.name: layer for layer in report.layers if layer.backend != "torchao"}
    assert set(kept) == {"proj_out_2"} and "modules_to_not_convert" in kept["proj_out_2"].reason
    assert relative_error(run(model), reference) < bound
    again = load_model(save_quantized(model, tmp_path / quant_type))
    assert again.quantserve_report.pre_quantized
    assert [(l.name, l.fmt, l.nbytes) for l in again.quantserve_report.layers] == \
           [(l.name, l.fmt, l.nbytes) for l in report.layers]
    assert torch.equal(run(again), run(model))


def test_float8dq_keeps_128_square_layers_dense_where_torchao_would_fail():
    backend = backend_for(TorchAoConfig("float8dq"))
    ok, why = backend.can_quantize("layer", torch.nn.Linear(128, 128))
    assert not ok and "128x128" in why
    assert backend.can_quantize("layer", torch.nn.Linear(128, 256))[0]
    weight = backend.quantize("layer", torch.randn(256, 128, dtype=torch.bfloat16))
    assert weight.linear(torch.randn(16, 128, dtype=torch.bfloat16), None).shape == (16, 256)
