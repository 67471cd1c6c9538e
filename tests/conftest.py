"""Shared test set-up: keep the backends' import-time log lines out of test output."""

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer",
                     "bitsandbytes.backends.cpu.ops"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import os
import tempfile

# the autotune cache of a test run never lands in the user's cache directory
os.environ.setdefault("QUANTSERVE_CACHE_DIR", tempfile.mkdtemp(prefix="quantserve-test-cache-"))

# Fuzz tests draw the same examples on every run (a CI failure can be replayed, and a green run stays green);
# HYPOTHESIS_PROFILE=explore draws fresh examples for a developer hunting new failures.
from hypothesis import settings as _hypothesis_settings

_hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
