"""The ctypes mirror of the C kernels' ABI (kernels/cpu_abi.py) against what the compiler made of csrc/qs_cpu.h."""

from __future__ import annotations

import ctypes

import pytest

from quantserve.kernels import cpu_abi, cpu_build


@pytest.fixture(scope="module")
def lib():
    problem = cpu_build.problem()
    if problem is not None:
        pytest.skip(problem)
    return cpu_build.library()


def test_qs_weight_has_the_size_and_field_offsets_of_the_c_struct(lib):
    size, fields, _ = cpu_abi.c_layout(lib)
    assert size == ctypes.sizeof(cpu_abi.QsWeight)
    assert list(fields) == [name for name, _ in cpu_abi.QsWeight._fields_], "same fields, same order"
    for name, (offset, width) in fields.items():
        mirror = getattr(cpu_abi.QsWeight, name)
        assert (mirror.offset, mirror.size) == (offset, width), name


def test_the_enums_have_the_c_values(lib):
    _, _, enums = cpu_abi.c_layout(lib)
    assert enums == cpu_abi.ENUMS
    assert cpu_abi.mismatches(lib) == []


def test_a_drifted_mirror_is_reported(lib, monkeypatch):
    monkeypatch.setitem(cpu_abi.ENUMS, "QS_FMT_GGUF", 9)
    monkeypatch.setitem(cpu_abi.ENUMS, "QS_FMT_NEW", 10)
    assert cpu_abi.mismatches(lib) == ["QS_FMT_GGUF: C 7, cpu_abi.py 9", "QS_FMT_NEW: C None, cpu_abi.py 10"]


def test_every_format_class_has_a_cpu_format_id():
    from quantserve.kernels import cpu, format_ops  # noqa: F401  (cpu registers the builders)

    assert all(entry.cpu is not None for entry in format_ops.entries())
    assert sorted(cpu_abi.FORMATS.values()) == list(range(1, len(format_ops.entries()) + 1))
