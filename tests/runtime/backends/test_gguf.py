"""GGUF: quantizers, GGUFSource / write_gguf, GGUFWeight, the backend, and .gguf files through load_model."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT

from quantserve.kernels.gguf import QUANTIZED_TYPES, block_size, dequantize_gguf
from quantserve.runtime.backends import QuantizedWeight, backend_for
from quantserve.runtime.backends.gguf import GGUFBackend, GGUFWeight
from quantserve.runtime.compare import relative_error
from quantserve.runtime.config import GGUFQuantizationConfig
from quantserve.runtime.dummy_inputs import dummy_inputs
from quantserve.runtime.gguf_file import GGUFSource, write_gguf
from quantserve.runtime.gguf_quantize import GGUF_PY_TYPES, quantize_gguf, quantizer_of
from quantserve.runtime.loader import load_model, load_report, save_quantized
from quantserve.runtime.model_files import CheckpointError
from quantserve.runtime.quant_linear import QuantLinear
from quantserve.runtime.schemes import SCHEMES

from ..tiny_models import save_tiny

# relative RMS error of quantize -> dequantize on Gaussian weights (measured: Q8_0 0.005, Q6_K 0.018, Q5_K 0.036,
# Q5_1 0.038, Q5_0 0.043, Q4_K 0.072, IQ4_NL/XS 0.076, Q4_1 0.078, Q4_0 0.086, Q3_K 0.153, Q2_K 0.299)
WEIGHT_ERROR = {"Q8_0": 0.008, "Q6_K": 0.025, "Q5_K": 0.045, "Q5_1": 0.05, "Q5_0": 0.055, "Q4_K": 0.085,
                "IQ4_NL": 0.09, "IQ4_XS": 0.09, "Q4_1": 0.095, "Q4_0": 0.1, "Q3_K": 0.18, "Q2_K": 0.33,
                "BF16": 0.005}
# relative error of a layer's output against the dense layer: Q8_0 tight, 4-bit looser, Q2_K loosest
LINEAR_ERROR = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.05, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_K": 0.1, "Q4_0": 0.12,
                "Q4_1": 0.12, "IQ4_NL": 0.1, "IQ4_XS": 0.1, "Q3_K": 0.2, "Q2_K": 0.35, "BF16": 0.005}
ALL_TYPES = (*QUANTIZED_TYPES, "BF16")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The quantizers run many small ops: on a busy 2-core machine, two threads spin against each other and take
    5x longer than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


# --- quantizers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_quantize_decodes_with_gguf_py_and_error_is_small(qtype):
    w = _weight(24, 512)
    raw = quantize_gguf(w, qtype)
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (24, 512 // block_size(qtype) * gguf.GGML_QUANT_SIZES[GT[qtype]][1])
    theirs = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), GT[qtype]))
    ours = dequantize_gguf(raw, qtype, w.shape)
    assert torch.equal(theirs, ours)
    assert _rel_rms(ours, w) < WEIGHT_ERROR[qtype]


def test_which_code_quantizes_what():
    assert set(GGUF_PY_TYPES) == {"BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}
    assert {t for t in ALL_TYPES if quantizer_of(t) == "quantserve"} == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
    for qtype in GGUF_PY_TYPES:  # gguf-py's own quantizer, byte for byte
        w = _weight(4, 64, seed=1)
        assert np.array_equal(quantize_gguf(w, qtype).numpy(), gguf.quants.quantize(w.numpy(), GT[qtype]))


def test_k_quants_beat_the_legacy_types_of_their_width():
    w = _weight(32, 1024, seed=2)

    def err(qtype: str) -> float:
        return _rel_rms(dequantize_gguf(quantize_gguf(w, qtype), qtype, w.shape), w)

    assert err("Q4_K") < err("Q4_0") and err("Q5_K") < err("Q5_0") and err("Q6_K") < err("Q8_0") * 4
    assert err("Q2_K") > err("Q3_K") > err("Q4_K") > err("Q5_K") > err("Q6_K")


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"])
def test_own_quantizers_on_awkward_rows(qtype):
    cols = 256
    rows = torch.stack([
        torch.zeros(cols),                                   # all zero
        torch.full((cols,), 0.5),                            # constant positive
        torch.full((cols,), -0.25),                          # constant negative
        torch.where(torch.arange(cols) == 7, 3.0, 0.001),   # one outlier
        torch.linspace(0, 1, cols),                          # all >= 0
        -torch.linspace(0, 2, cols),                         # all <= 0
        _weight(1, cols, seed=4)[0] * 1e4,                   # large
    ])
    out = dequantize_gguf(quantize_gguf(rows, qtype), qtype, rows.shape)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(cols))
    assert (out[1:] - rows[1:]).abs().amax() <= rows[1:].abs().amax() * 0.7
    assert _rel_rms(out[6], rows[6]) < WEIGHT_ERROR[qtype]
    assert (out[3, 7] - 3.0).abs() < 0.5  # the outlier survives


def test_quantize_refuses_what_blocks_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_gguf(torch.zeros(2, 300), "Q4_K")
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_gguf(torch.full((1, 32), float("nan")), "Q8_0")
    with pytest.raises(ValueError, match="accepted"):
        quantize_gguf(torch.zeros(1, 256), "IQ2_XXS")


# --- reading and writing .gguf files ------------------------------------------------------------------------------

def _raw_file_tensors() -> dict[str, tuple[np.ndarray, GT | None, tuple[int, ...]]]:
    """name -> (array for GGUFWriter.add_tensor, raw_dtype, torch shape): every type, non-square shapes."""
    out = {}
    for i, qtype in enumerate(QUANTIZED_TYPES):
        shape = (3 + i, 2 * block_size(qtype))
        out[f"blocks.{i}.{qtype.lower()}.weight"] = (quantize_gguf(_weight(*shape, seed=i), qtype).numpy(), GT[qtype], shape)
    dense = _weight(5, 7, seed=20)
    out["norm.bf16"] = (dense.to(torch.bfloat16).view(torch.uint8).numpy(), GT.BF16, (5, 7))
    out["norm.f16"] = (dense.half().numpy(), None, (5, 7))
    out["norm.f32"] = (_weight(2, 3, seed=21).reshape(2, 3, 1).expand(2, 3, 4).contiguous().numpy(), None, (2, 3, 4))
    out["bias"] = (_weight(1, 9, seed=22)[0].numpy(), None, (9,))
    return out


@pytest.fixture(scope="module")
def ggml_file(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "all_types.gguf"
    tensors = _raw_file_tensors()
    writer = gguf.GGUFWriter(path, "quantserve")
    writer.add_string("quantserve.note", "written by gguf-py")
    writer.add_uint32("quantserve.answer", 42)
    for name, (array, raw_dtype, _) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_source_reads_every_type_with_torch_shapes(ggml_file):
    path, tensors = ggml_file
    with GGUFSource(path) as source:
        assert sorted(source.keys()) == sorted(tensors)
        meta = source.metadata()
        assert meta["general.architecture"] == "quantserve"
        assert meta["quantserve.note"] == "written by gguf-py" and meta["quantserve.answer"] == "42"
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            array, raw_dtype, shape = tensors[t.name]
            assert source.shape(t.name) == shape == tuple(reversed(t.shape.tolist()))  # ggml stores dims reversed
            assert source.qtype(t.name) == t.tensor_type.name
            dense = source.get(t.name)
            assert tuple(dense.shape) == shape
            expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            assert np.array_equal(dense.float().numpy(), expected), t.name
            if t.tensor_type.name in QUANTIZED_TYPES:
                raw, qtype, raw_shape = source.raw(t.name)
                assert source.is_quantized(t.name) and qtype == t.tensor_type.name and raw_shape == shape
                assert raw.dtype == torch.uint8 and np.array_equal(raw.numpy(), array)
                assert dense.dtype == torch.float32
            else:
                assert not source.is_quantized(t.name)
        assert source.get("norm.bf16").dtype == torch.bfloat16 and source.get("norm.f16").dtype == torch.float16
        assert source.get("norm.f32").dtype == torch.float32
        with pytest.raises(CheckpointError, match="has no tensor 'nope'"):
            source.get("nope")


def test_write_gguf_round_trips_and_gguf_py_agrees(tmp_path):
    w = _weight(48, 256, seed=3)
    tensors = {
        "a.weight": (w, "Q4_K"),                                                # dense -> quantized
        "b.weight": (quantize_gguf(w, "Q8_0"), "Q8_0"),                         # raw, (rows, bytes)
        "c.weight": (quantize_gguf(w, "Q6_K").reshape(-1), "Q6_K", (48, 256)),  # raw, flat + shape
        "d.bias": (w[0].to(torch.bfloat16), None),
        "e.scale": (torch.tensor(2.5), None),
        "f.ids": (torch.arange(6).reshape(2, 3), None),
        "g.half": (w[:3, :5], "F16"),
    }
    path = write_gguf(tmp_path / "m.gguf", tensors, {"quantserve.class_name": "X", "n": 3, "ok": True, "l": [1, 2]})
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary left behind
    reader = gguf.GGUFReader(path)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == {
        "a.weight": "Q4_K", "b.weight": "Q8_0", "c.weight": "Q6_K", "d.bias": "BF16", "e.scale": "F32",
        "f.ids": "I64", "g.half": "F16"}
    assert [int(d) for d in reader.tensors[0].shape] == [256, 48]
    with GGUFSource(path) as source:
        assert source.shape("a.weight") == (48, 256) and source.shape("e.scale") == ()
        assert torch.equal(source.raw("a.weight")[0], quantize_gguf(w, "Q4_K"))
        assert torch.equal(source.raw("c.weight")[0], quantize_gguf(w, "Q6_K"))
        assert torch.equal(source.get("d.bias"), w[0].to(torch.bfloat16))
        assert source.get("e.scale").item() == 2.5
        assert torch.equal(source.get("f.ids"), torch.arange(6).reshape(2, 3))
        assert torch.equal(source.get("g.half"), w[:3, :5].half())
        assert source.metadata()["n"] == "3" and source.metadata()["l"] == "[1, 2]"
    with pytest.raises(ValueError, match="do not make shape"):
        write_gguf(tmp_path / "bad.gguf", {"x": (torch.zeros(10, dtype=torch.uint8), "Q4_0", (1, 32))})
    assert not (tmp_path / "bad.gguf").exists()


def test_truncated_and_damaged_files_raise_checkpoint_error(tmp_path, ggml_file):
    path, _ = ggml_file
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    cases = {
        "empty": b"",
        "header": data[:12],
        "kv": data[:100],
        "tensor-data": data[:last.data_offset + last.n_bytes - 1],
        "magic": b"GGML" + data[4:],
        "counts": data[:8] + (10**12).to_bytes(8, "little") + data[16:],
    }
    for label, content in cases.items():
        bad = tmp_path / f"{label}.gguf"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=str(bad)):
            GGUFSource(bad)
    with pytest.raises(CheckpointError, match=f"tensor '{last.name}'.*truncated"):
        GGUFSource(tmp_path / "tensor-data.gguf")
    middle = sorted(reader.tensors, key=lambda t: t.data_offset)[len(reader.tensors) // 2]
    (tmp_path / "mid.gguf").write_bytes(data[:middle.data_offset + 1])
    with pytest.raises(CheckpointError, match=f"tensor '{middle.name}'"):
        GGUFSource(tmp_path / "mid.gguf")
    with pytest.raises(CheckpointError, match="no such"):
        GGUFSource(tmp_path / "missing.gguf")


def test_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", {"x": (torch.ones(4), None)})
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(path, {"x": (torch.zeros(4), None)})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.gguf"]


# --- GGUFWeight and the backend ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_gguf_weight_linear_close_to_dense(qtype):
    w, x, bias = _weight(64, 512, seed=5), _weight(3, 512, seed=6) * 50, _weight(1, 64, seed=7)[0] * 0.5
    q = GGUFWeight(quantize_gguf(w, qtype), qtype, w.shape)
    assert q.fmt == f"gguf:{qtype}" and q.meta == {"qtype": qtype, "shape": [64, 512]} and q.backend == "gguf"
    assert torch.equal(q.dequantize(), dequantize_gguf(q.data, qtype, (64, 512)))
    dense = torch.nn.functional.linear(x, w, bias)
    assert relative_error(q.linear(x, bias), dense) < LINEAR_ERROR[qtype]
    y16 = q.linear(x.bfloat16(), bias)
    assert y16.dtype == torch.bfloat16 and relative_error(y16, dense) < LINEAR_ERROR[qtype] + 0.01


def test_gguf_weight_bits_bytes_and_dtype_moves():
    w = _weight(16, 256)
    expected_bits = {"Q8_0": 8.5, "Q4_0": 4.5, "Q4_K": 4.5, "Q6_K": 6.5625, "Q2_K": 2.625, "IQ4_XS": 4.25}
    for qtype, bits in expected_bits.items():
        q = GGUFWeight(quantize_gguf(w, qtype), qtype, w.shape)
        assert q.bits_per_weight == bits and set(q.packed_tensors()) == {"data"}
    q.to(torch.bfloat16)  # a model-wide dtype change leaves the blocks alone
    assert q.data.dtype == torch.uint8
    with pytest.raises(ValueError, match="do not make"):
        GGUFWeight(torch.zeros(10, dtype=torch.uint8), "Q4_K", (16, 256))


def _backend(gguf_type: str | None = None) -> GGUFBackend:
    options = {"gguf_type": gguf_type} if gguf_type else {}
    backend = backend_for(GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch.bfloat16, **options)
    assert isinstance(backend, GGUFBackend) and backend.writes_own_checkpoint()
    return backend


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-q6_k"])
def test_quantize_for_each_gguf_scheme(scheme):
    qtype = SCHEMES[scheme].gguf_type
    backend = _backend(qtype)
    w = _weight(32, 256, seed=6).to(torch.bfloat16)
    q = backend.quantize("blocks.0.proj", w)
    assert isinstance(q, GGUFWeight) and q.qtype == qtype and q.bits_per_weight == SCHEMES[scheme].bits
    assert torch.equal(q.data, quantize_gguf(w, qtype))
    assert _rel_rms(q.dequantize(), w) < WEIGHT_ERROR[qtype]
    ok, why = backend.can_quantize("layer", torch.nn.Linear(block_size(qtype) * 3, 8))
    assert ok and why == ""
    ok, why = backend.can_quantize("layer", torch.nn.Linear(block_size(qtype) + 16, 8))
    assert not ok and f"block size {block_size(qtype)}" in why and "dense" in why


def test_backend_without_gguf_type():
    backend = _backend()
    assert backend.can_quantize("layer", torch.nn.Linear(48, 8)) == (True, "")  # a .gguf decides per tensor
    assert backend.can_quantize("norm", torch.nn.LayerNorm(8))[0] is False
    with pytest.raises(ValueError, match="gguf-q4_k"):
        backend.quantize("layer", torch.zeros(8, 256))
    with pytest.raises(ValueError, match="gguf_type='Q9_9'.*accepted"):
        _backend("Q9_9").can_quantize("layer", torch.nn.Linear(256, 8))


def test_read_checkpoint_layer_shares_the_file_mapping(ggml_file):
    path, tensors = ggml_file
    backend = _backend()
    with GGUFSource(path) as source:
        q = backend.read_checkpoint_layer("blocks.7.q4_k", source)
        assert isinstance(q, GGUFWeight) and q.qtype == "Q4_K" and (q.out_features, q.in_features) == tensors["blocks.7.q4_k.weight"][2]
        assert q.data.data_ptr() == source.raw("blocks.7.q4_k.weight")[0].data_ptr()  # no copy
        assert torch.equal(q.dequantize(), source.get("blocks.7.q4_k.weight"))
        assert backend.read_checkpoint_layer("norm", source) is None       # no norm.weight
        source_keys = set(source.keys())
    assert "norm.bf16" in source_keys


def test_read_checkpoint_layer_leaves_dense_weights_and_other_sources_to_the_loader(tmp_path):
    w = _weight(8, 32)
    path = write_gguf(tmp_path / "m.gguf", {"a.weight": (w, "F32"), "b.weight": (w, "BF16"), "c.weight": (w, "F16"),
                                             "d.weight": (w, "Q8_0")})
    backend = _backend()
    with GGUFSource(path) as source:
        assert [backend.read_checkpoint_layer(n, source) is None for n in "abcd"] == [True, True, True, False]
    assert backend.read_checkpoint_layer("d", object()) is None


def test_save_checkpoint_then_reload_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                                torch.nn.LayerNorm(32))
    model[3].to(torch.bfloat16)
    backend = _backend("Q4_K")
    q0 = QuantLinear(backend.quantize("0", model[0].weight.detach()), model[0].bias.detach(), torch.float32)
    q2 = QuantLinear(_backend("Q8_0").quantize("2", model[2].weight.detach()), None)
    model[0], model[2] = q0, q2
    x = torch.randn(4, 256)
    expected = model[2](model[1](model[0](x)))
    assert backend.save_checkpoint(model, tmp_path) == ["model.gguf"]
    with GGUFSource(tmp_path / "model.gguf") as source:
        assert {k: source.qtype(k) for k in source.keys()} == {
            "0.weight": "Q4_K", "0.bias": "F32", "2.weight": "Q8_0", "3.weight": "BF16", "3.bias": "BF16"}
        r0, r2 = backend.read_checkpoint_layer("0", source), backend.read_checkpoint_layer("2", source)
        assert torch.equal(r0.data, q0.qweight.data) and torch.equal(r2.data, q2.qweight.data)
        reloaded = torch.nn.Sequential(QuantLinear(r0, source.get("0.bias").clone(), torch.float32), torch.nn.GELU(),
                                       QuantLinear(r2, None))
        assert torch.equal(reloaded(x), expected)
        assert torch.equal(source.get("3.weight"), model[3].weight.detach())
    model[2] = QuantLinear(QuantizedWeight(32, 64, "nf4"), None)  # another backend's weight cannot go into a .gguf
    with pytest.raises(ValueError, match="'2' holds a QuantizedWeight \\(nf4\\).*stores only GGUF blocks"):
        backend.save_checkpoint(model, tmp_path / "x")


# --- end to end through the loader ------------------------------------------------------------------------------

def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**dummy_inputs(model, seed=0), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def dit(tmp_path_factory) -> dict:
    """Tiny DiTs (inner dim 64, and 256 so that every layer takes 256-blocks), their dense fp32 outputs and states."""
    root = tmp_path_factory.mktemp("dit")
    out = {}
    for width in (64, 256):
        folder = save_tiny("dit", root / f"dit{width}", width=width)
        dense = load_model(folder, torch_dtype=torch.float32)
        out[width] = (folder, _run(dense), dense.state_dict())
    return out


# output error of the whole tiny DiT against fp32 (measured: Q8_0 0.005, Q6_K 0.018, Q4_K 0.08, Q4_0 0.12, Q2_K 0.28);
# the other types are held per layer above
MODEL_ERROR = {"Q8_0": 0.015, "IQ4_NL": 0.15, "Q4_0": 0.18, "Q6_K": 0.04, "Q4_K": 0.12, "IQ4_XS": 0.12, "Q2_K": 0.4}


@pytest.mark.parametrize("qtype", list(MODEL_ERROR))
def test_gguf_file_loads_through_load_model(dit, tmp_path, qtype):
    width = 64 if block_size(qtype) == 32 else 256
    folder, expected, state = dit[width]
    tensors = {k: (v, qtype if k.endswith(".weight") and v.dim() == 2 else None) for k, v in state.items()}
    path = write_gguf(tmp_path / f"dit-{qtype}.gguf", tensors)
    model = load_model(path, config=folder, torch_dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 11 and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(m.qweight.fmt == f"gguf:{qtype}" for m in layers)
    report = load_report(model)
    assert report.backend == "gguf" and report.pre_quantized
    assert relative_error(_run(model), expected) < MODEL_ERROR[qtype]
    # the same file, loaded twice, gives the same output; the blocks are those in the file
    with GGUFSource(path) as source:
        name = "transformer_blocks.0.attn1.to_q"
        assert torch.equal(model.get_submodule(name).qweight.data, source.raw(f"{name}.weight")[0])


def test_mixed_file_keeps_dense_weights_dense(dit, tmp_path):
    folder, expected, state = dit[64]
    dense_layer = "transformer_blocks.0.attn1.to_k.weight"
    tensors = {k: (v, "Q8_0" if k.endswith(".weight") and v.dim() == 2 and k != dense_layer else None)
               for k, v in state.items()}
    model = load_model(write_gguf(tmp_path / "mixed.gguf", tensors), config=folder / "config.json", torch_dtype=torch.float32)
    assert isinstance(model.get_submodule("transformer_blocks.0.attn1.to_k"), torch.nn.Linear)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 10
    assert relative_error(_run(model), expected) < MODEL_ERROR["Q8_0"]


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-q6_k"])
def test_quantize_on_load_save_and_reload_bit_identical(dit, tmp_path, scheme):
    qtype = SCHEMES[scheme].gguf_type
    folder, expected, _ = dit[256]
    model = load_model(folder, scheme)
    assert all(m.qweight.fmt == f"gguf:{qtype}" for m in model.modules() if isinstance(m, QuantLinear))
    out = _run(model)
    assert relative_error(out, expected) < MODEL_ERROR[qtype] + 0.03  # bf16 compute on top
    saved = save_quantized(model, tmp_path / scheme)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.gguf"]
    reloaded = load_model(saved)
    assert load_report(reloaded).pre_quantized
    assert torch.equal(_run(reloaded), out)
    assert {k: v.dtype for k, v in reloaded.state_dict().items()} == {k: v.dtype for k, v in model.state_dict().items()}


def test_k_quant_scheme_keeps_narrow_layers_dense(dit):
    folder, _, _ = dit[64]  # in_features 64 (and 256 for two layers): Q4_K's 256-blocks fit only those
    model = load_model(folder, "gguf-q4_k")
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {"transformer_blocks.0.norm1.emb.timestep_embedder.linear_1", "transformer_blocks.0.ff.net.2"}
    reasons = {layer.name: layer.reason for layer in load_report(model).layers}
    assert "block size 256" in reasons["transformer_blocks.0.attn1.to_q"]
