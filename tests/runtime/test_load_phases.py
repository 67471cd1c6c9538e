"""Cold-start pieces of the loader: phases per load that sum to its seconds, pre-quantized tensors mapped from the
file with no copy (and read into an aligned buffer when they cannot be), and quantserve's aligned safetensors writer."""

from __future__ import annotations

import pytest
import torch

from quantserve.runtime import load_pipeline, save_quantized
from quantserve.runtime.model_files import ALIGNMENT, MMAP_ENV, SafetensorsSource, save_safetensors_aligned
from quantserve.runtime.phases import LOAD_PHASES, PhaseTimer, collector_paused
from quantserve.runtime.quant_linear import QuantLinear
from tests.pipelines_fixtures import tiny_pipeline_dir


def _mapped_files() -> list[tuple[int, int, str]]:
    rows = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            rows.append((lo, hi, parts[5].strip() if len(parts) > 5 else ""))
    return rows


def _file_of(ptr: int) -> str:
    return next((name for lo, hi, name in _mapped_files() if lo <= ptr < hi), "")


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    pipe = load_pipeline(tiny_pipeline_dir("flux"), "nf4", torch_dtype=torch.float32)
    return save_quantized(pipe, tmp_path_factory.mktemp("cold") / "flux-nf4")


def _check_phases(report, expected: set[str], absent: set[str]) -> None:
    phases = report.phases
    assert expected <= set(phases) <= set(LOAD_PHASES), phases
    assert not absent & set(phases), phases
    assert all(v >= 0 for v in phases.values())
    total = sum(phases.values())
    assert abs(total - report.seconds) <= 0.05 * report.seconds + 0.02, (total, report.seconds, phases)


def test_prequantized_pipeline_reports_phases_summing_to_its_load(prequantized):
    pipe = load_pipeline(prequantized, torch_dtype=torch.float32)
    report = pipe.quantserve_report
    _check_phases(report, {"imports", "skeleton", "read", "unpack", "to_device", "build", "components"}, {"quantize"})
    for component in report.components.values():
        _check_phases(component, {"skeleton", "read", "to_device", "build"}, {"imports", "components"})
    assert report.to_dict()["phases"] == report.phases


def test_quantize_on_load_reports_a_quantize_phase():
    report = load_pipeline(tiny_pipeline_dir("flux"), "nf4", torch_dtype=torch.float32).quantserve_report
    _check_phases(report, {"read", "quantize", "to_device", "build"}, {"unpack"})


def test_prequantized_tensors_are_views_of_the_file_with_no_copy(prequantized, monkeypatch):
    monkeypatch.delenv(MMAP_ENV, raising=False)
    pipe = load_pipeline(prequantized, torch_dtype=torch.float32)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
    assert layers
    files = {_file_of(layer.qweight.data.data_ptr()) for layer in layers}
    assert files == {str(prequantized / "transformer" / "diffusion_pytorch_model.safetensors")}, files
    assert all(layer.qweight.data.data_ptr() % ALIGNMENT == 0 for layer in layers)
    # the same weights through plain reads (the escape hatch): equal, and in anonymous memory
    monkeypatch.setenv(MMAP_ENV, "0")
    read = load_pipeline(prequantized, torch_dtype=torch.float32)
    read_layers = [m for m in read.transformer.modules() if isinstance(m, QuantLinear)]
    assert not any(_file_of(layer.qweight.data.data_ptr()).endswith(".safetensors") for layer in read_layers)
    for a, b in zip(layers, read_layers, strict=True):
        assert torch.equal(a.qweight.data, b.qweight.data)
    x = torch.randn(2, layers[0].in_features)
    torch.testing.assert_close(layers[0](x), read_layers[0](x))


def test_writes_to_a_mapped_tensor_never_reach_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors_aligned(path, {"a": torch.arange(64, dtype=torch.float32)}, {})
    with SafetensorsSource({"*": path}, path) as source:
        t = source.get("a")
        assert _file_of(t.data_ptr()) == str(path)
        t.add_(1)  # copy-on-write: this process's page only
    with SafetensorsSource({"*": path}, path) as source:
        assert torch.equal(source.get("a"), torch.arange(64, dtype=torch.float32))
    # the mapping outlives the source it came from
    assert torch.equal(t, torch.arange(64, dtype=torch.float32) + 1)


def test_written_files_are_aligned_and_read_by_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {"big": torch.randn(32, 64).to(torch.bfloat16), "odd": torch.arange(7, dtype=torch.int8),
               "u8": torch.randint(0, 255, (128,), dtype=torch.uint8), "empty": torch.zeros(0),
               "flag": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    save_safetensors_aligned(path, tensors, {"format": "pt", "k": "v"})
    with safe_open(str(path), "pt") as f:
        assert {k: v for k, v in f.metadata().items() if k != "quantserve.pad"} == {"format": "pt", "k": "v"}
        for key, t in tensors.items():
            assert torch.equal(f.get_tensor(key), t), key
    with SafetensorsSource({"*": path}, path) as source:
        (handle,) = source._files.values()
        assert handle.base % ALIGNMENT == 0
        for key, t in tensors.items():
            assert torch.equal(source.get(key), t), key


def test_unaligned_tensors_are_read_into_an_aligned_buffer(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "s.safetensors"
    save_file({"a": torch.arange(3, dtype=torch.int8), "b": torch.arange(64, dtype=torch.int8)}, str(path))
    with SafetensorsSource({"*": path}, path) as source:
        (handle,) = source._files.values()
        for key in ("a", "b"):
            t = source.get(key)
            start = handle.base + handle.entries[key][2]
            mapped = _file_of(t.data_ptr()) == str(path)
            assert mapped == (start % ALIGNMENT == 0), key
            assert t.data_ptr() % (ALIGNMENT if not mapped else 1) == 0
            assert torch.equal(t, torch.arange(t.numel(), dtype=torch.int8))


def test_phase_timer_counts_nested_phases_exclusively():
    import time

    timer = PhaseTimer()
    with timer.phase("unpack"):
        time.sleep(0.02)
        with timer.phase("read"):
            time.sleep(0.03)
            with timer.phase("read"):
                time.sleep(0.01)
    assert 0.015 < timer.seconds["unpack"] < 0.035
    assert 0.035 < timer.seconds["read"] < 0.06


def test_the_collector_is_paused_for_a_start_and_what_it_built_is_frozen():
    import gc

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with collector_paused():
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]  # what a start builds and keeps
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(kept)
        with pytest.raises(RuntimeError), collector_paused():  # a failed start turns it back on too
            raise RuntimeError("load failed")
        assert gc.isenabled()
        gc.disable()  # a process that runs without the collector keeps it off
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_digits_family_reports_its_imports_as_a_load_phase():
    from quantserve.serve.config import VariantConfig
    from quantserve.serve.generation import load_variant

    loaded = load_variant(VariantConfig.model_validate({"name": "v", "quantization": "nf4"}))
    phases = loaded.phases
    assert list(phases)[0] == "imports" and "components" in phases and phases["quantize"] > 0
    # the transformer's own report keeps its own load's phases only
    assert "imports" not in loaded.report.phases and "components" not in loaded.report.phases
    assert all(seconds >= 0 for seconds in phases.values())
