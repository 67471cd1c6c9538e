"""API keys: unit checks of quantserve.serve.auth, then a keyed application on the real server (Ray Serve)."""

from __future__ import annotations

import hashlib
import logging

import pytest
import requests

from quantserve.serve.auth import ENV_VAR, ApiKeys, AuthError, config_digests, digest, file_digests
from quantserve.serve.config import ConfigError, parse_config

from .helpers import APP_NAME, make_test_config, wait_for

KEY = "qs-test-key-0123456789abcdef"
FILE_KEY = "qs-file-key-abcdefghijklmnop"
ENV_KEY = "qs-env-key-zyxwvutsrqponmlk"
AUTH_PREFIX = "/auth"


def test_keys_from_every_source_and_the_bearer_check(tmp_path):
    f = tmp_path / "keys"
    f.write_text(f"# the team's keys\n{FILE_KEY}\n\n")
    keys = ApiKeys.load(config_digests([KEY]), str(f), environ={ENV_VAR: f" {ENV_KEY} ,"})
    assert keys.enabled and len(keys) == 3
    for k in (KEY, FILE_KEY, ENV_KEY):
        assert keys.allows(f"Bearer {k}") and keys.allows(f"bearer  {k} ")
    for bad in (None, "", KEY, f"Basic {KEY}", "Bearer ", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}"):
        assert not keys.allows(bad), bad
    # a digest in the config stands for its key; only digests are kept, and repr shows neither
    by_digest = ApiKeys(config_digests([f"sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]))
    assert by_digest.allows(f"Bearer {KEY}") and digest(KEY) == hashlib.sha256(KEY.encode()).hexdigest()
    assert KEY not in repr(keys) and digest(KEY) not in repr(keys)
    assert not ApiKeys.load(environ={}).enabled and ApiKeys().allows(None)


def test_unusable_keys_are_refused_naming_the_source_not_the_key(tmp_path):
    with pytest.raises(AuthError, match=r"auth.api_keys.1: an API key needs at least 16 characters") as info:
        config_digests([KEY, "short"])
    assert "short" not in str(info.value)
    with pytest.raises(AuthError, match="needs 64 hex digits"):
        config_digests(["sha256:abc"])
    with pytest.raises(AuthError, match="auth.api_keys_file: cannot read"):
        file_digests(tmp_path / "missing")
    (tmp_path / "k").write_text("ok-but-has a space-in-it\n")
    with pytest.raises(AuthError, match="line 1"):
        file_digests(tmp_path / "k")
    with pytest.raises(ConfigError, match="auth.api_keys.0") as info:
        parse_config({**make_test_config(8000), "auth": {"api_keys": ["tiny"]}})
    assert "tiny" not in str(info.value)


def test_the_config_passes_digests_never_keys():
    cfg = parse_config({**make_test_config(8000), "auth": {"api_keys": [KEY]}})
    args = cfg.auth.ingress_args()
    assert args == {"digests": [digest(KEY)], "file": None, "docs": False}
    assert KEY not in repr(cfg.auth) and KEY not in str(args)


@pytest.fixture(scope="module")
def keyed(ray_cluster, serve_port, tmp_path_factory):
    """The digits app again at /auth with keys from the config (a digest) and from a file, docs on."""
    from quantserve.serve.deploy import deploy

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(FILE_KEY + "\n")
    config = make_test_config(serve_port)
    config.update(app_name=f"{APP_NAME}-auth", variants=config["variants"][:1],
                  experiment={"weights": {"bf16": 1}},
                  auth={"api_keys": [f"sha256:{digest(KEY)}"], "api_keys_file": str(keys), "docs": True})
    deploy(parse_config(config), timeout_s=300, route_prefix=AUTH_PREFIX)
    url = f"http://127.0.0.1:{serve_port}{AUTH_PREFIX}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=30).status_code == 200, 120, "the keyed app")
    yield url
    from ray import serve

    serve.delete(f"{APP_NAME}-auth")


def test_keys_on_the_real_server(keyed, caplog):
    body = {"prompt": "7", "steps": 2, "size": "16x16", "seed": 1}
    none = requests.post(f"{keyed}/v1/images/generations", json=body, timeout=60)
    assert none.status_code == 401 and none.headers["WWW-Authenticate"] == "Bearer"
    assert none.json()["error"] == {"message": "No API key provided: send it as 'Authorization: Bearer <key>'",
                                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
    wrong = requests.post(f"{keyed}/v1/images/generations", json=body, timeout=60,
                          headers={"Authorization": "Bearer not-the-key-000000000"})
    assert wrong.status_code == 401 and "not-the-key" not in wrong.text
    assert requests.get(f"{keyed}/v1/models", timeout=30).status_code == 401
    for key in (KEY, FILE_KEY):
        ok = requests.post(f"{keyed}/v1/images/generations", json=body, timeout=120,
                           headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
    # the rollout's manual control is behind the keys too (this app has no rollout: past the key, a 409)
    assert requests.post(f"{keyed}/v1/ab/rollout", json={"action": "pause"}, timeout=30).status_code == 401
    paused = requests.post(f"{keyed}/v1/ab/rollout", json={"action": "pause"}, timeout=30,
                           headers={"Authorization": f"Bearer {KEY}"})
    assert paused.status_code == 409 and "no rollout in the experiment" in paused.json()["error"]["message"]
    # probes stay open; the docs were enabled for this app
    assert requests.get(f"{keyed}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{keyed}/readyz", timeout=30).status_code == 200
    docs = requests.get(f"{keyed}/openapi.json", timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    assert docs.status_code == 200 and "/v1/images/generations" in docs.json()["paths"]
    assert KEY not in caplog.text and FILE_KEY not in caplog.text


def test_without_keys_the_api_is_open_and_the_docs_are_off(app):
    assert app.get("/v1/models").status_code == 200
    assert app.get("/docs").status_code == 404 and app.get("/openapi.json").status_code == 404


logging.getLogger("quantserve").setLevel(logging.INFO)
