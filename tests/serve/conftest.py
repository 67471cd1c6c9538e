"""One Ray instance and one running test application for the whole serve test session.

Ray starts once (2 CPUs, no dashboard, its metrics agent on a free port) and the app deploys once through the same
path as `quantserve serve` (a Ray Serve config, so the experiment can change live); every HTTP test shares it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from .helpers import APP_NAME, free_port, make_test_config, wait_for


@dataclass
class RunningApp:
    url: str
    metrics_url: str
    port: int
    base_config: dict[str, Any] = field(repr=False)

    def post(self, body: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        return requests.post(f"{self.url}/v1/images/generations", json=body, headers=headers, timeout=120, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=60)

    @contextmanager
    def experiment(self, **changes: Any) -> Iterator[dict[str, Any]]:
        """Deploy the app again with only the experiment changed (a live reconfigure), then put it back."""
        from quantserve.serve.config import parse_config
        from quantserve.serve.deploy import submit

        before = self.get("/v1/ab").json()["generation"]
        submit(parse_config(make_test_config(self.port, **changes)))
        state = wait_for(lambda: (s := self.get("/v1/ab").json())["generation"] > before and s, 60,
                         "the ABRouter to take the new experiment")
        try:
            yield state
        finally:
            submit(parse_config(self.base_config))
            wait_for(lambda: self.get("/v1/ab").json()["generation"] > state["generation"], 60,
                     "the ABRouter to take the original experiment back")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, int]]:
    """A local Ray instance for the session; Serve and Ray are shut down at the end."""
    import ray
    from ray import serve

    metrics_port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False,
             _metrics_export_port=metrics_port)  # replica logs stay in Ray's session logs, out of pytest's output
    try:
        yield {"metrics_port": metrics_port}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def app(ray_cluster: dict[str, int]) -> RunningApp:
    """The test application (bf16, nf4 and 'tight'), deployed once and shared."""
    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy

    port = free_port()
    config = make_test_config(port)
    deploy(parse_config(config), timeout_s=300)
    running = RunningApp(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics",
                         port, config)
    wait_for(lambda: running.get("/readyz").status_code == 200, 120, f"{APP_NAME} to be ready")
    return running
