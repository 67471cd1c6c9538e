"""Importing this module registers every backend with `backend_for` (each module registers itself on import)."""

from . import bnb  # noqa: F401
from . import gguf  # noqa: F401
from . import modelopt  # noqa: F401
from . import quanto  # noqa: F401
from . import torchao  # noqa: F401
