"""A test-only pipeline that fails on purpose: the digits model, except that a job with one chosen seed raises
inside the replica. The serve tests use it for their 500 path (a replica error answered per job, never a shared
failure of the batch), so no fault hook lives in the production config schema or the Helm values.

It is a pipeline family like any other (registered through quantserve's `quantserve.pipelines` entry point) and
claims only a model directory whose model_index.json names `QuantserveFaultyDigits`: `write_faulty_model(dir, 13)`
writes one. Nothing else ever reaches it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quantserve.default_model import default_model_dir
from quantserve.default_model.serving import DigitsFamily, ServedDigits
from quantserve.serve.config import ConfigError, ResolvedLimits, VariantConfig
from quantserve.serve.protocol import ModelSource, ServedPipeline

CLASS_NAME = "QuantserveFaultyDigits"
INDEX_KEY = "_quantserve_fault"


def write_faulty_model(directory: str | Path, fail_on_seed: int, source: str | Path | None = None) -> Path:
    """A copy of a digits model directory (default: the embedded one) whose jobs with `fail_on_seed` fail."""
    if isinstance(fail_on_seed, bool) or not isinstance(fail_on_seed, int):
        raise TypeError(f"fail_on_seed: expected an int, got {type(fail_on_seed).__name__}")
    src, out = Path(source) if source is not None else default_model_dir(), Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for part in ("transformer", "scheduler"):
        shutil.copytree(src / part, out / part, dirs_exist_ok=True)
    index = json.loads((src / "model_index.json").read_text(encoding="utf-8")) if (src / "model_index.json").is_file() \
        else {}
    index.update({"_class_name": CLASS_NAME, INDEX_KEY: {"fail_on_seed": fail_on_seed,
                                                          "note": "test-only: jobs with this seed fail on purpose"}})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out


def _fail_seed(source: ModelSource, field: str) -> int:
    fault = (source.index or {}).get(INDEX_KEY)
    seed = fault.get("fail_on_seed") if isinstance(fault, Mapping) else None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{field}: {source.path}/model_index.json: {INDEX_KEY}.fail_on_seed must be an int "
                          f"(write the directory with quantserve.testing.faults.write_faulty_model)")
    return seed


class FaultyServedDigits(ServedDigits):
    """ServedDigits whose normalize raises for one seed: the job's own 500, as any replica-side error would be."""

    family = "faulty-digits"
    pipeline_class = CLASS_NAME

    def __init__(self, pipe: Any, limits: ResolvedLimits, fail_on_seed: int):
        super().__init__(pipe, limits)
        self.fail_on_seed = fail_on_seed

    def normalize(self, job: Mapping[str, Any]) -> dict[str, Any]:
        out = super().normalize(job)
        if out["seed"] == self.fail_on_seed:
            raise RuntimeError(f"injected failure: seed {out['seed']} is this test pipeline's fail_on_seed")
        return out


class FaultyDigitsFamily(DigitsFamily):
    """Serves only directories written by write_faulty_model; never the default model."""

    name = "faulty-digits"

    def default_model_dir(self) -> None:  # type: ignore[override]
        return None

    def claims(self, source: ModelSource) -> bool:
        return source.class_name == CLASS_NAME

    def supported(self) -> list[str]:
        return []  # kept out of the "supported pipeline classes" that errors list for users

    def check(self, source: ModelSource, config: VariantConfig, field_prefix: str) -> None:
        super().check(source, config, field_prefix)
        _fail_seed(source, f"{field_prefix}.model")

    def load(self, source: ModelSource, config: VariantConfig, limits: ResolvedLimits, device: str) -> ServedPipeline:
        served = super().load(source, config, limits, device)
        assert isinstance(served, ServedDigits)
        return FaultyServedDigits(served.pipe, limits, _fail_seed(source, source.field))
