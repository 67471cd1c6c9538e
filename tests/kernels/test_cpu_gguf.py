"""The native GGUF row decoders (kernels/csrc/qs_gguf_*.c), bit-exact against the torch reference (kernels/gguf.py).

The library is compiled privately from the GGUF sources alone (csrc/qs_gguf_*.c: the decoders, the AVX-512
decoders, the fused dot), with the project's flags (cpu_build.FLAGS, cpu_build.compiler), so these tests do not
depend on the rest of the native kernels. Both implementations are held against the
reference: qs_gguf_decode_row (AVX-512 where this machine has it) and qs_gguf_decode_row_portable (plain C).
The fused dequantize-dot qs_gguf_dot_row (AVX-512 builds; -1 elsewhere) is held against a float64 dot of the
reference's dequantized row.
"""

from __future__ import annotations

import ctypes
import subprocess

import numpy as np
import pytest
import torch

from quantserve.kernels import cpu_build
from quantserve.kernels.gguf import BLOCK_SIZES, block_size, dequantize_gguf, type_size

GGML_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
    "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23, "BF16": 30,
}
# byte offsets of each quantized type's fp16 fields (d, dmin) inside one block (ggml's block_* structs)
FP16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}
ENTRY_POINTS = ("qs_gguf_decode_row", "qs_gguf_decode_row_portable")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs_gguf") / "libqs_gguf.so"
    sources = sorted(cpu_build.SOURCE_DIR.glob("qs_gguf_*.c"))
    assert sources, f"no GGUF sources (qs_gguf_*.c) in {cpu_build.SOURCE_DIR}"
    cmd = [cpu_build.compiler(), *cpu_build.FLAGS, "-I", str(cpu_build.SOURCE_DIR), "-o", str(out),
           *map(str, sources), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    lib = ctypes.CDLL(str(out))
    for name in ENTRY_POINTS:
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        fn.restype = ctypes.c_int32
    lib.qs_gguf_dot_row.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p]
    lib.qs_gguf_dot_row.restype = ctypes.c_int32
    lib.qs_gguf_supported.argtypes = [ctypes.c_int32]
    lib.qs_gguf_supported.restype = ctypes.c_int32
    lib.qs_gguf_avx512.argtypes = []
    lib.qs_gguf_avx512.restype = ctypes.c_int32
    return lib


def _fp16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """n finite fp16 bit patterns: random ones (negatives included), with zeros, -0 and subnormals mixed in."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # exponent all ones (inf/nan) -> finite
    special = rng.integers(0, 8, size=n)
    subnormal = rng.integers(1, 0x400, size=n, dtype=np.uint16) | (rng.integers(0, 2, size=n, dtype=np.uint16) << 15)
    bits = np.where(special == 0, np.uint16(0), bits)
    bits = np.where(special == 1, np.uint16(0x8000), bits)
    bits = np.where(special == 2, subnormal, bits)
    return bits.astype(np.uint16)


def random_rows(qtype: str, rows: int, k: int, seed: int) -> np.ndarray:
    """(rows, row bytes) of realistic raw blocks: random code bytes, finite fp16 scale fields."""
    rng = np.random.default_rng(seed)
    bs, ts = BLOCK_SIZES[qtype]
    n_blocks = rows * k // bs
    if qtype == "F32":
        values = (rng.standard_normal(rows * k) * 10.0 ** rng.integers(-30, 30, rows * k)).astype(np.float32)
        values[::7] = 0.0
        values[1::11] = -0.0
        values[2::13] = np.float32(1e-40)  # subnormal
        return values.view(np.uint8).reshape(rows, -1)
    if qtype == "F16":
        return _fp16_bits(rng, rows * k).astype("<u2").view(np.uint8).reshape(rows, -1)
    if qtype == "BF16":
        bits = rng.integers(0, 1 << 16, size=rows * k, dtype=np.uint16)
        bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0xBFFF, bits).astype(np.uint16)  # finite
        return bits.astype("<u2").view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        raw[:, offset:offset + 2] = _fp16_bits(rng, n_blocks).astype("<u2").view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, -1)


def decode(lib, entry: str, qtype: str, raw: np.ndarray, k: int) -> torch.Tensor:
    rows = raw.shape[0]
    raw = np.ascontiguousarray(raw)
    out = torch.empty(rows, k, dtype=torch.float32)
    fn = getattr(lib, entry)
    for r in range(rows):
        row = raw[r]
        assert fn(GGML_IDS[qtype], row.ctypes.data, k, out[r].data_ptr()) == 0
    return out


def assert_bit_exact(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and reference.dtype == torch.float32
    a, b = ours.view(torch.int32), reference.contiguous().view(torch.int32)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(f"{len(bad)} of {a.numel()} values differ; first at {first}: "
                             f"{ours[first].item()!r} vs reference {reference[first].item()!r}")


def test_isa_is_avx512_on_an_avx512_machine(lib):
    flags = cpu_build._cpu_features()
    has = all(f in flags.split() for f in ("avx512f", "avx512bw", "f16c"))
    assert lib.qs_gguf_avx512() == int(has)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("qtype", list(GGML_IDS))
def test_rows_bit_exact_against_reference(lib, entry, qtype):
    bs = block_size(qtype)
    ks = (256, 768) if bs == 256 else (32, 96) if bs == 32 else (1, 7, 33, 256)
    for seed, k in enumerate(ks):
        rows = 5
        raw = random_rows(qtype, rows, k, seed)
        assert raw.shape[1] == k // bs * type_size(qtype)
        reference = dequantize_gguf(torch.from_numpy(raw), qtype, (rows, k), torch.float32)
        assert_bit_exact(decode(lib, entry, qtype, raw, k), reference)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("qtype", [t for t in GGML_IDS if block_size(t) > 1])
def test_long_row_and_all_zero_blocks(lib, entry, qtype):
    bs = block_size(qtype)
    k = 12 * bs
    raw = random_rows(qtype, 2, k, 99)
    raw[1, : type_size(qtype) * 3] = 0  # three all-zero blocks
    reference = dequantize_gguf(torch.from_numpy(raw), qtype, (2, k), torch.float32)
    assert_bit_exact(decode(lib, entry, qtype, raw, k), reference)


def test_unknown_types_and_bad_lengths(lib):
    out = torch.empty(256, dtype=torch.float32)
    raw = np.zeros(1024, dtype=np.uint8)
    for qtype in range(-1, 64):
        known = qtype in GGML_IDS.values()
        assert lib.qs_gguf_supported(qtype) == (0 if known else -1), qtype
        for entry in ENTRY_POINTS:
            rc = getattr(lib, entry)(qtype, raw.ctypes.data, 256, out.data_ptr())
            assert rc == (0 if known else -1), (entry, qtype)
    for entry in ENTRY_POINTS:  # a length that is not a whole number of blocks
        assert getattr(lib, entry)(GGML_IDS["Q4_K"], raw.ctypes.data, 100, out.data_ptr()) == -1
        assert getattr(lib, entry)(GGML_IDS["Q4_0"], raw.ctypes.data, 48, out.data_ptr()) == -1


QUANTIZED = [t for t in GGML_IDS if block_size(t) > 1]


def dot_rows(lib, qtype: str, raw: np.ndarray, x: np.ndarray) -> list:
    """qs_gguf_dot_row for each row of raw (None where it returns -1)."""
    raw = np.ascontiguousarray(raw)
    out = np.zeros(1, dtype=np.float32)
    results = []
    for r in range(raw.shape[0]):
        rc = lib.qs_gguf_dot_row(GGML_IDS[qtype], raw[r].ctypes.data, x.size, x.ctypes.data, out.ctypes.data)
        assert rc in (0, -1)
        results.append(float(out[0]) if rc == 0 else None)
    return results


@pytest.mark.parametrize("qtype", QUANTIZED)
def test_fused_dot_within_float32_accumulation_error(lib, qtype):
    """|ours - sum w*x (float64, w the reference's float32 weights)| <= 4 k eps32 sum|w||x| + 1e-30: float32
    accumulation error of a k-term sum of products, with slack for the scale factoring."""
    if not lib.qs_gguf_avx512():
        pytest.skip("the fused dot is AVX-512 only (qs_gguf_dot_row returns -1, tested below)")
    bs = block_size(qtype)
    eps = float(np.finfo(np.float32).eps)
    for seed, blocks in enumerate((1, 3, 4, 7, 12)):
        k, rows = blocks * bs, 6
        raw = random_rows(qtype, rows, k, 1000 + seed)
        if seed == 4:
            raw[1, : type_size(qtype) * 2] = 0  # all-zero blocks
        w = dequantize_gguf(torch.from_numpy(raw), qtype, (rows, k), torch.float32).double().numpy()
        x = np.random.default_rng(seed).standard_normal(k).astype(np.float32)
        x[::5] *= 100.0
        ours = dot_rows(lib, qtype, raw, x)
        for r in range(rows):
            assert ours[r] is not None, (qtype, k)
            exact = float(w[r] @ x.astype(np.float64))
            bound = 4 * k * eps * float(np.abs(w[r]) @ np.abs(x.astype(np.float64))) + 1e-30
            assert abs(ours[r] - exact) <= bound, (qtype, k, r, ours[r], exact, bound)


def test_fused_dot_contract(lib):
    """0 for every quantized type on an AVX-512 build; -1 for dense and unknown types, bad lengths, other builds."""
    raw = np.zeros(4096, dtype=np.uint8)
    x = np.ones(512, dtype=np.float32)
    out = np.full(1, 7.0, dtype=np.float32)
    fused = bool(lib.qs_gguf_avx512())
    quantized_ids = {GGML_IDS[t] for t in QUANTIZED}
    for qtype in range(-1, 64):
        expected = 0 if fused and qtype in quantized_ids else -1
        assert lib.qs_gguf_dot_row(qtype, raw.ctypes.data, 256, x.ctypes.data, out.ctypes.data) == expected, qtype
    if fused:
        assert out[0] == 0.0  # all-zero blocks
    assert lib.qs_gguf_dot_row(GGML_IDS["Q4_K"], raw.ctypes.data, 100, x.ctypes.data, out.ctypes.data) == -1
    assert lib.qs_gguf_dot_row(GGML_IDS["Q8_0"], raw.ctypes.data, 48, x.ctypes.data, out.ctypes.data) == -1
