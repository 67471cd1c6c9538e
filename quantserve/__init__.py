"""quantserve: serve quantized diffusion models.

The public face re-exports what users reach for first; the parts live in quantserve.runtime (configs, loading,
routing), quantserve.kernels (packed formats and Triton kernels) and quantserve.serve (the Ray Serve app).
"""

from quantserve.runtime import (
    SCHEMES,
    BitsAndBytesConfig,
    GGUFQuantizationConfig,
    NVIDIAModelOptConfig,
    QuantizationConfigMixin,
    QuantizationMethod,
    QuantoConfig,
    TorchAoConfig,
    get_scheme,
    quantization_config_from_dict,
    resolve_quantization_config,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "BitsAndBytesConfig",
    "GGUFQuantizationConfig",
    "NVIDIAModelOptConfig",
    "QuantizationConfigMixin",
    "QuantizationMethod",
    "QuantoConfig",
    "TorchAoConfig",
    "__version__",
    "get_scheme",
    "quantization_config_from_dict",
    "resolve_quantization_config",
]
