"""quantserve: serve quantized diffusion models.

The public face re-exports what users reach for first; the parts live in quantserve.runtime (configs, loading,
routing), quantserve.kernels (packed formats and Triton kernels) and quantserve.serve (the Ray Serve app).
"""

import gc as _gc

# The imports below (torch first) build about a million objects that live as long as the process. Python's
# collector would walk them again and again while they load, and once more in its next full collection: paused for
# the import, and those objects then frozen out of its walks (gc.freeze), `import quantserve.serve.diffusion` takes
# 2.0 s instead of 2.65 s here, which every replica's cold start and every command's start gains. (What the import
# left as cyclic garbage stays frozen: a few MB, once per process. serve/diffusion.py does the same for a load.)
_collecting = _gc.isenabled()
_gc.disable()
try:
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
finally:
    _gc.freeze()
    if _collecting:
        _gc.enable()

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
