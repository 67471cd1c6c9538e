"""Shared test set-up: keep the backends' import-time log lines out of test output."""

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                     "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import os
import tempfile

# the autotune cache of a test run never lands in the user's cache directory
os.environ.setdefault("QUANTSERVE_CACHE_DIR", tempfile.mkdtemp(prefix="quantserve-test-cache-"))
