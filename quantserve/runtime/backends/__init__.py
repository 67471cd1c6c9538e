"""The five backends, each registered for its config class: `backend_for(config)` picks the handler."""

from .base import Backend, QuantizedWeight, backend_for, registered_backends

__all__ = ["Backend", "QuantizedWeight", "backend_for", "registered_backends"]
