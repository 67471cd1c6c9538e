"""Which component of a pipeline gets which quantization: quantserve's PipelineQuantizationConfig and its readers.

`PipelineQuantizationConfig` mirrors diffusers' class of the same name (`quant_backend` + `quant_kwargs` +
`components_to_quantize`, or a `quant_mapping`). `component_specs` turns every form `load_pipeline` accepts into one
spec per weight component (a scheme name, a config object or a config.json block, or None). transformers writes
some configs in its own shape (quanto's `weights`, torchao's extra keys); `from_transformers_form` reads those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import QuantizationConfigMixin, quantization_config_from_dict
from .errors import ConfigTypeError, ConfigValueError

DENOISERS = ("transformer", "unet")
OWNER = "PipelineQuantizationConfig"
# quant_backend (diffusers' names) -> (quant_method, what the kwargs must say)
QUANT_BACKENDS: Mapping[str, tuple[str, dict[str, Any]]] = {
    "bitsandbytes_4bit": ("bitsandbytes", {"load_in_4bit": True}),
    "bitsandbytes_8bit": ("bitsandbytes", {"load_in_8bit": True}),
    "torchao": ("torchao", {}),
    "quanto": ("quanto", {}),
    "gguf": ("gguf", {}),
    "modelopt": ("modelopt", {}),
}
PIPELINE_KEYS = ("quant_backend", "quant_kwargs", "components_to_quantize", "quant_mapping")
# keys transformers adds to a config that diffusers' form has no field for (defaults that change nothing here)
_TRANSFORMERS_ONLY = {"torchao": ("include_input_output_embeddings", "untie_embedding_weights")}


def from_transformers_form(block: Any) -> Any:
    """A transformers `quantization_config` (dict or object) in the form quantserve's configs read; others as given."""
    if _is_transformers_config(block):
        block = block.to_dict()
    if not isinstance(block, Mapping):
        return block
    data = dict(block)
    method = str(getattr(data.get("quant_method"), "value", data.get("quant_method")))
    if method == "quanto" and "weights" in data:
        if data.pop("activations", None) is not None:
            raise ConfigValueError("QuantoConfig", "activations", block.get("activations"),
                                   "None (quantserve quantizes quanto weights only)")
        data["weights_dtype"] = data.pop("weights")
    for key in _TRANSFORMERS_ONLY.get(method, ()):
        data.pop(key, None)
    if "quant_method" in data:
        data["quant_method"] = method
    return data


def _is_transformers_config(value: Any) -> bool:
    try:
        from transformers.utils.quantization_config import QuantizationConfigMixin as TransformersConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, TransformersConfig)


def _is_diffusers_config(value: Any) -> bool:
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin as DiffusersConfig

    return isinstance(value, DiffusersConfig)


@dataclass
class PipelineQuantizationConfig:
    """One backend for several components (`quant_backend`, `quant_kwargs`, `components_to_quantize`: every weight
    component when None), or a config per component (`quant_mapping`), as diffusers' class of the same name."""

    quant_backend: str | None = None
    quant_kwargs: dict[str, Any] = field(default_factory=dict)
    components_to_quantize: list[str] | None = None
    quant_mapping: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.components_to_quantize, str):
            self.components_to_quantize = [self.components_to_quantize]
        if self.components_to_quantize is not None and not (
                isinstance(self.components_to_quantize, Sequence)
                and all(isinstance(c, str) for c in self.components_to_quantize)):
            raise ConfigTypeError(OWNER, "components_to_quantize", self.components_to_quantize, "a list of component names")
        if not isinstance(self.quant_kwargs, Mapping):
            raise ConfigTypeError(OWNER, "quant_kwargs", self.quant_kwargs, "a dict of the backend config's arguments")
        if self.quant_mapping is not None and not isinstance(self.quant_mapping, Mapping):
            raise ConfigTypeError(OWNER, "quant_mapping", self.quant_mapping, "a dict: component name -> config")
        if self.quant_backend is not None and self.quant_mapping is not None:
            raise ConfigValueError(OWNER, "quant_backend", self.quant_backend,
                                   "None when quant_mapping is given (one or the other)")
        if self.quant_backend is None and self.quant_mapping is None:
            raise ConfigValueError(OWNER, "quant_backend", None, list(QUANT_BACKENDS),
                                   "Give a quant_backend (with quant_kwargs) or a quant_mapping")
        if self.quant_backend is not None:
            if self.quant_backend not in QUANT_BACKENDS:
                raise ConfigValueError(OWNER, "quant_backend", self.quant_backend, list(QUANT_BACKENDS))
            self.backend_config()  # the kwargs must build a valid config now, not at load time

    def backend_config(self) -> QuantizationConfigMixin:
        """The config `quant_backend` and `quant_kwargs` describe (for every component they apply to)."""
        method, implied = QUANT_BACKENDS[str(self.quant_backend)]
        data = {**implied, **dict(self.quant_kwargs), "quant_method": method}
        try:
            return quantization_config_from_dict(from_transformers_form(data))
        except (ValueError, TypeError) as exc:
            raise ConfigValueError(OWNER, "quant_kwargs", dict(self.quant_kwargs),
                                   f"arguments of the {method} config ({exc})") from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineQuantizationConfig:
        unknown = sorted(set(data) - set(PIPELINE_KEYS))
        if unknown:
            raise ConfigValueError(OWNER, unknown[0], data[unknown[0]], f"keys {', '.join(PIPELINE_KEYS)}")
        return cls(**{k: data[k] for k in PIPELINE_KEYS if k in data})

    @classmethod
    def from_diffusers(cls, obj: Any) -> PipelineQuantizationConfig:
        """quantserve's form of a `diffusers.PipelineQuantizationConfig`."""
        return cls(obj.quant_backend, dict(obj.quant_kwargs or {}), obj.components_to_quantize, obj.quant_mapping)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.quant_backend is not None:
            d.update(quant_backend=self.quant_backend, quant_kwargs=dict(self.quant_kwargs))
            if self.components_to_quantize is not None:
                d["components_to_quantize"] = list(self.components_to_quantize)
        else:
            d["quant_mapping"] = {k: _spec_to_json(v) for k, v in (self.quant_mapping or {}).items()}
        return d

    def specs(self, components: Sequence[str]) -> dict[str, Any]:
        """component -> spec for the named components of a pipeline (None: not quantized)."""
        if self.quant_mapping is not None:
            return {name: self.quant_mapping.get(name) for name in components}
        wanted = set(components if self.components_to_quantize is None else self.components_to_quantize)
        config = self.backend_config()
        return {name: config if name in wanted else None for name in components}

    def named_components(self) -> list[str]:
        return list(self.quant_mapping or {}) if self.quant_mapping is not None else list(self.components_to_quantize or [])


def _spec_to_json(spec: Any) -> Any:
    if isinstance(spec, QuantizationConfigMixin):
        return spec.to_dict()
    if _is_transformers_config(spec) or _is_diffusers_config(spec):
        return from_transformers_form(spec.to_dict())
    return spec


def _is_single_config(spec: Any) -> bool:
    """A config for one model (not a mapping by component)."""
    if isinstance(spec, (str, QuantizationConfigMixin)) or _is_transformers_config(spec) or _is_diffusers_config(spec):
        return True
    return isinstance(spec, Mapping) and ("quant_method" in spec or any(k.startswith(("load_in", "_load_in")) for k in spec))


def as_pipeline_config(spec: Any) -> PipelineQuantizationConfig | None:
    """spec as a PipelineQuantizationConfig when it is one (quantserve's, diffusers', or its dict form), else None."""
    if isinstance(spec, PipelineQuantizationConfig):
        return spec
    if type(spec).__name__ == "PipelineQuantizationConfig" and hasattr(spec, "quant_backend"):
        return PipelineQuantizationConfig.from_diffusers(spec)
    if isinstance(spec, Mapping) and spec and set(spec) <= set(PIPELINE_KEYS):
        return PipelineQuantizationConfig.from_dict(spec)
    return None


def component_specs(spec: Any, libraries: Mapping[str, str], where: str) -> dict[str, Any]:
    """One spec per weight component (name -> library) from any form load_pipeline takes; errors name the component.

    None: nothing quantized. A scheme, config or config.json block: the denoiser only (`transformer` or `unet`).
    A mapping component -> spec, or a PipelineQuantizationConfig (quantserve's, diffusers', or its dict form).
    """
    names = list(libraries)
    if spec is None:
        return dict.fromkeys(names)
    if _is_single_config(spec):
        denoiser = next((n for n in DENOISERS if n in libraries), None)
        if denoiser is None:
            raise ConfigValueError("load_pipeline", "quantization_config", _spec_to_json(spec),
                                   f"a mapping component -> config: {where} has no {' or '.join(DENOISERS)} component "
                                   f"(its weight components: {', '.join(names)})")
        specs = dict.fromkeys(names)
        specs[denoiser] = spec
        return _checked(specs, libraries)
    pipeline_config = as_pipeline_config(spec)
    if pipeline_config is not None:
        named, specs = pipeline_config.named_components(), pipeline_config.specs(names)
    elif isinstance(spec, Mapping):
        named, specs = list(spec), {name: spec.get(name) for name in names}
    else:
        raise ConfigTypeError("load_pipeline", "quantization_config", spec,
                              "None, a scheme name, a config object or dict, a mapping component -> config, "
                              "or a PipelineQuantizationConfig")
    unknown = [n for n in named if n not in libraries]
    if unknown:
        raise ConfigValueError("load_pipeline", f"quantization_config[{unknown[0]!r}]", unknown[0],
                               names, f"{unknown[0]!r} is not a weight component of {where}")
    return _checked(specs, libraries)


def _checked(specs: dict[str, Any], libraries: Mapping[str, str]) -> dict[str, Any]:
    """Refuse a transformers-only config on a diffusers component, naming the component."""
    for name, spec in specs.items():
        if spec is None:
            continue
        if libraries[name] == "diffusers" and (_is_transformers_config(spec) or _is_transformers_only_dict(spec)):
            raise ConfigValueError("load_pipeline", f"quantization_config[{name!r}]", _spec_to_json(spec),
                                   "a diffusers or quantserve config, or a scheme name",
                                   f"{name!r} is a diffusers model; a transformers quantization config applies to "
                                   "transformers components (text encoders) only")
        if _is_transformers_config(spec) or _is_diffusers_config(spec):
            specs[name] = from_transformers_form(spec.to_dict())  # read as quantserve's config of that backend
    return specs


def _is_transformers_only_dict(spec: Any) -> bool:
    """A config.json block only transformers writes (quanto's `weights` spelling)."""
    return isinstance(spec, Mapping) and str(spec.get("quant_method")) == "quanto" and "weights" in spec
