"""Every scheme of the table on tiny Flux, SD3 and DiT models, through load_model: accuracy, layers, bytes, reload.

Tolerances are relative output error against the bf16 model, by bits per weight: 8-bit is held tighter than 4-bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantserve.runtime import SCHEMES
from quantserve.runtime.compare import relative_error
from quantserve.runtime.dummy_inputs import dummy_inputs
from quantserve.runtime.loader import load_model, save_quantized
from quantserve.runtime.quant_linear import QuantLinear

from .tiny_models import save_tiny

QUANTIZED = [name for name in SCHEMES if name != "bf16"]
TOLERANCE = {  # bits -> bound on the relative output error
    8: 0.06,    # int8 and float8 (float8 e4m3 keeps 3 mantissa bits, hence looser than int8 alone)
    6: 0.06,
    4: 0.30,
    2: 0.60,
}


def bound(scheme: str) -> float:
    bits = SCHEMES[scheme].bits
    return next(v for b, v in sorted(TOLERANCE.items()) if bits <= b + 0.6)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    # width 256 so that every K-quant (blocks of 256) and int4 group (128) has layers to quantize
    return {kind: save_tiny(kind, root / kind, width=256) for kind in ("flux", "sd3", "dit")}


def _run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**dummy_inputs(model, seed=1), return_dict=False)[0].float()


@pytest.fixture(scope="module")
def reference(models) -> dict[str, torch.Tensor]:
    return {kind: _run(load_model(path)) for kind, path in models.items()}


@pytest.mark.parametrize("kind", ["flux", "sd3", "dit"])
@pytest.mark.parametrize("scheme", QUANTIZED)
def test_scheme_on_model(models, reference, tmp_path, kind, scheme):
    torch.manual_seed(0)
    model = load_model(models[kind], scheme)
    report = model.quantserve_report
    backend = SCHEMES[scheme].backend.value
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert quant and all(m.qweight.backend == backend for m in quant)
    assert len(report.quantized_layers) == len(quant)
    for layer in report.layers:
        assert layer.backend in (backend, "dense") and (layer.backend != "dense" or layer.reason)
    out = _run(model)
    assert relative_error(out, reference[kind]) < bound(scheme), scheme
    # the quantized layers hold about the bits the format implies (block scales included)
    bits = 8 * sum(l.nbytes for l in report.quantized_layers) / sum(l.shape[0] * l.shape[1] for l in report.quantized_layers)
    assert bits <= SCHEMES[scheme].bits + 1.0, (scheme, bits)
    assert report.model_bytes < report.bf16_bytes
    saved = save_quantized(model, tmp_path / "q")
    again = load_model(saved)
    assert again.quantserve_report.pre_quantized
    assert torch.equal(_run(again), out), "a saved checkpoint reloads bit for bit"
