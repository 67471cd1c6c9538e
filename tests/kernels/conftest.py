"""Triton kernels on a machine without a GPU: import them under Triton's interpreter, without leaking the flag.

quantserve's Triton modules read TRITON_INTERPRET when they are imported (triton.jit decides then whether a kernel
is compiled or interpreted). Without CUDA this conftest sets the flag, imports them, and restores the environment,
so tests elsewhere in the same pytest process (e.g. the router's, which expect no Triton candidate on a CPU) see
the environment they expect. Tests that route through the Triton candidates set the flag themselves
(`monkeypatch.setenv`), as a deployment would. With CUDA the kernels compile and the same tests run on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from quantserve.kernels import triton_dequant, triton_matmul  # noqa: F401
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous
