"""The HTTP API's request body and error shapes, shaped like OpenAI's images API, with every field bounded.

POST /v1/images/generations takes {prompt, model?, n?, size?, steps?, guidance?, seed?, response_format?, user?}
(plus OpenAI's `output_format: "png"` and `stream: false`, the only values quantserve produces). Requests never name
files, modules or devices: `model` is a variant name the server config declares.
"""

from __future__ import annotations

import json
import random
import re
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

from .config import LimitsConfig, format_validation_error

RESPONSE_FORMATS = ("b64_json", "png")
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SEED = 2**31 - 1


class RequestError(ValueError):
    """A client mistake: an HTTP status (400, 404, 413, 422), the field it concerns and a message naming it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request"):
        self.status, self.param, self.code = status, param, code
        super().__init__(message)


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations, before the limits are applied."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt = 1
    size: StrictStr | None = None
    steps: StrictInt | None = None
    guidance: StrictFloat | StrictInt = 1.0
    seed: StrictInt | None = None
    response_format: StrictStr = "b64_json"
    output_format: Literal["png"] = "png"
    stream: StrictBool = False
    user: StrictStr | None = None


def parse_body(body: bytes, limits: LimitsConfig) -> ImageRequest:
    """Parse and bound a request body; a RequestError names the field."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body: {len(body)} bytes is over the limit of {limits.max_body_bytes}", "body",
                           "body_too_large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"body: not valid JSON: {exc}", "body", "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(data).__name__}", "body", "invalid_json")
    try:
        req = ImageRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise RequestError(422, format_validation_error(exc).replace("\n", "; "), param) from None
    check_limits(req, limits)
    return req


def _bounded(value: float, low: float, high: float, name: str) -> None:
    if not low <= value <= high:
        raise RequestError(422, f"{name}: must be between {low} and {high} (got {value!r})", name)


def parse_size(size: str | None, limits: LimitsConfig) -> int:
    """'WxH' to one side length: images are square, each side within the limits."""
    if size is None:
        return limits.default_size
    match = SIZE_PATTERN.match(size)
    if not match:
        raise RequestError(422, f"size: expected 'WxH' such as '64x64' (got {size!r})", "size")
    w, h = int(match.group(1)), int(match.group(2))
    if w != h:
        raise RequestError(422, f"size: images are square, width must equal height (got {size!r})", "size")
    if not limits.min_size <= w <= limits.max_size:
        raise RequestError(422, f"size: side must be between {limits.min_size} and {limits.max_size} pixels "
                                f"(got {size!r})", "size")
    return w


def check_limits(req: ImageRequest, limits: LimitsConfig) -> None:
    """Every field within its bound."""
    if not req.prompt.strip() or len(req.prompt) > limits.max_prompt_chars:
        raise RequestError(422, f"prompt: must be 1..{limits.max_prompt_chars} characters (got {len(req.prompt)})", "prompt")
    if req.model is not None and not 1 <= len(req.model) <= 64:
        raise RequestError(422, "model: a variant name is 1..64 characters", "model")
    _bounded(req.n, 1, limits.max_n, "n")
    if req.steps is not None:
        _bounded(req.steps, 1, limits.max_steps, "steps")
    _bounded(float(req.guidance), 0.0, limits.max_guidance, "guidance")
    if req.seed is not None:
        _bounded(req.seed, 0, MAX_SEED, "seed")
    if req.response_format not in RESPONSE_FORMATS:
        raise RequestError(422, f"response_format: got {req.response_format!r}; accepted: "
                                f"{', '.join(RESPONSE_FORMATS)} (quantserve keeps no image store, so no 'url')",
                           "response_format")
    if req.response_format == "png" and req.n != 1:
        raise RequestError(422, f"response_format: 'png' returns one image, so n must be 1 (got n={req.n})", "response_format")
    if req.stream:
        raise RequestError(422, "stream: streaming is not supported; omit it or send false", "stream")
    if req.user is not None and len(req.user) > limits.max_user_chars:
        raise RequestError(422, f"user: at most {limits.max_user_chars} characters (got {len(req.user)})", "user")
    parse_size(req.size, limits)


def to_job(req: ImageRequest, limits: LimitsConfig, rng: random.Random | None = None) -> dict[str, Any]:
    """The job a Diffusion replica runs; a seed is drawn when the request gives none (so a shadow can reuse it)."""
    seed = req.seed if req.seed is not None else (rng or random).randrange(0, MAX_SEED)
    return {"prompt": req.prompt, "n": req.n, "size": parse_size(req.size, limits),
            "steps": req.steps if req.steps is not None else limits.default_steps,
            "guidance": float(req.guidance), "seed": seed}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None,
               error_id: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}} (+ "error_id" for server errors)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    error: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if error_id is not None:
        error["error_id"] = error_id
    return {"error": error}
