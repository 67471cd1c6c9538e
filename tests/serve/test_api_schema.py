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


def test_the_job_leaves_defaults_to_the_variant() -> None:
    req = parse_body(body(), LIMITS)
    job = to_job(req, LIMITS, random.Random(1))
    assert job["prompt"] == "7" and job["n"] == 1 and job["negative_prompt"] is None and job["extras"] == {}
    assert job["size"] is None and job["steps"] is None and job["guidance"] is None  # the replica's family fills them
    assert 0 <= job["seed"] < 2**31
    job = to_job(parse_body(body(seed=9, size="96x64", steps=3, guidance=2, negative_prompt="blur",
                                 max_sequence_length=32), LIMITS, {"max_sequence_length"}), LIMITS)
    assert (job["seed"], job["size"], job["steps"], job["guidance"]) == (9, "96x64", 3, 2.0)
    assert job["negative_prompt"] == "blur" and job["extras"] == {"max_sequence_length": 32}
    assert to_job(parse_body(body(size="auto"), LIMITS), LIMITS)["size"] is None  # OpenAI's "auto": the default


def test_openai_fields_that_quantserve_produces_are_accepted() -> None:
    req = parse_body(body(model="nf4", n=2, size="32x32", response_format="b64_json", output_format="png",
                          stream=False, user="u-1"), LIMITS)
    assert (req.model, req.n, req.user) == ("nf4", 2, "u-1")
    req = parse_body(body(stream=True, partial_images=0), LIMITS)
    assert req.stream is True


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"n": 5}, 422, "n"), ({"n": True}, 422, "n"), ({"n": 1.5}, 422, "n"),
    ({"steps": 101}, 422, "steps"), ({"guidance": -1}, 422, "guidance"), ({"seed": 2**31}, 422, "seed"),
    ({"size": "8x7"}, 422, "size"), ({"size": "1x1"}, 422, "size"), ({"size": "64"}, 422, "size"),
    ({"size": "64x64 "}, 422, "size"), ({"size": "64x64x64"}, 422, "size"), ({"size": "513x64"}, 422, "size"),
    ({"response_format": "url"}, 422, "response_format"), ({"output_format": "jpeg"}, 422, "output_format"),
    ({"stream": "yes"}, 422, "stream"), ({"stream": True, "response_format": "png"}, 422, "response_format"),
    ({"partial_images": 2}, 422, "partial_images"), ({"negative_prompt": 3}, 422, "negative_prompt"),
    ({"negative_prompt": "x" * 2000}, 422, "negative_prompt"),
    ({"user": "u" * 200}, 422, "user"), ({"prompt": ""}, 422, "prompt"),
    ({"prompt": 7}, 422, "prompt"), ({"device": "cuda:0"}, 422, "device"), ({"model_path": "/etc"}, 422, "model_path"),
    ({"max_sequence_length": [1]}, 422, "max_sequence_length"), ({"max_sequence_length": "x" * 300}, 422,
                                                                 "max_sequence_length"),
])
def test_every_field_is_bounded(fields: dict, status: int, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_body(body(**fields), LIMITS, {"max_sequence_length"})
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
    assert parse_size(None, LIMITS) is None and parse_size("auto", LIMITS) is None
    assert parse_size("128x128", LIMITS) == (128, 128)
    assert parse_size("512x256", LIMITS) == (512, 256)  # width x height, not only square


def test_error_body_is_openai_shaped() -> None:
    assert error_body("n: bad", 422, "n", "invalid_request") == {
        "error": {"message": "n: bad", "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}
    assert error_body("boom", 500, error_id="abc")["error"] == {
        "message": "boom", "type": "server_error", "param": None, "code": None, "error_id": "abc"}


def test_hostile_bodies_are_client_errors_naming_the_body() -> None:
    """Nesting deeper than the parser's stack and integers of thousands of digits were 500s (a RecursionError, and
    Python's int-digits limit); they are 4xx in the API's error shape."""
    deep = b'{"prompt":"7","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RequestError) as info:
        parse_body(deep, LimitsConfig(max_body_bytes=1_000_000))
    assert info.value.status == 400 and info.value.param == "body" and "nested too deeply" in str(info.value)
    for digits in (40, 5_000):
        with pytest.raises(RequestError) as info:
            parse_body(b'{"prompt":"7","seed":' + b"9" * digits + b"}", LIMITS)
        assert info.value.status == 422 and info.value.param == "body"
        assert f"an integer of {digits} digits" in str(info.value)
    # a modest nesting is parsed, then refused as an unknown field
    with pytest.raises(RequestError) as info:
        parse_body(b'{"prompt":"7","x":[[[1]]]}', LIMITS)
    assert info.value.status == 422 and info.value.param == "x"


def test_null_takes_the_default_as_openais_api_does() -> None:
    req = parse_body(body(n=None, response_format=None, output_format=None, stream=None, size=None, seed=None,
                          user=None, negative_prompt=None), LIMITS)
    assert (req.n, req.response_format, req.output_format, req.stream, req.size) == (1, "b64_json", "png", False,
                                                                                       None)


@pytest.mark.parametrize("size", ["64x64\n", "64x64 ", " 64x64", "\u0664\u0664x64", "64X64", "64x"])
def test_size_is_matched_whole_in_ascii_digits(size: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_body(body(size=size), LIMITS)
    assert info.value.status == 422 and info.value.param == "size"


# --- fuzzed bodies (issue 12): any client mistake is a RequestError with a 4xx, never another exception -----------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12), inner, max_size=4), max_leaves=20)
_fields = st.sampled_from(["prompt", "negative_prompt", "model", "n", "size", "steps", "guidance", "seed",
                           "response_format", "output_format", "stream", "partial_images", "user",
                           "max_sequence_length", "x"])


def _parse_or_client_error(raw: bytes) -> None:
    try:
        req = parse_body(raw, LIMITS, {"max_sequence_length"})
    except RequestError as exc:
        assert 400 <= exc.status < 500, (exc.status, str(exc))
        assert exc.param, str(exc)
        return
    job = to_job(req, LIMITS)  # an accepted body always makes a job
    assert 0 <= job["seed"] <= 2**31 - 1 and 1 <= job["n"] <= LIMITS.max_n


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_fields, _json, max_size=8))
def test_fuzzed_objects_are_parsed_or_refused_with_a_4xx(fields: dict) -> None:
    _parse_or_client_error(json.dumps(fields).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_fuzzed_bytes_are_parsed_or_refused_with_a_4xx(raw: bytes) -> None:
    _parse_or_client_error(raw)
