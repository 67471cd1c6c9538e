"""quantserve.runtime: quantization configs, backends, loading, layer routing and autotuning."""

from .config import (
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantizationConfigMixin,
    QuantizationMethod,
    QuantoConfig,
    TorchAoConfig,
    quantization_config_from_dict,
)
from .errors import BackendUnavailableError, ConfigTypeError, ConfigValueError
from .requirements import Requirement
from .loader import load_model, load_report, save_quantized
from .pipeline import PipelineReport, load_pipeline
from .pipeline_config import PipelineQuantizationConfig
from .quant_linear import QuantLinear
from .schemes import SCHEMES, Scheme, get_scheme, resolve_quantization_config

__all__ = [
    "BackendUnavailableError",
    "BitsAndBytesConfig",
    "ConfigTypeError",
    "ConfigValueError",
    "GGUFQuantizationConfig",
    "QuantLinear",
    "NVIDIAModelOptConfig",
    "PipelineQuantizationConfig",
    "PipelineReport",
    "QuantizationConfigMixin",
    "QuantizationMethod",
    "QuantoConfig",
    "Requirement",
    "SCHEMES",
    "Scheme",
    "TorchAoConfig",
    "get_scheme",
    "load_model",
    "load_pipeline",
    "load_report",
    "save_quantized",
    "quantization_config_from_dict",
    "resolve_quantization_config",
]
