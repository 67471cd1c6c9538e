"""Quantization configs: what a diffusers `config.json` says about how a model's weights are quantized.

The classes follow diffusers' `quantization_config` module field for field, read every form diffusers has written
(bitsandbytes' private `_load_in_*` keys, torchao's older string shorthands and its `AOBaseConfig` form) and write a
form diffusers reads back. Building a config imports no backend library and needs no GPU: what depends on the
installed packages or on the device is checked by `check_environment`, when the config is applied to a model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar

import torch

from ..kernels.atomic_write import atomic_write_text
from .dtypes import dtype_from_name, dtype_name  # noqa: F401  (dtype_name: backends read it from here)
from .errors import BackendUnavailableError, ConfigTypeError, ConfigValueError
from .requirements import Requirement
from .torchao_shorthands import SHORTHANDS

logger = logging.getLogger(__name__)


class QuantizationMethod(str, Enum):
    """The five backends, by the `quant_method` string diffusers writes into config.json."""

    BITS_AND_BYTES = "bitsandbytes"
    TORCHAO = "torchao"
    QUANTO = "quanto"
    GGUF = "gguf"
    MODELOPT = "modelopt"

    def __str__(self) -> str:
        return self.value


_CONFIG_CLASSES: dict[QuantizationMethod, type[QuantizationConfigMixin]] = {}


# --- field helpers: each normalizes one value or raises an error naming the field -----------------------------

def _as_dtype(owner: str, name: str, value: Any, accepted: tuple[str, ...]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        text = dtype_name(value)
    elif isinstance(value, str):
        text = value.removeprefix("torch.")
    else:
        raise ConfigTypeError(owner, name, value, "a torch.dtype or its name, e.g. 'bfloat16'")
    if text not in accepted:
        raise ConfigValueError(owner, name, value, accepted)
    return dtype_from_name(text, accepted, f"{owner}.{name}")


def _as_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(owner, name, value, "a bool (true or false)")
    return value


def _as_str_list(owner: str, name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ConfigTypeError(owner, name, value, "a list of module names or None")
    for item in value:
        if not isinstance(item, str):
            raise ConfigTypeError(owner, f"{name}[]", item, "a module name (str)")
    return list(value)


def _as_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise ConfigTypeError(owner, name, value, "one of " + ", ".join(map(repr, choices)))
    if value not in choices:
        raise ConfigValueError(owner, name, value, choices)
    return value


def _as_optional_int(owner: str, name: str, value: Any, minimum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(owner, name, value, "an integer or None")
    if minimum is not None and value < minimum:
        raise ConfigValueError(owner, name, value, f"an integer >= {minimum}, or None")
    return value


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


# --- the mixin ------------------------------------------------------------------------------------------------

class QuantizationConfigMixin:
    """Shared behaviour of the five configs: dict and JSON round trip, diffs against defaults, validated updates.

    Subclasses are dataclasses registered under their `QuantizationMethod` (class keyword `method=`), so that
    `quantization_config_from_dict` dispatches on `quant_method` without an if/elif chain.
    """

    quant_method: ClassVar[QuantizationMethod]
    # serialized key -> field name, for keys diffusers writes under another name
    _aliases: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, method: QuantizationMethod | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            cls.quant_method = QuantizationMethod(method)
            _CONFIG_CLASSES[cls.quant_method] = cls

    # lifecycle: every field passes through _normalize at construction and on every later change
    def __post_init__(self) -> None:
        self._normalize()
        object.__setattr__(self, "_ready", True)

    def _normalize(self) -> None:
        """Check every field and convert it to its canonical form; raise naming the field on bad input."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_ready", False) and name in self._field_names():
            self._apply({name: value})
        else:
            object.__setattr__(self, name, value)

    def _apply(self, changes: Mapping[str, Any]) -> None:
        """Set several fields at once and re-validate; on error every field keeps its previous value."""
        before = {name: getattr(self, name) for name in self._field_names()}
        try:
            for name, value in changes.items():
                object.__setattr__(self, name, value)
            self._normalize()
        except Exception:
            for name, value in before.items():
                object.__setattr__(self, name, value)
            raise

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    # reading
    @classmethod
    def from_dict(
        cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """Build a config from a dict in any form diffusers wrote; `kwargs` then update matching fields."""
        if not isinstance(config_dict, Mapping):
            raise ConfigTypeError(cls.__name__, "config_dict", config_dict, "a dict")
        data = dict(config_dict)
        method = data.pop("quant_method", None)
        if method is not None and str(method) != cls.quant_method.value:
            raise ConfigValueError(cls.__name__, "quant_method", method, [cls.quant_method.value])
        data = cls._read_special_keys(data)
        for alias, name in cls._aliases.items():
            if alias in data:
                value = data.pop(alias)
                if name in data and data[name] != value:
                    raise ConfigValueError(cls.__name__, alias, value, f"the same value as {name} ({data[name]!r})")
                data.setdefault(name, value)
        init_names = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = sorted(set(data) - init_names)
        if unknown:
            logger.warning("%s: ignoring keys it does not know: %s (known: %s)", cls.__name__, unknown, sorted(init_names))
        config = cls(**{k: v for k, v in data.items() if k in init_names})
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def _read_special_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook: turn keys diffusers writes in another shape into constructor arguments."""
        return data

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the fields named in kwargs (validated together, all or nothing); return the kwargs not used."""
        names = set(self._field_names())
        used = {self._aliases.get(k, k): v for k, v in kwargs.items() if self._aliases.get(k, k) in names}
        self._apply(used)
        return {k: v for k, v in kwargs.items() if self._aliases.get(k, k) not in names}

    # writing
    def _serialize(self, name: str, value: Any) -> Any:
        if isinstance(value, torch.dtype):
            return dtype_name(value)
        return copy.deepcopy(value)

    def _serialized_fields(self) -> Iterator[Any]:
        return (f for f in fields(self) if f.metadata.get("serialize", True))  # type: ignore[arg-type]

    def _finish_dict(self, d: dict[str, Any]) -> dict[str, Any]:
        """Hook: add or drop keys so the dict has the exact shape diffusers writes (also applied to the defaults)."""
        return d

    def to_dict(self) -> dict[str, Any]:
        """Every serialized field as plain JSON values, plus `quant_method`."""
        d = {"quant_method": self.quant_method.value}
        d.update({f.name: self._serialize(f.name, getattr(self, f.name)) for f in self._serialized_fields()})
        return self._finish_dict(d)

    def _default_dict(self) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        for f in self._serialized_fields():
            if f.default is not MISSING:
                defaults[f.name] = self._serialize(f.name, f.default)
            elif f.default_factory is not MISSING:
                defaults[f.name] = self._serialize(f.name, f.default_factory())
        return self._finish_dict(defaults)

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the keys whose values differ from this class's defaults (required fields always kept)."""
        defaults = self._default_dict()
        diff = {k: v for k, v in self.to_dict().items() if k not in defaults or defaults[k] != v}
        diff["quant_method"] = self.quant_method.value
        return diff

    def to_json_string(self, use_diff: bool = True) -> str:
        config_dict = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike[str], use_diff: bool = False) -> None:
        """Write the config as JSON, atomically: a failure leaves any earlier file as it was."""
        atomic_write_text(json_file_path, self.to_json_string(use_diff=use_diff))

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        """`dict(config)` gives `to_dict()`, as diffusers allows."""
        return iter(self.to_dict().items())

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # environment
    def requirements(self) -> list[Requirement]:
        """The packages this config needs on the machine that applies it."""
        return []

    def check_environment(self, device: str | torch.device = "cpu", capability: tuple[int, int] | None = None) -> None:
        """Raise BackendUnavailableError if this config cannot be applied on `device` here (packages, GPU features)."""
        problems = [p for p in (r.problem() for r in self.requirements()) if p]
        if problems:
            raise BackendUnavailableError(f"{type(self).__name__}: " + "; ".join(problems))

    def summary(self) -> str:
        """One line naming the backend and scheme, for reports and `quantserve inspect`."""
        return self.quant_method.value


# --- bitsandbytes ---------------------------------------------------------------------------------------------

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
BNB_STORAGE_DTYPES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


@dataclass(repr=False)
class BitsAndBytesConfig(QuantizationConfigMixin, method=QuantizationMethod.BITS_AND_BYTES):
    """bitsandbytes: 4-bit NF4/FP4 (optionally double-quantized absmax) or 8-bit LLM.int8."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype | str | None = torch.float32
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype | str | None = torch.uint8

    _aliases: ClassVar[Mapping[str, str]] = {"_load_in_4bit": "load_in_4bit", "_load_in_8bit": "load_in_8bit"}

    def _normalize(self) -> None:
        owner = type(self).__name__
        for name in ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload",
                     "llm_int8_has_fp16_weight", "bnb_4bit_use_double_quant"):
            _as_bool(owner, name, getattr(self, name))
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigValueError(owner, "load_in_4bit", True, "at most one of load_in_4bit and load_in_8bit set to True")
        threshold = self.llm_int8_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigTypeError(owner, "llm_int8_threshold", threshold, "a number")
        if not threshold >= 0:
            raise ConfigValueError(owner, "llm_int8_threshold", threshold, "a number >= 0 (0 disables outlier handling)")
        self._set("llm_int8_threshold", float(threshold))
        self._set("llm_int8_skip_modules", _as_str_list(owner, "llm_int8_skip_modules", self.llm_int8_skip_modules))
        compute = torch.float32 if self.bnb_4bit_compute_dtype is None else self.bnb_4bit_compute_dtype
        self._set("bnb_4bit_compute_dtype", _as_dtype(owner, "bnb_4bit_compute_dtype", compute, COMPUTE_DTYPES))
        self._set("bnb_4bit_quant_type", _as_choice(owner, "bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("fp4", "nf4")))
        storage = torch.uint8 if self.bnb_4bit_quant_storage is None else self.bnb_4bit_quant_storage
        self._set("bnb_4bit_quant_storage", _as_dtype(owner, "bnb_4bit_quant_storage", storage, BNB_STORAGE_DTYPES))

    def _finish_dict(self, d: dict[str, Any]) -> dict[str, Any]:
        # diffusers stores the flags as _load_in_4bit/_load_in_8bit and writes both spellings
        if "load_in_4bit" in d:
            d["_load_in_4bit"] = d["load_in_4bit"]
        if "load_in_8bit" in d:
            d["_load_in_8bit"] = d["load_in_8bit"]
        return d

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """'llm_int8', 'fp4', 'nf4', or None when neither flag is set."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def requirements(self) -> list[Requirement]:
        if self.load_in_4bit:
            return [Requirement("bitsandbytes", "0.39.0", "4-bit quantization")]
        return [Requirement("bitsandbytes", "0.39.0", "8-bit quantization")] if self.load_in_8bit else []

    def summary(self) -> str:
        kind = self.quantization_method()
        if kind is None:
            return "bitsandbytes (neither load_in_4bit nor load_in_8bit set: nothing is quantized)"
        if kind == "llm_int8":
            return f"bitsandbytes LLM.int8, threshold {self.llm_int8_threshold}"
        double = ", double-quantized absmax" if self.bnb_4bit_use_double_quant else ""
        return f"bitsandbytes 4-bit {kind}{double}, compute {dtype_name(self.bnb_4bit_compute_dtype)}"


# --- torchao --------------------------------------------------------------------------------------------------

def _is_ao_config(value: Any) -> bool:
    try:
        from torchao.core.config import AOBaseConfig
    except ImportError:
        return False
    return isinstance(value, AOBaseConfig)


@dataclass(init=False, repr=False)
class TorchAoConfig(QuantizationConfigMixin, method=QuantizationMethod.TORCHAO):
    """torchao: a string shorthand with its keyword arguments, or a torchao `AOBaseConfig` instance."""

    quant_type: Any
    modules_to_not_convert: list[str] | None = None
    quant_type_kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, quant_type: Any, modules_to_not_convert: list[str] | None = None, **kwargs: Any) -> None:
        self.quant_type = quant_type
        self.modules_to_not_convert = modules_to_not_convert
        # a config read back from JSON carries its kwargs under "quant_type_kwargs"
        extra = kwargs.pop("quant_type_kwargs", None)
        if extra is not None and kwargs:
            raise ConfigValueError("TorchAoConfig", "quant_type_kwargs", extra, "either quant_type_kwargs or loose keyword arguments, not both")
        self.quant_type_kwargs = dict(extra) if extra is not None else kwargs
        self.__post_init__()

    def _normalize(self) -> None:
        owner = type(self).__name__
        self._set("modules_to_not_convert", _as_str_list(owner, "modules_to_not_convert", self.modules_to_not_convert))
        if not isinstance(self.quant_type_kwargs, Mapping):
            raise ConfigTypeError(owner, "quant_type_kwargs", self.quant_type_kwargs, "a dict")
        if isinstance(self.quant_type, str):
            shorthand = SHORTHANDS.get(self.quant_type)
            if shorthand is None:
                raise ConfigValueError(owner, "quant_type", self.quant_type, sorted(SHORTHANDS),
                                       hint="Or pass a torchao AOBaseConfig instance")
            checked = {}
            for key, value in self.quant_type_kwargs.items():
                spec = shorthand.kwargs.get(key)
                if spec is None:
                    raise ConfigValueError(owner, f"quant_type_kwargs[{key!r}]", value,
                                           f"the keyword arguments of {self.quant_type!r}: {sorted(shorthand.kwargs) or 'none'}")
                checked[key] = spec.check(owner, f"quant_type_kwargs[{key!r}]", value)
            self._set("quant_type_kwargs", checked)
        elif _is_ao_config(self.quant_type):
            if self.quant_type_kwargs:
                raise ConfigValueError(owner, "quant_type_kwargs", self.quant_type_kwargs,
                                       "none when quant_type is an AOBaseConfig (set them on that object)")
            self._set("quant_type_kwargs", {})
        else:
            raise ConfigTypeError(owner, "quant_type", self.quant_type,
                                  "a shorthand string such as 'int8wo' or a torchao AOBaseConfig instance")

    @classmethod
    def _read_special_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        quant_type = data.get("quant_type")
        if isinstance(quant_type, Mapping):
            if set(quant_type) != {"default"}:
                raise ConfigValueError(cls.__name__, "quant_type", dict(quant_type),
                                       "a shorthand string, or {'default': <torchao config_to_dict output>}")
            try:
                from torchao.core.config import config_from_dict
            except ImportError as exc:
                raise BackendUnavailableError("TorchAoConfig: reading an AOBaseConfig needs torchao: pip install torchao") from exc
            try:
                data["quant_type"] = config_from_dict(quant_type["default"])
            except Exception as exc:
                raise ConfigValueError(cls.__name__, "quant_type", quant_type["default"],
                                       "a config that torchao's config_from_dict accepts", hint=str(exc)) from exc
        return data

    def _serialize(self, name: str, value: Any) -> Any:
        if name == "quant_type" and not isinstance(value, str):
            from torchao.core.config import config_to_dict

            return {"default": config_to_dict(value)}
        return super()._serialize(name, value)

    def _finish_dict(self, d: dict[str, Any]) -> dict[str, Any]:
        if "quant_type" in d and not isinstance(self.quant_type, str) and not d.get("quant_type_kwargs"):
            d.pop("quant_type_kwargs", None)  # diffusers' AOBaseConfig form has no such key
        return d

    @property
    def shorthand(self):
        return SHORTHANDS.get(self.quant_type) if isinstance(self.quant_type, str) else None

    @property
    def is_float8(self) -> bool:
        if self.shorthand is not None:
            return self.shorthand.float8
        return type(self.quant_type).__name__.startswith("Float8")

    def to_ao_config(self) -> Any:
        """The torchao config object this config means (imports torchao)."""
        if self.shorthand is None:
            return self.quant_type
        return self.shorthand.build(self.quant_type_kwargs)

    def requirements(self) -> list[Requirement]:
        return [Requirement("torchao", "0.15.0", "AOBaseConfig quantization")]

    def check_environment(self, device: str | torch.device = "cpu", capability: tuple[int, int] | None = None) -> None:
        super().check_environment(device, capability)
        device = torch.device(device)
        capability = capability or _device_capability(device)
        if self.is_float8 and device.type == "cuda" and capability is not None and capability < (8, 9):
            raise BackendUnavailableError(
                f"TorchAoConfig.quant_type: {self._type_name()} needs CUDA compute capability >= 8.9 "
                f"(Ada, Hopper or newer); {device} has {capability[0]}.{capability[1]}. Pick an int8 or int4 type."
            )

    def _type_name(self) -> str:
        return self.quant_type if isinstance(self.quant_type, str) else type(self.quant_type).__name__

    def summary(self) -> str:
        kwargs = ", ".join(f"{k}={v}" for k, v in sorted(self.quant_type_kwargs.items()))
        return f"torchao {self._type_name()}" + (f" ({kwargs})" if kwargs else "")


# --- optimum-quanto -------------------------------------------------------------------------------------------

QUANTO_WEIGHTS = ("float8", "int8", "int4", "int2")


@dataclass(repr=False)
class QuantoConfig(QuantizationConfigMixin, method=QuantizationMethod.QUANTO):
    """optimum-quanto weight quantization: float8, int8, int4 or int2."""

    weights_dtype: str = "int8"
    modules_to_not_convert: list[str] | None = None

    def _normalize(self) -> None:
        owner = type(self).__name__
        self._set("weights_dtype", _as_choice(owner, "weights_dtype", self.weights_dtype, QUANTO_WEIGHTS))
        self._set("modules_to_not_convert", _as_str_list(owner, "modules_to_not_convert", self.modules_to_not_convert))

    def requirements(self) -> list[Requirement]:
        return [Requirement("optimum-quanto", "0.2.6", "quanto weight quantization")]

    def summary(self) -> str:
        return f"quanto {self.weights_dtype} weights"


# --- GGUF -----------------------------------------------------------------------------------------------------

@dataclass(repr=False)
class GGUFQuantizationConfig(QuantizationConfigMixin, method=QuantizationMethod.GGUF):
    """GGUF: weights arrive already quantized in ggml blocks; compute_dtype is what they dequantize to."""

    compute_dtype: torch.dtype | str | None = torch.float32
    pre_quantized: bool = field(default=True, init=False)
    modules_to_not_convert: list[str] | None = field(default=None, init=False)

    def _normalize(self) -> None:
        owner = type(self).__name__
        dtype = torch.float32 if self.compute_dtype is None else self.compute_dtype
        self._set("compute_dtype", _as_dtype(owner, "compute_dtype", dtype, COMPUTE_DTYPES))
        if self.pre_quantized is not True:
            raise ConfigValueError(owner, "pre_quantized", self.pre_quantized, [True], hint="GGUF weights are always pre-quantized")
        if self.modules_to_not_convert is not None:
            raise ConfigValueError(owner, "modules_to_not_convert", self.modules_to_not_convert, [None],
                                   hint="a GGUF file decides per tensor what is quantized")

    @classmethod
    def _read_special_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        if data.pop("pre_quantized", True) is not True:
            raise ConfigValueError(cls.__name__, "pre_quantized", False, [True], hint="GGUF weights are always pre-quantized")
        modules = data.pop("modules_to_not_convert", None)
        if modules is not None:
            raise ConfigValueError(cls.__name__, "modules_to_not_convert", modules, [None],
                                   hint="a GGUF file decides per tensor what is quantized")
        return data

    def requirements(self) -> list[Requirement]:
        return [Requirement("gguf", "0.10.0", "reading and writing .gguf files")]

    def summary(self) -> str:
        return f"gguf (pre-quantized blocks), compute {dtype_name(self.compute_dtype)}"


# --- NVIDIA ModelOpt ------------------------------------------------------------------------------------------

MODELOPT_TYPES = ("FP8", "INT8", "INT4", "NF4", "NVFP4")
MODELOPT_ALGORITHMS = ("max", "smoothquant", "awq_lite", "awq_clip", "awq_full", "svdquant")


def normalize_modelopt_quant_type(quant_type: str) -> str:
    """'FP8', 'INT4' or a weight_activation pair 'FP8_INT8'; unsupported parts fall back as diffusers does, with a warning.

    More than two parts gives 'FP8'; an unknown weight type becomes 'FP8'; an unknown activation type is dropped.
    """
    text = quant_type.strip().upper()
    parts = text.split("_")
    if len(parts) > 2:
        logger.warning("NVIDIAModelOptConfig.quant_type: %r has more than two parts; using 'FP8'", quant_type)
        return "FP8"
    weight, activation = parts[0], parts[1] if len(parts) == 2 else None
    if weight not in MODELOPT_TYPES:
        logger.warning("NVIDIAModelOptConfig.quant_type: weight type %r is not one of %s; using 'FP8'", weight, MODELOPT_TYPES)
        weight = "FP8"
    if activation is not None and activation not in MODELOPT_TYPES:
        logger.warning("NVIDIAModelOptConfig.quant_type: activation type %r is not one of %s; dropping it (weight-only)",
                       activation, MODELOPT_TYPES)
        activation = None
    return weight if activation is None else f"{weight}_{activation}"


@dataclass(repr=False)
class NVIDIAModelOptConfig(QuantizationConfigMixin, method=QuantizationMethod.MODELOPT):
    """NVIDIA ModelOpt: FP8, INT8, INT4, NF4, NVFP4 weights, optionally with quantized activations ('FP8_INT8')."""

    quant_type: str
    modules_to_not_convert: list[str] | None = None
    weight_only: bool = True
    channel_quantize: int | None = None
    block_quantize: int | None = None
    scale_channel_quantize: int | None = None
    scale_block_quantize: int | None = None
    algorithm: str = "max"
    # a calibration function is run-time state, not configuration: never serialized, not compared
    forward_loop: Callable[..., Any] | None = field(default=None, compare=False, metadata={"serialize": False})
    modelopt_config: dict[str, Any] | None = None
    disable_conv_quantization: bool = False

    # bits per element of each type (exponent, mantissa) for floats, and the scale bits of block-scaled types
    quanttype_to_numbits: ClassVar[Mapping[str, Any]] = {"FP8": (4, 3), "INT8": 8, "INT4": 4, "NF4": 4, "NVFP4": (2, 1)}
    quanttype_to_scalingbits: ClassVar[Mapping[str, Any]] = {"NF4": 8, "NVFP4": (4, 3)}

    def _normalize(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.quant_type, str):
            raise ConfigTypeError(owner, "quant_type", self.quant_type, "a string such as 'FP8' or 'FP8_INT8'")
        self._set("quant_type", normalize_modelopt_quant_type(self.quant_type))
        self._set("modules_to_not_convert", _as_str_list(owner, "modules_to_not_convert", self.modules_to_not_convert))
        _as_bool(owner, "weight_only", self.weight_only)
        _as_bool(owner, "disable_conv_quantization", self.disable_conv_quantization)
        _as_optional_int(owner, "channel_quantize", self.channel_quantize)
        _as_optional_int(owner, "scale_channel_quantize", self.scale_channel_quantize)
        _as_optional_int(owner, "block_quantize", self.block_quantize, minimum=1)
        _as_optional_int(owner, "scale_block_quantize", self.scale_block_quantize, minimum=1)
        if self.block_quantize is not None and self.channel_quantize is None:
            raise ConfigValueError(owner, "block_quantize", self.block_quantize, "a block size together with channel_quantize (the axis)")
        if (self.scale_block_quantize is None) != (self.scale_channel_quantize is None):
            raise ConfigValueError(owner, "scale_block_quantize", self.scale_block_quantize,
                                   "set together with scale_channel_quantize, or both None")
        if self.scale_block_quantize is not None and self.block_quantize is None:
            raise ConfigValueError(owner, "scale_block_quantize", self.scale_block_quantize,
                                   "scale blocks only with block_quantize set (scales belong to weight blocks)")
        _as_choice(owner, "algorithm", self.algorithm, MODELOPT_ALGORITHMS)
        if self.forward_loop is not None and not callable(self.forward_loop):
            raise ConfigTypeError(owner, "forward_loop", self.forward_loop, "a callable taking the model, or None")
        if self.modelopt_config is not None:
            if not isinstance(self.modelopt_config, Mapping):
                raise ConfigTypeError(owner, "modelopt_config", self.modelopt_config, "a dict or None")
            try:
                json.dumps(self.modelopt_config)
            except (TypeError, ValueError) as exc:
                raise ConfigValueError(owner, "modelopt_config", "...", "a JSON-serializable dict", hint=str(exc)) from exc

    @classmethod
    def _read_special_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        # diffusers stores the algorithm as calib_cfg = {"method": algorithm}
        calib = data.pop("calib_cfg", None)
        if calib is not None:
            if not isinstance(calib, Mapping) or "method" not in calib:
                raise ConfigValueError(cls.__name__, "calib_cfg", calib, "{'method': <algorithm>}")
            if "algorithm" in data and data["algorithm"] != calib["method"]:
                raise ConfigValueError(cls.__name__, "calib_cfg", calib, f"a method equal to algorithm ({data['algorithm']!r})")
            data.setdefault("algorithm", calib["method"])
        if data.get("forward_loop") is not None:
            raise ConfigTypeError(cls.__name__, "forward_loop", data["forward_loop"],
                                  "nothing in a config file (pass a callable from Python)")
        data.pop("forward_loop", None)
        return data

    @property
    def weight_type(self) -> str:
        return self.quant_type.split("_")[0]

    @property
    def activation_type(self) -> str | None:
        parts = self.quant_type.split("_")
        return parts[1] if len(parts) == 2 else None

    def requirements(self) -> list[Requirement]:
        return [Requirement("nvidia-modelopt", "0.40.0", "ModelOpt quantization")]

    def summary(self) -> str:
        act = "weight-only" if self.weight_only or self.activation_type is None else f"activations {self.activation_type}"
        block = f", blocks of {self.block_quantize}" if self.block_quantize else ""
        return f"modelopt {self.weight_type} weights, {act}{block}, calibration {self.algorithm}"


# --- dispatch -------------------------------------------------------------------------------------------------

def config_class_for(method: str | QuantizationMethod) -> type[QuantizationConfigMixin]:
    """The config class registered for a quant_method string; a ValueError lists the known ones."""
    try:
        return _CONFIG_CLASSES[QuantizationMethod(str(method))]
    except ValueError:
        raise ConfigValueError("quantization_config", "quant_method", method, [m.value for m in _CONFIG_CLASSES]) from None


def quantization_config_from_dict(config_dict: Mapping[str, Any] | QuantizationConfigMixin) -> QuantizationConfigMixin:
    """A config object from a config.json `quantization_config` block, dispatching on its `quant_method`."""
    if isinstance(config_dict, QuantizationConfigMixin):
        return config_dict
    if not isinstance(config_dict, Mapping):
        raise ConfigTypeError("quantization_config", "quantization_config", config_dict, "a dict")
    method = config_dict.get("quant_method")
    if method is None:
        bnb_keys = ("load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit")
        if any(key in config_dict for key in bnb_keys):
            method = QuantizationMethod.BITS_AND_BYTES
        else:
            raise ConfigValueError("quantization_config", "quant_method", None, [m.value for m in _CONFIG_CLASSES])
    return config_class_for(method).from_dict(config_dict)
