"""Read what a model path says about its quantization, without loading weights: the basis of `quantserve inspect`."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GGUFQuantizationConfig, QuantizationConfigMixin, quantization_config_from_dict
from .pipeline_config import from_transformers_form

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class Inspection:
    """What one model (or one pipeline component) declares: its class, its quantization config, and any errors."""

    path: Path
    component: str | None = None
    model_class: str | None = None
    config: QuantizationConfigMixin | None = None
    raw_config: dict[str, Any] | None = None
    weights: list[tuple[str, int]] = field(default_factory=list)
    gguf_types: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def backend(self) -> str:
        return self.config.quant_method.value if self.config is not None else "none"

    def requirement_rows(self) -> list[dict[str, Any]]:
        if self.config is None:
            return []
        return [{"package": r.spec, "installed": r.installed(), "problem": r.problem()} for r in self.config.requirements()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "component": self.component,
            "model_class": self.model_class,
            "backend": self.backend,
            "summary": self.config.summary() if self.config else None,
            "quantization_config": self.config.to_dict() if self.config else self.raw_config,
            "packages": self.requirement_rows(),
            "weights": [{"file": name, "bytes": size} for name, size in self.weights],
            "gguf_tensor_types": self.gguf_types,
            "valid": self.valid,
            "errors": self.errors,
        }


def _read_json(path: Path, report: Inspection) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        report.errors.append(f"{path}: cannot read: {exc}")
        return None
    except json.JSONDecodeError as exc:
        report.errors.append(f"{path}: not valid JSON: {exc}")
        return None
    if not isinstance(data, dict):
        report.errors.append(f"{path}: expected a JSON object, got {type(data).__name__}")
        return None
    return data


def _inspect_config_json(config_path: Path, component: str | None = None) -> Inspection:
    report = Inspection(path=config_path, component=component)
    data = _read_json(config_path, report)
    if data is None:
        return report
    architectures = data.get("architectures")
    report.model_class = data.get("_class_name") or (architectures[0] if isinstance(architectures, list) and architectures else None)
    block = data.get("quantization_config")
    if block is not None:
        report.raw_config = block
        try:
            report.config = quantization_config_from_dict(from_transformers_form(block))
        except (ValueError, TypeError, RuntimeError) as exc:
            report.errors.append(f"{config_path}: quantization_config: {exc}")
    folder = config_path.parent
    report.weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return report


def _inspect_gguf(path: Path) -> Inspection:
    report = Inspection(path=path, config=GGUFQuantizationConfig())
    try:
        from gguf import GGUFReader
    except ImportError:
        report.errors.append("reading a .gguf file needs the gguf package: pip install gguf")
        return report
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types on a damaged file
        report.errors.append(f"{path}: not a readable GGUF file: {exc}")
        return report
    report.gguf_types = dict(Counter(t.tensor_type.name for t in reader.tensors))
    report.weights = [(path.name, path.stat().st_size)]
    arch = reader.fields.get("general.architecture")
    if arch is not None:
        report.model_class = bytes(arch.parts[arch.data[0]]).decode("utf-8", "replace")
    return report


def inspect_path(path: str | Path) -> list[Inspection]:
    """One Inspection per model found at `path`: a model dir, its config.json, a pipeline dir, or a .gguf file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (give a model directory, its config.json or a .gguf file)")
    if path.is_file():
        if path.suffix == ".gguf":
            return [_inspect_gguf(path)]
        return [_inspect_config_json(path)]
    if (path / "model_index.json").is_file():
        components = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        return [_inspect_config_json(p / "config.json", component=p.name) for p in components]
    if (path / "config.json").is_file():
        return [_inspect_config_json(path / "config.json")]
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        return [_inspect_gguf(p) for p in ggufs]
    raise FileNotFoundError(f"{path}: holds no config.json, model_index.json or .gguf file")
