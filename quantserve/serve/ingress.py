"""The Ingress deployment: the HTTP API (FastAPI through @serve.ingress), shaped like OpenAI's images API, with the
A/B router inside it (serve/router.py): a request goes Ingress -> the variant's Diffusion replica, one Ray hop.

POST /v1/images/generations, POST /v1/feedback, GET /v1/models, GET /v1/ab (the live experiment and its rollout),
GET /v1/ab/report, POST /v1/ab/rollout (promote, rollback, pause, resume), GET /healthz, GET /readyz. A served generation carries a response id (body `id`, header X-Quantserve-Response-Id) that
/v1/feedback takes.
Every response carries X-Quantserve-Variant (the variant that served it, or 'none'). With `stream: true` the answer
is server-sent events in the shape of OpenAI's streaming images API: one `image_generation.progress` event per
denoising step, then one `image_generation.completed` event per image (or an `error` event).
No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations of the methods.
"""


import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .ab import FORCE_HEADER
from .api_schema import RequestError, error_body, parse_action, parse_body, to_job
from .auth import OPEN_PATHS, ApiKeys
from .config import LimitsConfig
from .families import families, known_extra_fields
from .feedback import FeedbackBook, ResponseIds, feedback_key, parse_feedback
from .generation import new_error_id
from .metrics import IngressMetrics
from .report import RequestLog, build_report, parse_window
from .router import ABRouter

logger = logging.getLogger("quantserve.serve")

VARIANT_HEADER = "X-Quantserve-Variant"
RESPONSE_ID_HEADER = "X-Quantserve-Response-Id"  # what POST /v1/feedback takes as its id
NO_VARIANT = "none"
MAX_FORWARDED_HEADERS = 32
PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})  # never given to the router

# /docs and /openapi.json are off unless the config's auth.docs turns them on (the docs page loads scripts from a CDN)
app = FastAPI(title="quantserve", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
              description="Quantized diffusion models behind an A/B router; OpenAI images API compatible.")



class _Guard:
    """Refuse oversized request headers (431) and requests without an accepted API key (when keys are configured;
    probes stay open), and make sure every response names its variant ('none' when no variant served it).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) wraps every request in extra
    tasks and streams. The keys and limits live on the app's state, set by Ingress.__init__ in the replica (not
    module globals: Ray ships the deployment class by value)."""

    def __init__(self, inner: Any):
        self.inner = inner

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        state = scope["app"].state
        limits = getattr(state, "limits", None) or LimitsConfig()
        headers = scope.get("headers", [])
        size = sum(len(k) + len(v) for k, v in headers)
        refusal = None
        if len(headers) > limits.max_headers or size > limits.max_header_bytes:
            message = (f"headers: {len(headers)} headers of {size} bytes; at most {limits.max_headers} headers and "
                       f"{limits.max_header_bytes} bytes in all")
            refusal = JSONResponse(error_body(message, 431, "headers", "headers_too_large"), status_code=431,
                                   headers={VARIANT_HEADER: NO_VARIANT})
        keys = getattr(state, "api_keys", None) or ApiKeys()
        if refusal is None and keys.enabled:
            path, root = scope["path"], scope.get("root_path", "")  # root_path: the app's route prefix
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            authorization = next((v for k, v in headers if k == b"authorization"), None)
            if path not in OPEN_PATHS and not keys.allows(authorization.decode("latin-1") if authorization else None):
                message = ("Incorrect API key provided (Authorization: Bearer <key>)" if authorization is not None
                           else "No API key provided: send it as 'Authorization: Bearer <key>'")
                refusal = JSONResponse(error_body(message, 401, code="invalid_api_key"), status_code=401,
                                       headers={"WWW-Authenticate": "Bearer", VARIANT_HEADER: NO_VARIANT})
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out = list(message.get("headers", []))
                if not any(k.lower() == _VARIANT_KEY for k, _ in out):
                    out.append((_VARIANT_KEY, NO_VARIANT.encode()))
                message = {**message, "headers": out}
            await send(message)

        await self.inner(scope, receive, named)


_VARIANT_KEY = VARIANT_HEADER.lower().encode()
app.add_middleware(_Guard)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods get OpenAI-shaped errors too."""
    message = f"{request.method} {request.url.path[:256]}: {exc.detail}"
    # keep the exception's own headers: a 405 carries Allow
    return JSONResponse(error_body(message, exc.status_code, code="not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code, headers={**(exc.headers or {}), VARIANT_HEADER: NO_VARIANT})


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid')}", 422, param or None), status_code=422,
                        headers={VARIANT_HEADER: NO_VARIANT})


async def read_bounded(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refusing (413) to read more than `limit` bytes, or (408) to wait more than `timeout_s` for
    it: a client that stalls its upload must not hold one of the Ingress's slots for ever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body: {declared} bytes is over the limit of {limit}", "body", "body_too_large")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body: over the limit of {limit} bytes", "body", "body_too_large")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):  # in this task: wait_for would start another one per request
            await read()
    except TimeoutError:
        raise RequestError(408, f"body: not received within {timeout_s:g} s (limits.body_timeout_s)", "body",
                           "body_timeout") from None
    return b"".join(chunks)


def server_timing(timing: dict[str, float], arrived: float) -> str:
    """The Server-Timing header of a generation: each stage's milliseconds, nested durations made exclusive.
    total: the Ingress's whole handling; ingress: its own part (parse, encode the answer); router: the A/B
    assignment; hop-replica: Ray's call to the variant's replica and back; queue: waiting for a batch; generate and
    encode: the pipeline call and PNG encoding (a batch's, shared by its requests)."""
    total = (time.perf_counter() - arrived) * 1000
    t = {k: float(v) for k, v in timing.items()}
    stages = {"total": total}
    if "router" in t:
        stages["ingress"] = total - t["router"]
    if "router" in t and "router_call" in t:
        stages["router"] = t["router"] - t["router_call"]
        if "replica" in t:
            stages["hop-replica"] = t["router_call"] - t["replica"]
    for name in ("queue", "generate", "encode"):
        if name in t:
            stages[name] = t[name]
    return ", ".join(f"{name};dur={max(0.0, ms):.2f}" for name, ms in stages.items())


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: its type on the `event:` line, the JSON on one `data:` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@serve.deployment(name="Ingress", graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Ingress:
    """Validates requests, routes them by the experiment (its user_config) to the variants, and shapes the answers."""

    def __init__(self, variants: dict[str, dict[str, Any]], limits: dict[str, Any], request_timeout_s: float = 120.0,
                 auth: dict[str, Any] | None = None, retry_after_s: int = 1):
        """`variants`: name -> {"scheme", "deployment", "family", "handle"} (the Diffusion deployment's handle)."""
        auth = auth or {}
        keys = app.state.api_keys = ApiKeys.load(auth.get("digests", ()), auth.get("file"))
        logger.info("API keys: %s", f"{len(keys)} accepted" if keys.enabled else "none (the API is open)")
        if auth.get("docs"):
            app.openapi_url, app.docs_url = "/openapi.json", "/docs"
            app.setup()  # FastAPI adds its docs routes for the URLs set
        torch.set_num_threads(1)  # the Ingress's only torch work: the shadows' small SSIM convolutions
        self.feedback = FeedbackBook(variants)
        self.log = RequestLog()  # the generations this replica answered, for /v1/ab/report
        self.response_ids = ResponseIds(feedback_key(serve.get_replica_context().app_name, keys.hex_digests()))
        self.router = ABRouter({n: v["scheme"] for n, v in variants.items()},
                               {n: v["deployment"] for n, v in variants.items()},
                               {n: v["handle"] for n, v in variants.items()}, retry_after_s,
                               {n: v.get("min_replicas", 1) for n, v in variants.items()})
        self.limits = app.state.limits = LimitsConfig.model_validate(limits)
        self.extra_fields = known_extra_fields()
        registry = families()  # the variants' families judge prompts here when they can do so without a model
        self.prompt_judges = [registry[n] for n in sorted({v["family"] for v in variants.values()}) if n in registry]
        self.request_timeout_s = request_timeout_s
        self.metrics = IngressMetrics()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve's lightweight update: a new experiment, applied live (an invalid one raises: Serve keeps the
        replica on the old one). A rollout in it is handed to the application's rollout keeper, which keeps the
        rollout's state across replica restarts and redeploys of the same config."""
        self.router.reconfigure(user_config)
        await self.router.configure_rollout()

    def _error(self, path: str, status: int, message: str, param: str | None = None, code: str | None = None,
               variant: str = NO_VARIANT, error_id: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        self.metrics.responded(path, status, variant)
        all_headers = {VARIANT_HEADER: variant, **(headers or {})}
        if error_id:
            all_headers["X-Quantserve-Error-Id"] = error_id
        return JSONResponse(error_body(message, status, param, code, error_id), status_code=status, headers=all_headers)

    @app.post("/v1/images/generations")
    async def generations(self, request: Request) -> Response:
        path = "/v1/images/generations"
        request.state.arrived = time.perf_counter()
        try:
            body = await read_bounded(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            req = parse_body(body, self.limits, self.extra_fields)
        except RequestError as exc:
            close = {"Connection": "close"} if exc.status == 408 else None  # a stalled client's connection ends here
            return self._error(path, exc.status, str(exc), exc.param, exc.code, headers=close)
        job = to_job(req, self.limits)
        refusal = self._prompt_refusal(job["prompt"])
        if refusal is not None:
            return self._error(path, 422, f"prompt: {refusal}", "prompt")
        headers = dict([(k.lower(), v[:256]) for k, v in request.headers.items()
                        if k.lower() not in PRIVATE_HEADERS][:MAX_FORWARDED_HEADERS])  # for a header sticky key
        forced = request.headers.get(FORCE_HEADER)
        if req.stream:
            stream = self.router.generate_stream(job, model=req.model, forced=forced, user=req.user, headers=headers)
            return await self._stream(path, job, stream, request.state.arrived)
        try:  # a timeout cancels the router's call, which cancels the replica's work (no extra task: asyncio.timeout)
            async with asyncio.timeout(self.request_timeout_s):
                outcome = await self.router.generate(job, model=req.model, forced=forced, user=req.user,
                                                     headers=headers)
        except TimeoutError:
            return self._error(path, 504, f"no answer within {self.request_timeout_s} s", code="timeout")
        except Exception:  # noqa: BLE001 - the router failed: a 500 with an id, logged here
            return self._internal_error(path, "the router")
        response = self._answer(path, req, job, outcome)
        self._log(outcome, request.state.arrived, job["n"])
        if "timing" in outcome:
            response.headers["Server-Timing"] = server_timing(outcome["timing"], request.state.arrived)
        return response

    def _log(self, outcome: dict[str, Any], arrived: float, images: int) -> None:
        """A variant's answer (200 or not) for the report; refusals before any variant was chosen are not its."""
        variant = outcome.get("variant")
        if variant in self.router.schemes:
            status, latency_s = int(outcome.get("status", 500)), time.perf_counter() - arrived
            self.log.add(variant, status, latency_s, images if status == 200 else 0)
            self.router.record(variant, status, latency_s)

    def _prompt_refusal(self, prompt: str) -> str | None:
        """The first variant family's reason when every variant's family refuses the prompt; else None (a variant
        may take it: its replica judges)."""
        if not self.prompt_judges:
            return None
        reasons = [judge.check_prompt(prompt) for judge in self.prompt_judges]
        return reasons[0] if all(r is not None for r in reasons) else None

    def _refused(self, path: str, outcome: dict[str, Any]) -> JSONResponse:
        """The error response for an outcome whose status is not 200."""
        status = outcome["status"]
        headers = {"Retry-After": str(outcome.get("retry_after_s", 1))} if status == 503 else None
        return self._error(path, status, outcome.get("message", "error"), outcome.get("param"), outcome.get("code"),
                           outcome.get("variant", NO_VARIANT), outcome.get("error_id"), headers)

    def _headers(self, outcome: dict[str, Any], job: dict[str, Any]) -> dict[str, str]:
        """A served response's headers; its response id (for POST /v1/feedback) is made here, once."""
        variant = outcome.get("variant", NO_VARIANT)
        outcome.setdefault("id", self.response_ids.new(variant))
        return {VARIANT_HEADER: variant, "X-Quantserve-Assignment": outcome.get("assignment", ""),
                "X-Quantserve-Replica": str(outcome.get("replica", "")), "X-Quantserve-Seed": str(job["seed"]),
                RESPONSE_ID_HEADER: outcome["id"]}

    async def _stream(self, path: str, job: dict[str, Any], stream: Any, arrived: float) -> Response:
        """Wait for the variant to accept the job (a refusal is a plain error response), then stream its events."""
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.request_timeout_s)
        except asyncio.TimeoutError:
            await stream.aclose()
            return self._error(path, 504, f"no answer within {self.request_timeout_s} s", code="timeout")
        except Exception:  # noqa: BLE001 - the router failed: a 500 with an id, logged here
            await stream.aclose()
            return self._internal_error(path, "the router")
        if first["event"] == "error":
            await stream.aclose()
            self._log(first, arrived, 0)
            return self._refused(path, first)
        variant = first.get("variant", NO_VARIANT)
        self.metrics.responded(path, 200, variant)
        headers = {**self._headers(first, job), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(self._events(first, stream, arrived, job["n"]), media_type="text/event-stream",
                                 headers=headers)

    async def _events(self, accepted: dict[str, Any], stream: Any, arrived: float, images: int
                      ) -> AsyncIterator[bytes]:
        """progress per step, completed per image; an error event when the job fails or stalls. However it ends
        (the client gone included), the router's stream is closed, and with it the replica's. A stream that ended
        with its images or an error is in the report's log (its latency: to the last image)."""
        try:
            async for event in self._event_bytes(accepted, stream):
                yield event
        finally:
            await stream.aclose()
            if "status" in accepted:
                self._log(accepted, arrived, images)

    async def _event_bytes(self, accepted: dict[str, Any], stream: Any) -> AsyncIterator[bytes]:
        size, variant = accepted["size"], accepted.get("variant", NO_VARIANT)
        while True:
            try:
                item = await asyncio.wait_for(stream.__anext__(), self.request_timeout_s)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                accepted["status"] = 504
                await stream.aclose()
                yield sse("error", {"type": "error", **error_body(f"no event within {self.request_timeout_s} s", 504,
                                                                   code="timeout")})
                return
            except Exception:  # noqa: BLE001
                accepted["status"] = 500
                error_id = new_error_id()
                logger.exception("error %s: the stream from the router failed", error_id)
                yield sse("error", {"type": "error", **error_body(f"internal error (error id {error_id})", 500,
                                                                   code="internal_error", error_id=error_id)})
                return
            now = int(time.time())
            if item["event"] == "step":
                yield sse("image_generation.progress", {
                    "type": "image_generation.progress", "created_at": now, "step": item["step"],
                    "steps": item["steps"], "size": size, "model": variant})
            elif item["event"] == "done" and item["status"] == 200:
                accepted["status"] = 200
                for i, png in enumerate(item["images"]):
                    yield sse("image_generation.completed", {
                        "type": "image_generation.completed", "created_at": now, "image_index": i,
                        "b64_json": base64.b64encode(png).decode("ascii"), "size": item.get("size", size),
                        "output_format": "png", "background": "opaque", "quality": "auto", "model": variant,
                        "quantserve": {"id": accepted.get("id"), "seed": item["seed"] + i, "steps": item["steps"],
                                       "guidance": item["guidance"], "replica": item.get("replica")}})
            elif item["event"] in ("done", "error"):
                accepted["status"] = item["status"]
                body = error_body(item.get("message", "error"), item["status"], item.get("param"), item.get("code"),
                                  item.get("error_id"))
                yield sse("error", {"type": "error", **body})
                return

    def _answer(self, path: str, req: Any, job: dict[str, Any], outcome: dict[str, Any]) -> Response:
        status = outcome["status"]
        variant = outcome.get("variant", NO_VARIANT)
        if status != 200:
            return self._refused(path, outcome)
        headers = self._headers(outcome, job)
        self.metrics.responded(path, 200, variant)
        if req.response_format == "png":
            return Response(outcome["images"][0], media_type="image/png", headers=headers)
        body = {
            "id": outcome["id"],
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii"), "revised_prompt": None}
                     for png in outcome["images"]],
            "output_format": "png",
            "size": outcome.get("size"),
            "model": variant,
            "quantserve": {"variant": variant, "assignment": outcome.get("assignment"), "seed": job["seed"],
                           "steps": outcome.get("steps"), "guidance": outcome.get("guidance"),
                           "replica": outcome.get("replica"),
                           **({"labels": outcome["labels"]} if "labels" in outcome else {})},
        }
        return JSONResponse(body, headers=headers)

    def _internal_error(self, path: str, what: str) -> JSONResponse:
        error_id = new_error_id()
        logger.exception("error %s: %s failed", error_id, what)
        return self._error(path, 500, f"internal error (error id {error_id})", code="internal_error", error_id=error_id)

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        try:
            variants = await self.router.models()
        except Exception:  # noqa: BLE001 - a 500 with an id, never a bare traceback
            return self._internal_error("/v1/models", "listing the models")
        data = [{"object": "model", "owned_by": "quantserve", "created": int(v.get("started", 0) or 0), **v}
                for v in variants]
        self.metrics.responded("/v1/models", 200, NO_VARIANT)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/ab")
    async def experiment(self) -> JSONResponse:
        try:
            state = await self.router.state()
        except Exception:  # noqa: BLE001
            return self._internal_error("/v1/ab", "reading the experiment")
        state["feedback"] = self.feedback.summary()
        self.metrics.responded("/v1/ab", 200, NO_VARIANT)
        return JSONResponse(state)

    @app.get("/v1/ab/report")
    async def ab_report(self, window: str | None = None, baseline: str | None = None) -> JSONResponse:
        """Per variant over the window (`?window=300s`; default: since this replica started): requests, error rate,
        p50/p95 latency with 95% bootstrap intervals, images/s, model bytes, fidelity against the reference
        variant, feedback; and each candidate's p95 latency ratio against the baseline (`?baseline=`; default:
        the shadow's reference variant, else the first variant)."""
        path = "/v1/ab/report"
        try:
            window_s = parse_window(window)
        except ValueError as exc:
            return self._error(path, 422, str(exc), "window")
        names = self.router.names
        shadow = self.router.splitter.describe().get("shadow") or {}
        baseline = baseline or shadow.get("variant") or names[0]
        if baseline not in names:
            return self._error(path, 422, f"baseline: unknown variant {baseline[:64]!r}; accepted: {', '.join(names)}",
                               "baseline")
        models = {m.get("id"): m for m in await self.router.models()}
        fidelity = self.router.fidelity_report(window_s)
        feedback = self.feedback.summary()
        extras = {name: {"model_bytes": models.get(name, {}).get("model_bytes"), "scheme": self.router.schemes[name],
                         "fidelity": fidelity.get(name, {}), "feedback": feedback.get(name)} for name in names}
        report = await asyncio.to_thread(build_report, self.log, names, window_s, baseline, extras)
        rollout = await self.router.rollout_state()
        if rollout is not None:
            report["rollout"] = rollout
            guards = self.router.experiment.rollout.guards.active()
            for comparison in report["comparisons"]:  # each guard's verdict over the report's window
                comparison["guards"] = await asyncio.to_thread(
                    self.router.judge_window, guards, comparison["candidate"], comparison["baseline"], window_s, self.log)
        self.metrics.responded(path, 200, NO_VARIANT)
        return JSONResponse(report)

    @app.post("/v1/ab/rollout")
    async def rollout_action(self, request: Request) -> Response:
        """{"action": "promote" | "rollback" | "pause" | "resume"}: manual control of the experiment's rollout."""
        path = "/v1/ab/rollout"
        try:
            body = await read_bounded(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            action = parse_action(body)
        except RequestError as exc:
            return self._error(path, exc.status, str(exc), exc.param, exc.code)
        client = request.client.host if request.client else "unknown"
        try:
            answer = await self.router.control_rollout(action, f"POST {path} from {client}")
        except Exception:  # noqa: BLE001
            return self._internal_error(path, f"the rollout action {action}")
        if "error" in answer:
            return self._error(path, answer["status"], answer["error"], "action", "rollout_conflict"
                               if answer["status"] == 409 else "invalid_action")
        logger.info("rollout: %s by %s", action, client)
        self.metrics.responded(path, 200, NO_VARIANT)
        return JSONResponse(answer)

    @app.post("/v1/feedback")
    async def feedback_score(self, request: Request) -> Response:
        """{"id": a response id, "score": -1..1}: counted for the variant that served that response."""
        path = "/v1/feedback"
        try:
            body = await read_bounded(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            rid, score = parse_feedback(body)
            variant = self.response_ids.variant_of(rid)
            if variant is None or variant not in self.router.schemes:
                raise RequestError(404, f"id: {rid[:64]!r} is not a response id of this app", "id",
                                   "unknown_response")
            tally = self.feedback.record(rid, variant, score)
        except RequestError as exc:
            return self._error(path, exc.status, str(exc), exc.param, exc.code)
        self.metrics.scored(variant, score, tally.total / tally.count)
        self.metrics.responded(path, 200, variant)
        return JSONResponse({"id": rid, "variant": variant, "score": score, "variant_feedback": tally.to_dict()},
                            headers={VARIANT_HEADER: variant})

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD too: some probes and load balancers send it
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self) -> JSONResponse:
        try:
            readiness = await asyncio.wait_for(self.router.readiness(), 10.0)
        except Exception as exc:  # noqa: BLE001 - not ready, with the reason
            readiness = {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:300], "variants": {}}
        status = 200 if readiness.get("ready") else 503
        self.metrics.responded("/readyz", status, NO_VARIANT)
        return JSONResponse(readiness, status_code=status)
