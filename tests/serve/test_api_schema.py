"""Request parsing and bounds, without Ray or HTTP."""

from __future__ import annotations

import json
import random

import pytest
from quantserve.serve.api_schema import (
    RequestError,
    error_body,
    parse_body,
    parse_size,
    to_job,
)
from quantserve.serve.config import LimitsConfig

LIMITS = LimitsConfig()


def body(**fields: object) -> bytes:
    return json.dumps({"prompt": "7", **fields}).encode()


def test_defaults_fill_the_job() -> None:
    req = parse_body(body(), LIMITS)
    job = to_job(req, LIMITS, random.Random(1))
    assert job["prompt"] == "7" and job["n"] == 1 and job["size"] == LIMITS.default_size
    assert job["steps"] == LIMITS.default_steps and job["guidance"] == 1.0
    assert 0 <= job["seed"] < 2**31
    assert to_job(parse_body(body(seed=9, size="16x16", steps=3), LIMITS), LIMITS)["seed"] == 9


def test_openai_fields_that_quantserve_produces_are_accepted() -> None:
    req = parse_body(body(model="nf4", n=2, size="32x32", response_format="b64_json", output_format="png",
                          stream=False, user="u-1"), LIMITS)
    assert (req.model, req.n, req.user) == ("nf4", 2, "u-1")


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"n": 5}, 422, "n"), ({"n": True}, 422, "n"), ({"n": 1.5}, 422, "n"),
    ({"steps": 101}, 422, "steps"), ({"guidance": -1}, 422, "guidance"), ({"seed": 2**31}, 422, "seed"),
    ({"size": "8x9"}, 422, "size"), ({"size": "1x1"}, 422, "size"), ({"size": "64"}, 422, "size"),
    ({"response_format": "url"}, 422, "response_format"), ({"output_format": "jpeg"}, 422, "output_format"),
    ({"stream": True}, 422, "stream"), ({"user": "u" * 200}, 422, "user"), ({"prompt": ""}, 422, "prompt"),
    ({"prompt": 7}, 422, "prompt"), ({"device": "cuda:0"}, 422, "device"), ({"model_path": "/etc"}, 422, "model_path"),
])
def test_every_field_is_bounded(fields: dict, status: int, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_body(body(**fields), LIMITS)
    assert info.value.status == status and info.value.param == param
    assert param in str(info.value)


def test_body_level_errors() -> None:
    with pytest.raises(RequestError) as info:
        parse_body(b"\xff\xfe", LIMITS)
    assert info.value.status == 400 and info.value.param == "body"
    with pytest.raises(RequestError) as info:
        parse_body(b'"just a string"', LIMITS)
    assert info.value.status == 400
    with pytest.raises(RequestError) as info:
        parse_body(b" " * (LIMITS.max_body_bytes + 1), LIMITS)
    assert info.value.status == 413


def test_size_parsing() -> None:
    assert parse_size(None, LIMITS) == LIMITS.default_size
    assert parse_size("128x128", LIMITS) == 128
    assert parse_size("512x512", LIMITS) == 512


def test_error_body_is_openai_shaped() -> None:
    assert error_body("n: bad", 422, "n", "invalid_request") == {
        "error": {"message": "n: bad", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}
    assert error_body("boom", 500, error_id="abc")["error"] == {
        "message": "boom", "type": "server_error", "param": None, "code": None, "error_id": "abc"}
