"""The registry of pipeline families, and which family serves a variant's model.

The diffusers text-to-image family is serve's own. Other families register through the `quantserve.pipelines`
entry point group of an installed distribution (quantserve's own pyproject.toml registers the embedded digits model
from quantserve/default_model that way): each entry point names a PipelineFamily subclass (or a factory returning an
instance). Code is only ever found through installed package metadata, never through a module path written in a
serve config.

A variant's family: `model: null` -> the family that serves a default model; a directory -> the family that claims
it (by model_index.json's `_class_name`); anything else is a ConfigError naming `variants.N.model` and the supported
pipeline classes.
"""

from __future__ import annotations

import json
import logging
import threading
from importlib.metadata import EntryPoint, distributions
from pathlib import Path
from typing import Any

from .config import ConfigError
from .protocol import ModelSource, PipelineFamily

logger = logging.getLogger("quantserve.serve")

ENTRY_POINT_GROUP = "quantserve.pipelines"
INDEX_NAME = "model_index.json"

_lock = threading.Lock()
_registry: dict[str, PipelineFamily] | None = None
_broken: dict[str, str] = {}  # entry point name -> why it did not load


def register_family(family: PipelineFamily) -> None:
    """Add a family (tests and embedders; installed packages use the entry point group)."""
    registry = families()
    if not isinstance(family, PipelineFamily):
        raise TypeError(f"register_family: expected a PipelineFamily, got {type(family).__name__}")
    with _lock:
        registry[family.name] = family


def _builtin() -> list[PipelineFamily]:
    from .text_to_image import TextToImageFamily

    return [TextToImageFamily()]


def _entry_points() -> list[EntryPoint]:
    """The group's entry points over every installed copy of every distribution: `entry_points()` keeps only the
    first copy of a distribution on sys.path, which may be a stale egg-info of an editable checkout."""
    seen: dict[tuple[str, str], EntryPoint] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                seen.setdefault((ep.name, ep.value), ep)
    return sorted(seen.values(), key=lambda e: (e.name, e.value))


def _discovered() -> list[PipelineFamily]:
    found = []
    for ep in _entry_points():
        try:
            target: Any = ep.load()
            family = target() if callable(target) and not isinstance(target, PipelineFamily) else target
            if not isinstance(family, PipelineFamily):
                raise TypeError(f"{ep.value} gives a {type(family).__name__}, not a PipelineFamily")
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not hide the others; its error is kept
            _broken[ep.name] = f"{type(exc).__name__}: {exc}"
            logger.error("pipeline family entry point %r (%s) did not load: %s", ep.name, ep.value, exc)
            continue
        found.append(family)
    return found


def families() -> dict[str, PipelineFamily]:
    """Every registered family by name: serve's own, then the installed entry points."""
    global _registry
    with _lock:
        if _registry is None:
            registry: dict[str, PipelineFamily] = {}
            for family in _builtin() + _discovered():
                registry.setdefault(family.name, family)
            _registry = registry
        return _registry


def known_extra_fields() -> frozenset[str]:
    """Every extra request field some family accepts (the Ingress refuses the others at once)."""
    return frozenset(name for family in families().values() for name in family.extra_fields())


def supported_classes() -> list[str]:
    return sorted({cls for family in families().values() for cls in family.supported()})


def _broken_note() -> str:
    if not _broken:
        return ""
    return "; entry points that did not load: " + "; ".join(f"{k} ({v})" for k, v in sorted(_broken.items()))


def read_index(path: Path, field: str) -> dict[str, Any] | None:
    """model_index.json of a directory (None when it has none); a ConfigError names the field when it is bad."""
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{field}: {index} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{field}: {index} is not a JSON object")
    return data


def resolve(model: str | None, field: str = "model") -> tuple[PipelineFamily, ModelSource]:
    """The family serving `model` (a directory, or None for the default model) and what it sees of it."""
    registry = families()
    if model is None:
        default = [f for f in registry.values() if f.default_model_dir() is not None]
        if not default:
            raise ConfigError(f"{field}: null means the embedded default model, but no installed pipeline family "
                              f"serves one (families: {', '.join(sorted(registry)) or 'none'}){_broken_note()}")
        path = default[0].default_model_dir()
        assert path is not None
        source = ModelSource(None, path, read_index(path, field), field)
        return default[0], source
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{field}: {path} is not a directory (expected a diffusers pipeline directory with "
                          f"{INDEX_NAME})")
    source = ModelSource(model, path, read_index(path, field), field)
    for family in registry.values():
        if family.claims(source):
            return family, source
    what = (f"a {source.class_name} pipeline" if source.class_name else
            f"not a pipeline directory ({INDEX_NAME} missing)" if source.index is None else
            f"a {INDEX_NAME} without a _class_name")
    raise ConfigError(f"{field}: {path} is {what}; supported pipeline classes: "
                      f"{', '.join(supported_classes())}{_broken_note()}")


def check_variant(config: Any, index: int) -> PipelineFamily:
    """Resolve and check variant `index` of a serve config before anything starts; ConfigError names the field."""
    family, source = resolve(config.model, f"variants.{index}.model")
    family.check(source, config, f"variants.{index}")
    return family
