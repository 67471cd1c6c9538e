"""The HTTP API's request body and error shapes, shaped like OpenAI's images API, with every field bounded.

POST /v1/images/generations takes {prompt, negative_prompt?, model?, n?, size?, steps?, guidance?, seed?,
response_format?, stream?, user?} (plus OpenAI's `output_format: "png"` and `partial_images: 0`, the only values
quantserve produces), and a pipeline family's extra fields (e.g. `max_sequence_length`) at the top level. Here every
field gets its type and the app-wide bounds; the variant's replica then applies its family's rules (the size multiple,
which extras its pipeline allows, the digits' prompts) and its own, tighter limits. Requests never name files, modules
or devices: `model` is a variant name the server config declares, and an extra field must be one some family takes.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Collection
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from .config import LimitsConfig, format_validation_error, parse_size_text
from .rollout import ACTIONS

RESPONSE_FORMATS = ("b64_json", "png")
MAX_SEED = 2**31 - 1
MAX_EXTRAS = 16
EXTRA_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


MAX_INT_DIGITS = 32  # no request field needs more digits (seeds are < 2**31); Python's own limit is 4300
DEFAULTED_FIELDS = ("n", "response_format", "output_format", "stream")  # fields with a default, not None


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(422, f"body: an integer of {len(text.lstrip('-'))} digits; no field takes more than "
                                f"{MAX_INT_DIGITS}", "body", "invalid_number")
    return int(text)


class RequestError(ValueError):
    """A client mistake: an HTTP status (400, 404, 413, 422), the field it concerns and a message naming it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        self.status, self.param, self.code = status, param, code
        super().__init__(message)


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations, before the limits are applied; unknown keys land in
    `model_extra` (a family's extra fields), bounded by `parse_body`."""

    model_config = ConfigDict(extra="allow")

    prompt: StrictStr
    negative_prompt: StrictStr | None = None
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    steps: StrictInt | None = None
    guidance: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    response_format: StrictStr = "b64_json"
    output_format: Literal["png"] = "png"
    stream: StrictBool = False
    partial_images: StrictInt | None = None
    user: StrictStr | None = None

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def json_object(body: bytes) -> dict[str, Any]:
    """A body that must be one JSON object; RequestError 400 otherwise (integers are bounded while parsing)."""
    try:
        data = json.loads(body, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON: {exc}"[:300], "body", "invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's stack: no field of this API nests
        raise RequestError(400, "body: JSON nested too deeply (no request field holds arrays or objects)", "body",
                           "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(data).__name__}", "body", "invalid_json")
    return data


def parse_action(body: bytes) -> str:
    """The action of a POST /v1/ab/rollout body {"action": ...}; RequestError (4xx) naming the field otherwise."""
    data = json_object(body)
    unknown = sorted(set(data) - {"action"})
    if unknown:
        raise RequestError(422, f"{unknown[0][:64]}: unknown field; the body is {{\"action\": one of "
                                f"{', '.join(ACTIONS)}}}", unknown[0][:64])
    action = data.get("action")
    if action not in ACTIONS:
        shown = repr(action)[:64] if "action" in data else "missing"
        raise RequestError(422, f"action: got {shown}; accepted: {', '.join(ACTIONS)}", "action",
                           "invalid_action")
    return action


def parse_body(body: bytes, limits: LimitsConfig, extra_fields: Collection[str] = ()) -> ImageRequest:
    """Parse and bound a request body; a RequestError names the field. `extra_fields`: the extra request fields some
    pipeline family accepts (any other unknown key is refused here)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body: {len(body)} bytes is over the limit of {limits.max_body_bytes}", "body",
                           "body_too_large")
    data = json_object(body)
    for name in DEFAULTED_FIELDS:  # OpenAI's API takes null for an optional field: its default
        if name in data and data[name] is None:
            del data[name]
    try:
        req = ImageRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise RequestError(422, format_validation_error(exc).replace("\n", "; "), param) from None
    check_extras(req.extras, extra_fields)
    check_limits(req, limits)
    return req


def check_extras(extras: dict[str, Any], extra_fields: Collection[str]) -> None:
    """Extra fields: at most MAX_EXTRAS, each one some family accepts, each a JSON scalar."""
    for name, value in extras.items():
        if name not in extra_fields or not EXTRA_NAME.fullmatch(name):
            accepted = ", ".join(sorted(extra_fields)) or "none"
            raise RequestError(422, f"{name}: not a request field (the fields: prompt, negative_prompt, model, n, size, "
                                    f"steps, guidance, seed, response_format, output_format, stream, partial_images, "
                                    f"user; pipeline extras: {accepted})", name)
        if isinstance(value, str) and len(value) > 256 or not isinstance(value, (bool, int, float, str)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise RequestError(422, f"{name}: expected a number, a boolean or a short string (got {value!r})", name)
    if len(extras) > MAX_EXTRAS:
        raise RequestError(422, f"body: at most {MAX_EXTRAS} extra fields (got {len(extras)})", "body")


def _bounded(value: float, low: float, high: float, name: str) -> None:
    if not low <= value <= high:
        raise RequestError(422, f"{name}: must be between {low} and {high} (got {value!r})", name)


def parse_size(size: str | None, limits: LimitsConfig) -> tuple[int, int] | None:
    """'WxH' (or OpenAI's 'auto', or None: the variant's default) as (width, height), each side within the app's
    limits. Whether the variant's pipeline can make that size its replica decides."""
    if size is None or size == "auto":
        return None
    try:
        w, h = parse_size_text(size)
    except ValueError:
        raise RequestError(422, f"size: expected 'WxH' such as '512x512' or '768x512' (got {size!r})", "size") from None
    if not (limits.min_size <= w <= limits.max_size and limits.min_size <= h <= limits.max_size):
        raise RequestError(422, f"size: each side must be between {limits.min_size} and {limits.max_size} pixels "
                                f"(got {size!r})", "size")
    return w, h


def check_limits(req: ImageRequest, limits: LimitsConfig) -> None:
    """Every field within its bound."""
    if not req.prompt.strip() or len(req.prompt) > limits.max_prompt_chars:
        raise RequestError(422, f"prompt: must be 1..{limits.max_prompt_chars} characters (got {len(req.prompt)})", "prompt")
    if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(422, f"negative_prompt: at most {limits.max_prompt_chars} characters "
                                f"(got {len(req.negative_prompt)})", "negative_prompt")
    if req.model is not None and not 1 <= len(req.model) <= 64:
        raise RequestError(422, "model: a variant name is 1..64 characters", "model")
    _bounded(req.n, 1, limits.max_n, "n")
    if req.steps is not None:
        _bounded(req.steps, 1, limits.max_steps, "steps")
    if req.guidance is not None:
        _bounded(float(req.guidance), 0.0, limits.max_guidance, "guidance")
    if req.seed is not None:
        _bounded(req.seed, 0, MAX_SEED, "seed")
    if req.response_format not in RESPONSE_FORMATS:
        raise RequestError(422, f"response_format: got {req.response_format!r}; accepted: "
                                f"{', '.join(RESPONSE_FORMATS)} (quantserve keeps no image store, so no 'url')",
                           "response_format")
    if req.response_format == "png" and req.n != 1:
        raise RequestError(422, f"response_format: 'png' returns one image, so n must be 1 (got n={req.n})", "response_format")
    if req.response_format == "png" and req.stream:
        raise RequestError(422, "response_format: 'png' returns the image itself, which does not stream; use "
                                "b64_json with stream", "response_format")
    if req.partial_images not in (None, 0):
        raise RequestError(422, f"partial_images: quantserve streams one progress event per denoising step, not "
                                f"partial images: send 0 or omit it (got {req.partial_images!r})", "partial_images")
    if req.user is not None and len(req.user) > limits.max_user_chars:
        raise RequestError(422, f"user: at most {limits.max_user_chars} characters (got {len(req.user)})", "user")
    parse_size(req.size, limits)


def to_job(req: ImageRequest, limits: LimitsConfig, rng: random.Random | None = None) -> dict[str, Any]:
    """The job a Diffusion replica runs (its family fills in the defaults); a seed is drawn when the request gives
    none, so a shadow can reuse it."""
    seed = req.seed if req.seed is not None else (rng or random).randrange(0, MAX_SEED)
    size = parse_size(req.size, limits)
    return {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "n": req.n,
            "size": f"{size[0]}x{size[1]}" if size else None, "steps": req.steps,
            "guidance": None if req.guidance is None else float(req.guidance), "seed": seed, "extras": req.extras}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               error_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} (+ "error_id" for server errors)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if error_id is not None:
        error["error_id"] = error_id
    return {"error": error}
