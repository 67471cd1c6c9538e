"""The optimum-quanto backend on the CPU: int8, float8, int4 and int2 weights through quanto itself, held against the
dense weights, against their own saved form, and against diffusers' own quanto models (quantized on load, and saved
with save_pretrained then loaded again).

Measured on random 64x128 / 64x256 bf16 Linear layers (x @ W.T, relative Frobenius error against the dense weight):
int8 0.007-0.008, float8 0.024-0.029, int4 0.09-0.10, int2 0.49-0.50 (min-max int2 has four levels per group).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from quantserve.runtime import QuantoConfig
from quantserve.runtime.backends.base import backend_for
from quantserve.runtime.backends.quanto import QuantoBackend, QuantoWeight
from quantserve.runtime.compare import relative_error
from quantserve.runtime.dummy_inputs import dummy_inputs
from quantserve.runtime.loader import load_model, load_report, save_quantized
from quantserve.runtime.model_files import CheckpointError, SafetensorsSource
from quantserve.runtime.quant_linear import QuantLinear, reference_kernel

from ..tiny_models import save_tiny

WEIGHTS = ["int8", "float8", "int4", "int2"]
# relative output error against the dense layer: 8-bit held tighter than 4-bit, 4-bit tighter than 2-bit
TOLERANCE = {"int8": 0.015, "float8": 0.05, "int4": 0.15, "int2": 0.6}
# bits per weight from the bytes: codes, plus a bf16 scale (and a bf16 shift for int4/int2) per row or group of 128
BITS = {"int8": 8, "float8": 8, "int4": 4, "int2": 2}
# diffusers' quanto matches a layer's own name: proj_out_2 stays dense, proj_out_1 is quantized (no layer is "proj_out")
SKIP = ["proj_out", "proj_out_2"]
QUANTIZED_DIT_LAYERS = 10  # the tiny DiT's 11 Linear layers, less proj_out_2


@pytest.fixture(autouse=True)
def _quiet_quanto_deprecation():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _backend(weights: str, skip: list[str] | None = None) -> QuantoBackend:
    backend = backend_for(QuantoConfig(weights_dtype=weights, modules_to_not_convert=skip), torch.bfloat16)
    assert isinstance(backend, QuantoBackend)
    return backend


def _qlinear_type():
    from optimum.quanto import QLinear

    return QLinear


def _diffusers_model(path: Path, weights: str | None = None) -> nn.Module:
    """diffusers' own quanto model: the saved checkpoint (weights=None) or the dense one quantized on load."""
    from diffusers import DiTTransformer2DModel
    from diffusers import QuantoConfig as DiffusersQuantoConfig

    config = None if weights is None else DiffusersQuantoConfig(weights_dtype=weights,
                                                                 modules_to_not_convert=list(SKIP))
    model = DiTTransformer2DModel.from_pretrained(path, quantization_config=config, torch_dtype=torch.bfloat16)
    # torch 2.13's CPU `_weight_int8pack_mm` (quanto's int8 kernel) segfaults on weights at the unaligned addresses
    # tensors read from safetensors have; a copy keeps every value and lets diffusers' own model run at all.
    for module in model.modules():
        if isinstance(module, _qlinear_type()) and module.weight._data.dtype == torch.int8:
            module.weight._data = module.weight._data.clone()
    return model


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**dummy_inputs(model, batch=2, seed=0, dtype=torch.bfloat16), return_dict=False)[0]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    # width 32: Linear layers of 32, 128 and 256 inputs (timestep_embedder.linear_1: int4/int2 in groups of 128)
    return save_tiny("dit", tmp_path_factory.mktemp("quanto") / "dense", width=32)


@pytest.fixture(scope="module")
def diffusers_dirs(dense_dir, tmp_path_factory) -> dict[str, Path]:
    """The dense DiT quantized by diffusers (QuantoConfig) and written with save_pretrained, per weights dtype."""
    root = tmp_path_factory.mktemp("diffusers_quanto")
    for weights in WEIGHTS:
        _diffusers_model(dense_dir, weights).save_pretrained(root / weights)
    return {weights: root / weights for weights in WEIGHTS}


@pytest.fixture(scope="module")
def bf16_output(dense_dir) -> torch.Tensor:
    return _run(load_model(dense_dir))


# --- one random Linear layer ----------------------------------------------------------------------------------

def _random_layer(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(torch.bfloat16)
    x = torch.randn(4, 8, shape[1], generator=gen).to(torch.bfloat16)  # 32 rows
    return weight, x


@pytest.mark.parametrize("shape", [(64, 128), (64, 256)])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_random_linear_error_bytes_and_format(weights, shape):
    weight, x = _random_layer(shape)
    q = _backend(weights).quantize("layer", weight)
    dense = torch.nn.functional.linear(x.float(), weight.float())
    y = q.linear(x, None)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 8, shape[0])
    assert relative_error(y, dense) < TOLERANCE[weights]
    # the native path and the torch reference (quanto's dequantize, then a matmul) agree to bf16 rounding
    assert relative_error(y, reference_kernel(x, q, None)) < 0.01
    assert relative_error(q.dequantize(torch.float32), weight.float()) < TOLERANCE[weights]

    out_features, in_features = shape
    bits = BITS[weights]
    grouped = bits < 8 and in_features > 128  # quanto's QLinear: groups of 128 only for rows longer than 128
    scale_rows = out_features * in_features // 128 if grouped else out_features
    expected = out_features * in_features * bits // 8 + scale_rows * 2 * (1 if bits == 8 else 2)
    assert q.nbytes == expected
    assert q.bits_per_weight == pytest.approx(8 * expected / (out_features * in_features))
    assert q.meta["group_size"] == (128 if grouped else None)
    assert q.fmt == ("quanto:" + weights if bits == 8 else f"quanto:{weights}_grouped")
    assert sorted(q.packed_tensors()) == (["data", "scale"] if bits == 8 else ["data", "scale", "shift"])
    # quanto's own kernel choice on the CPU: TinyGemm for bf16 int4 in groups of 128, else the generic tensors
    native = "TinyGemmWeightQBitsTensor" if weights == "int4" and grouped else (
        "WeightQBytesTensor" if bits == 8 else "WeightQBitsTensor")
    assert q.native_path == native


def test_errors_shrink_with_more_bits():
    weight, x = _random_layer((64, 256), seed=1)
    dense = torch.nn.functional.linear(x.float(), weight.float())
    errors = {w: relative_error(_backend(w).quantize("layer", weight).linear(x, None), dense) for w in WEIGHTS}
    assert errors["int8"] < errors["float8"] < errors["int4"] < errors["int2"]


def test_quantize_is_quantos_qlinear():
    """The weight quantserve makes is the weight quanto's QLinear.freeze() makes, tensor for tensor."""
    from optimum.quanto import qint4

    weight, x = _random_layer((64, 256), seed=2)
    layer = nn.Linear(256, 64, bias=False, dtype=torch.bfloat16)
    layer.weight.data.copy_(weight)
    qlinear = _qlinear_type().from_module(layer, weights=qint4)
    qlinear.freeze()
    theirs: dict[str, torch.Tensor] = {}
    qlinear.weight.save_to_state_dict(theirs, "", keep_vars=False)
    ours = _backend("int4").quantize("layer", weight)
    assert torch.equal(ours.data, theirs["_data._data"]) and torch.equal(ours.scale, theirs["_scale"])
    assert torch.equal(ours.linear(x, None), qlinear(x))


@pytest.mark.parametrize("weights", WEIGHTS)
def test_save_then_from_packed_is_bit_identical(weights):
    from safetensors.torch import load, save

    weight, x = _random_layer((96, 384), seed=3)
    bias = torch.randn(96).to(torch.bfloat16)
    backend = _backend(weights)
    q = backend.quantize("blocks.0.ff", weight)
    # as the loader saves it: the packed tensors in safetensors, fmt and meta as JSON in the header
    blob = save({f"blocks.0.ff.qweight.{k}": v for k, v in q.packed_tensors().items()},
                metadata={"layer": json.dumps({"fmt": q.fmt, "meta": q.meta})})
    stored = {k.rpartition(".")[2]: v for k, v in load(blob).items()}
    header = json.loads(json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["layer"])
    again = backend.from_packed("blocks.0.ff", header["fmt"], header["meta"], stored, 96, 384)
    for name, tensor in q.packed_tensors().items():
        other = again.packed_tensors()[name]
        assert other.dtype == tensor.dtype and torch.equal(other.view(torch.uint8), tensor.view(torch.uint8))
    assert torch.equal(again.linear(x, bias), q.linear(x, bias))
    assert torch.equal(again.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    layer = QuantLinear(again, bias, compute_dtype=torch.bfloat16)
    assert torch.equal(layer(x), q.linear(x, bias))
    with pytest.raises(CheckpointError, match="meta.shape"):
        backend.from_packed("blocks.0.ff", header["fmt"], header["meta"], stored, 96, 256)
    with pytest.raises(CheckpointError, match="fmt"):
        backend.from_packed("blocks.0.ff", "quanto:something", header["meta"], stored, 96, 384)


def test_damaged_packed_tensors_are_refused():
    q = _backend("int4").quantize("layer", _random_layer((64, 128))[0])
    tensors = q.packed_tensors()
    with pytest.raises(ValueError, match="data is uint8"):
        QuantoWeight({**tensors, "data": tensors["data"][:-1]}, q.meta)
    with pytest.raises(ValueError, match="needs exactly"):
        QuantoWeight({k: v for k, v in tensors.items() if k != "shift"}, q.meta)
    with pytest.raises(ValueError, match="meta.qtype"):
        QuantoWeight(tensors, {**q.meta, "qtype": "qint3"})


def test_int8_runs_where_torchs_cpu_kernel_would_crash():
    """torch._weight_int8pack_mm (quanto's CPU int8 kernel) segfaults on unaligned tensors and on in_features that are
    not a multiple of 16; the weight keeps aligned buffers and routes those cases safely."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 8, generator=gen).to(torch.bfloat16)  # in_features 8: quanto's generic int8 matmul
    q = _backend("int8").quantize("layer", weight)
    x = torch.randn(32, 8, generator=gen).to(torch.bfloat16)
    assert relative_error(q.linear(x, None), x.float() @ weight.float().T) < TOLERANCE["int8"]
    storage = torch.empty(64 * 64 + 1, dtype=torch.int8)  # a weight one byte off alignment, as safetensors gives
    data = storage[1:].view(64, 64)
    data.copy_(torch.randint(-127, 128, (64, 64), generator=gen, dtype=torch.int8))
    tensors = {"data": data, "scale": torch.full((64, 1), 0.01, dtype=torch.bfloat16)}
    w = QuantoWeight(tensors, {"qtype": "qint8", "axis": 0, "group_size": None, "block": 64, "shape": [64, 64]})
    assert w.data.data_ptr() % 64 == 0 and torch.equal(w.data, data)
    x = torch.randn(33 * 64 + 1, generator=gen).to(torch.bfloat16)[1:].view(33, 64)  # an unaligned input too
    assert relative_error(w.linear(x, None), x.float() @ w.dequantize().T) < 0.01


def test_int4_falls_back_to_quantos_generic_tensor_where_tinygemm_cannot_pack(caplog):
    weight, x = _random_layer((24, 256))  # TinyGemm's CPU packing needs out_features % 16 == 0
    q = _backend("int4").quantize("layer", weight)
    with caplog.at_level("WARNING", logger="quantserve.runtime.backends.quanto"):
        y = q.linear(x, None)
    assert q.native_path == "WeightQBitsTensor" and "generic path" in caplog.text
    assert torch.equal(y, reference_kernel(x, q, None))


def test_moving_the_weight_rebuilds_quantos_tensor():
    weight, x = _random_layer((64, 256))
    q = _backend("int4").quantize("layer", weight)
    y = q.linear(x, None)
    q.to("cpu")
    assert q._native is None and torch.equal(q.linear(x, None), y)


# --- modules_to_not_convert -----------------------------------------------------------------------------------

def test_modules_to_not_convert_match_a_layers_own_name_as_diffusers_does():
    backend = _backend("int8", ["proj_out", "to_q"])
    linear = nn.Linear(32, 32, device="meta")
    assert backend.skip_patterns() == []  # a substring match would differ from diffusers (proj_out_1 vs proj_out)
    ok, why = backend.can_quantize("transformer_blocks.0.attn1.to_q", linear)
    assert not ok and "'to_q' in modules_to_not_convert" in why
    assert backend.can_quantize("proj_out", linear)[0] is False
    assert backend.can_quantize("proj_out_1", linear) == (True, "")
    assert backend.can_quantize("transformer_blocks.0.attn1.to_k", linear) == (True, "")
    assert backend.can_quantize("pos_embed.proj", nn.Conv2d(1, 2, 2, device="meta"))[0] is False


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantize_on_load_honours_modules_to_not_convert_like_diffusers(dense_dir, weights):
    skip = ["proj_out_2", "to_q"]
    ours = load_model(dense_dir, QuantoConfig(weights_dtype=weights, modules_to_not_convert=skip))
    from diffusers import DiTTransformer2DModel
    from diffusers import QuantoConfig as DiffusersQuantoConfig

    theirs = DiTTransformer2DModel.from_pretrained(
        dense_dir, quantization_config=DiffusersQuantoConfig(weights_dtype=weights, modules_to_not_convert=list(skip)),
        torch_dtype=torch.bfloat16)
    quantized = {n for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {n for n, m in theirs.named_modules() if isinstance(m, _qlinear_type())}
    assert "proj_out_1" in quantized and len(quantized) == 9
    kept = {n for n, m in ours.named_modules() if type(m) is nn.Linear}
    assert kept == {"proj_out_2", "transformer_blocks.0.attn1.to_q"}
    reasons = {layer.name: layer.reason for layer in load_report(ours).layers}
    assert "modules_to_not_convert" in reasons["proj_out_2"]


# --- checkpoints diffusers wrote ------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", WEIGHTS)
def test_the_layout_diffusers_writes(diffusers_dirs, weights):
    layer = "transformer_blocks.0.ff.net.2"  # 32 x 128
    with SafetensorsSource.for_directory(diffusers_dirs[weights]) as source:
        keys = {k for k in source.keys() if k.startswith(layer + ".")}
        if weights in ("int8", "float8"):
            assert keys == {f"{layer}.{k}" for k in ("weight._data", "weight._scale", "bias", "input_scale",
                                                      "output_scale")}
            code_dtype = torch.int8 if weights == "int8" else torch.float8_e4m3fn
            assert source.get(f"{layer}.weight._data").dtype == code_dtype
            assert source.shape(f"{layer}.weight._data") == (32, 128)
        else:
            assert keys == {f"{layer}.{k}" for k in ("weight._data._data", "weight._scale", "weight._shift", "bias",
                                                      "input_scale", "output_scale")}
            assert source.get(f"{layer}.weight._data._data").dtype == torch.uint8
            assert source.shape(f"{layer}.weight._data._data") == (32 * BITS[weights] // 8, 128)  # rows packed
            assert source.shape(f"{layer}.weight._shift") == (32, 1)
        assert source.shape(f"{layer}.weight._scale") == (32, 1) and source.shape(f"{layer}.input_scale") == ()
        assert "proj_out_2.weight" in source and "proj_out_1.weight._scale" in source


@pytest.mark.parametrize("weights", WEIGHTS)
def test_read_checkpoint_layer_equals_diffusers_layer(diffusers_dirs, weights):
    theirs = _diffusers_model(diffusers_dirs[weights])
    backend = _backend(weights)  # nothing planned: shapes of grouped layers come from their bias
    gen = torch.Generator().manual_seed(5)
    checked = 0
    with SafetensorsSource.for_directory(diffusers_dirs[weights]) as source, torch.no_grad():
        for name, module in theirs.named_modules():
            if isinstance(module, _qlinear_type()):
                q = backend.read_checkpoint_layer(name, source)
                assert isinstance(q, QuantoWeight) and (q.out_features, q.in_features) == tuple(module.weight.shape)
                x = torch.randn(2, 16, module.in_features, generator=gen).to(torch.bfloat16)
                assert torch.equal(q.linear(x, module.bias), module(x)), name
                assert torch.equal(q.dequantize(torch.bfloat16), module.weight.dequantize()), name
                assert q.meta["optimized"] is False  # diffusers runs a loaded checkpoint on quanto's generic tensors
                checked += 1
            elif isinstance(module, nn.Linear):
                assert backend.read_checkpoint_layer(name, source) is None  # stored dense
    assert checked == QUANTIZED_DIT_LAYERS


def test_grouped_layer_without_bias_needs_its_planned_shape(tmp_path):
    from safetensors.torch import save_file

    q = _backend("int4").quantize("layer", _random_layer((64, 256))[0])  # 128 groups of 128: (64, 256) or (128, 128)?
    save_file({"blk.weight._data._data": q.data, "blk.weight._scale": q.scale, "blk.weight._shift": q.shift,
               "blk.input_scale": torch.ones(()), "blk.output_scale": torch.ones(())}, str(tmp_path / "w.safetensors"))
    with SafetensorsSource.for_directory(tmp_path) as source:
        with pytest.raises(CheckpointError, match="cannot be read from its tensors"):
            _backend("int4").read_checkpoint_layer("blk", source)
        planned = _backend("int4")
        assert planned.can_quantize("blk", nn.Linear(256, 64, bias=False, device="meta")) == (True, "")
        read = planned.read_checkpoint_layer("blk", source)
        assert read.meta["group_size"] == 128 and torch.equal(read.dequantize(), q.dequantize())
        assert _backend("int4").read_checkpoint_layer("blk", source, shape=(64, 256)).meta["shape"] == [64, 256]
        assert _backend("int4").checkpoint_keys("blk", source) == [
            "blk.weight._data._data", "blk.weight._scale", "blk.weight._shift", "blk.input_scale", "blk.output_scale"]


def test_checkpoints_quantserve_cannot_run_faithfully_are_refused(tmp_path):
    from safetensors.torch import save_file

    data = torch.randint(-127, 128, (32, 32), dtype=torch.int8)
    save_file({"a.weight._data": data, "a.weight._scale": torch.ones(32, 1), "a.input_scale": torch.tensor(0.5),
               "b.weight._data": data.clone(), "b.weight._scale": torch.ones(32, 1)}, str(tmp_path / "w.safetensors"))
    with SafetensorsSource.for_directory(tmp_path) as source:
        with pytest.raises(CheckpointError, match="quantized activations"):
            _backend("int8").read_checkpoint_layer("a", source)
        with pytest.raises(CheckpointError, match="not how quanto stores int4"):
            _backend("int4").read_checkpoint_layer("b", source)
        assert _backend("int8").read_checkpoint_layer("b", source).meta["shape"] == [32, 32]
        assert _backend("int8").read_checkpoint_layer("c", source) is None


# --- end to end through the loader ----------------------------------------------------------------------------

NATIVE = {"force": {"*": "native"}}  # quanto's own kernels: outputs comparable bit for bit with diffusers'


@pytest.mark.parametrize("weights", WEIGHTS)
def test_load_model_reads_diffusers_checkpoint_bit_identically(diffusers_dirs, bf16_output, weights):
    ours = load_model(diffusers_dirs[weights], kernel_policy=NATIVE)
    report = load_report(ours)
    assert report.pre_quantized and report.backend == "quanto"
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == QUANTIZED_DIT_LAYERS and all(m.backend == "quanto" for m in layers)
    assert type(ours.get_submodule("proj_out_2")) is nn.Linear
    out = _run(ours)
    assert torch.equal(out, _run(_diffusers_model(diffusers_dirs[weights])))  # identical, not merely close
    assert relative_error(out, bf16_output) < TOLERANCE[weights]
    routed = _run(load_model(diffusers_dirs[weights]))  # the router's kernels: the same numbers, summed otherwise
    assert relative_error(routed, out) < 1e-2


@pytest.mark.parametrize("weights", WEIGHTS)
def test_quantize_on_load_then_save_matches_diffusers(dense_dir, tmp_path, weights):
    ours = load_model(dense_dir, QuantoConfig(weights_dtype=weights, modules_to_not_convert=list(SKIP)),
                      kernel_policy=NATIVE)
    out = _run(ours)
    assert torch.equal(out, _run(_diffusers_model(dense_dir, weights)))  # diffusers quantizing on load: identical
    again = load_model(save_quantized(ours, tmp_path / "saved"), kernel_policy=NATIVE)
    assert load_report(again).pre_quantized
    assert torch.equal(_run(again), out)
