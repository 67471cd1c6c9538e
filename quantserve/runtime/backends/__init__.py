"""The five backends, each registered for its config class: `backend_for(config)` picks the handler."""

from .base import Backend, NoPackedFormat, QuantizedWeight, backend_for

__all__ = ["Backend", "NoPackedFormat", "QuantizedWeight", "backend_for"]
