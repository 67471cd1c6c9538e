"""One Ray instance and the running test applications for the whole serve test session.

Ray starts once (2 CPUs, no dashboard, its metrics agent on a free port), Serve's HTTP proxy once on a free port,
and each app deploys once through the same path as `quantserve serve` (a Ray Serve config, so the experiment can
change live): the digits app at `/`, and, for the pipeline tests, a tiny-FLUX app at `/t2i` beside it (Serve has one
proxy, so the apps share its port and differ by name and route prefix). Every HTTP test shares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from .helpers import APP_NAME, T2I_APP_NAME, T2I_PREFIX, free_port, make_t2i_config, make_test_config, wait_for


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
                         "the Ingress to take the new experiment")
        try:
            yield state
        finally:
            now = self.get("/v1/ab").json()  # the Ingress replica may be another one by now (a test killed it)
            submit(parse_config(self.base_config))
            wait_for(lambda: (s := self.get("/v1/ab").json())["generation"] > now["generation"]
                     or s["router"]["pid"] != now["router"]["pid"], 60,
                     "the Ingress to take the original experiment back")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, int]]:
    """A local Ray instance for the session; Serve and Ray are shut down at the end."""
    import ray
    from ray import serve

    from quantserve.serve.config import parse_config
    from quantserve.serve.proxy_guard import guarded_proxy

    metrics_port = free_port()
    with guarded_proxy(parse_config(make_test_config(8000)).limits):  # as `quantserve serve` starts Ray
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
def serve_port(ray_cluster: dict[str, int]) -> int:
    """Serve's HTTP proxy, started once on a free port: every app of the session answers there."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture(scope="session")
def app(ray_cluster: dict[str, int], serve_port: int) -> RunningApp:
    """The test application (bf16, nf4 and 'tight'), deployed once and shared."""
    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy

    port = serve_port
    config = make_test_config(port)
    deploy(parse_config(config), timeout_s=300)
    running = RunningApp(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics",
                         port, config)
    wait_for(lambda: running.get("/readyz").status_code == 200, 120, f"{APP_NAME} to be ready")
    return running


@pytest.fixture(scope="session")
def t2i_app(ray_cluster: dict[str, int], serve_port: int) -> RunningApp:
    """A second application in the same Serve instance: the tiny FLUX pipeline, unquantized and with
    {transformer: nf4, text_encoder_2: int8wo}, float32, at route prefix /t2i."""
    from quantserve.serve.config import parse_config
    from quantserve.serve.deploy import deploy

    config = make_t2i_config(serve_port)
    deploy(parse_config(config), timeout_s=300, route_prefix=T2I_PREFIX)
    running = RunningApp(f"http://127.0.0.1:{serve_port}{T2I_PREFIX}",
                         f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics", serve_port, config)
    wait_for(lambda: running.get("/readyz").status_code == 200, 120, f"{T2I_APP_NAME} to be ready")
    return running
