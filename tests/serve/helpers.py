"""Helpers shared by the serve tests: free ports, the test app's config, HTTP with bounded waits."""

from __future__ import annotations

import base64
import io
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

# Another digits-format model directory to serve instead of the embedded one (None: the embedded model).
MODEL_DIR = os.environ.get("QUANTSERVE_SERVE_TEST_MODEL") or None
APP_NAME = "quantserve-test"
FAIL_SEED = 13  # the "tight" variant's test-only pipeline fails requests with this seed
T2I_APP_NAME = "quantserve-t2i"
T2I_PREFIX = "/t2i"
T2I_QUANTIZATION = {"transformer": "nf4", "text_encoder_2": "int8wo"}
T2I_THREADS = 1  # the replicas' torch threads; in-process comparisons set the same


def tiny_pipeline_dir(family: str) -> Path:
    """The session's tiny pipeline directory of a family (float32, built once, read-only)."""
    from tests.pipelines_fixtures import tiny_pipeline_dir as built

    return built(family)


def tiny_flux_dir() -> str:
    return str(tiny_pipeline_dir("flux"))


def t2i_variants() -> list[dict[str, Any]]:
    """The tiny FLUX pipeline unquantized and with its transformer in NF4 and its T5 in int8, in float32."""
    common = {"model": tiny_flux_dir(), "dtype": "float32", "gemm_sample_every": 0,
              "resources": {"num_cpus": 0, "torch_threads": T2I_THREADS}}
    return [{"name": "flux", "quantization": "bf16", **common},
            {"name": "flux-nf4", "quantization": T2I_QUANTIZATION, **common}]


def make_t2i_config(port: int) -> dict[str, Any]:
    return {
        "app_name": T2I_APP_NAME,
        "variants": t2i_variants(),
        "experiment": {"weights": {"flux": 1.0, "flux-nf4": 0.0}},
        "http": {"host": "127.0.0.1", "port": port},
        "limits": {"max_steps": 20, "default_steps": 4, "max_n": 2, "max_size": 128, "min_size": 16, "default_size": 32},
        "request_timeout_s": 60,
    }


def free_port() -> int:
    """A TCP port nobody listens on at the moment (never 8000: the test picks what the OS hands out)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_faulty_dir: str | None = None


def faulty_model_dir() -> str:
    """The test model as a test-only pipeline that fails jobs with FAIL_SEED (quantserve.testing.faults), written
    once per process into a temporary directory."""
    global _faulty_dir
    if _faulty_dir is None:
        import tempfile

        from quantserve.testing.faults import write_faulty_model

        _faulty_dir = str(write_faulty_model(Path(tempfile.mkdtemp(prefix="quantserve-faulty-")) / "model", FAIL_SEED,
                                             MODEL_DIR))
    return _faulty_dir


def make_test_config(port: int, **experiment: Any) -> dict[str, Any]:
    """Three variants on the test's model: bf16 and nf4 split 50/50, and 'tight' (weight 0) with a queue of one
    on the test-only pipeline that fails FAIL_SEED, for the 503 and 500 tests. Replicas reserve no CPU: on 2 cores,
    1 CPU each would never fit."""
    common = {"model": MODEL_DIR, "resources": {"num_cpus": 0, "torch_threads": 1}}
    exp = {"weights": {"bf16": 0.5, "nf4": 0.5}, "salt": "test-salt", "sticky_key": "user"}
    exp.update(experiment)
    return {
        "app_name": APP_NAME,
        "variants": [
            {"name": "bf16", "quantization": "bf16", "gemm_sample_every": 1, **common},
            {"name": "nf4", "quantization": "nf4", "gemm_sample_every": 1, **common},
            {"name": "tight", "quantization": "bf16", "max_ongoing_requests": 1, "max_queued_requests": 1,
             "gemm_sample_every": 0, **common, "model": faulty_model_dir()},
        ],
        "experiment": exp,
        "http": {"host": "127.0.0.1", "port": port},
        "limits": {"max_steps": 200, "max_n": 4, "header_timeout_s": 3},
        "retry_after_s": 2,
        "request_timeout_s": 60,
    }


def decode_b64_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.5) -> Any:
    """Poll until `condition()` returns something truthy; fail the test with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last failure
            last = exc
        else:
            if last:
                return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")
