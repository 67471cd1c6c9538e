"""The serve config: variants (model, scheme, kernel policy, scaling, resources), the A/B experiment, HTTP and limits.

It is a pydantic model, written as YAML on disk (see examples/serve.yaml). Every field has a bound; an error names the
field (`variants.1.quantization: ...`). `default_config()` is what `quantserve serve` runs with no file: the embedded
digits model in two variants, bf16 and nf4, split 50/50.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from quantserve.runtime.kernel_policy import validate_kernel_policy

from .ab import validate_sticky_key, validate_weights
from .quantization import BF16_NAMES, check_quantization, quantization_label

VARIANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")  # "WxH", ASCII digits; always matched with fullmatch


DEPLOYMENT_PREFIX = "Diffusion_"  # a variant's deployment is named DEPLOYMENT_PREFIX + its name

class ConfigError(ValueError):
    """A serve config that cannot be used; the message names every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling of one variant's replicas.

    `policy: requests` is Ray's own policy (replicas = ongoing requests / target_ongoing_requests). `policy: work`
    is quantserve's (serve/autoscaling.py): each replica reports its pending work in seconds, estimated from the
    variant's measured seconds per image-step at each size, and the variant gets enough replicas to keep the
    expected queue wait at `target_wait_s`. `min_replicas: 0` lets an idle variant go to zero replicas after
    `downscale_to_zero_delay_s`; its next request waits for a cold start."""

    policy: Literal["requests", "work"] = "requests"
    min_replicas: int = Field(1, ge=0, le=64)
    max_replicas: int = Field(1, ge=1, le=64)
    target_ongoing_requests: float = Field(4.0, gt=0, le=1024, description="policy: requests")
    target_wait_s: float = Field(2.0, gt=0, le=3600, description="policy: work; the queue wait to keep")
    upscale_delay_s: float = Field(5.0, ge=0, le=3600)
    downscale_delay_s: float = Field(60.0, ge=0, le=3600)
    look_back_period_s: float = Field(12.0, gt=0, le=3600,
                                      description="the window Serve averages the replicas' metrics over (Ray's "
                                                  "default 30 s slows every reaction); above metrics_interval_s")
    metrics_interval_s: float = Field(1.0, gt=0, le=60, description=(
        "how often replicas and handles push their autoscaling figures to Serve's controller. Ray 2.60 reads it "
        "from here (its deprecated `metrics_interval_s`, default 10 s: a load step would wait up to 10 s to be "
        "seen); the environment variables meant to replace it are set too (serve/proxy_guard.py)"))
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, le=24 * 3600,
                                                    description="1 -> 0 after this long idle (min_replicas: 0); "
                                                                "default: downscale_delay_s")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.downscale_to_zero_delay_s is not None and self.min_replicas > 0:
            raise ValueError("downscale_to_zero_delay_s needs min_replicas: 0 (it is the delay from 1 replica to 0)")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"look_back_period_s ({self.look_back_period_s}) must be greater than metrics_interval_s "
                             f"({self.metrics_interval_s}): the window averages several pushes")
        return self

    def to_ray(self) -> dict[str, Any]:
        """Ray Serve's autoscaling_config; a variant may start at zero only when min_replicas is 0."""
        d = self.model_dump(exclude={"policy", "target_wait_s", "downscale_to_zero_delay_s"})
        d["initial_replicas"] = max(1, self.min_replicas)  # a deploy proves the variant loads, even one that idles at 0
        if self.downscale_to_zero_delay_s is not None:
            d["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.policy == "work":
            from .autoscaling import ray_policy_config

            d["policy"] = ray_policy_config(self.target_wait_s)
        return d


class AutotuneConfig(_Strict):
    """Deploy-time autotune (serve/tuning.py): at start a replica times the kernels for the layer shapes and M
    buckets its serving implies that the autotune cache lacks for its device, then routes each M to its winner."""

    on_start: bool = Field(True, description="tune at replica start (false: route from the cache or the fixed "
                                             "preference, as `quantserve autotune` left it)")
    budget_s: float = Field(120.0, ge=0, le=3600, description="the most seconds of tuning per replica start; what "
                                                              "is left untuned keeps the fixed preference")


# Ray's own resources, which a replica reserves through their own fields (or not at all), not `resources.custom`
RESERVED_RESOURCES = {"CPU": "resources.num_cpus", "GPU": "resources.num_gpus", "memory": "",
                      "object_store_memory": ""}


class ResourcesConfig(_Strict):
    """What one replica reserves from Ray, and the torch threads it computes with."""

    num_cpus: float = Field(0.5, ge=0, le=256)
    num_gpus: float = Field(0.0, ge=0, le=16)
    torch_threads: int = Field(1, ge=1, le=256)
    custom: dict[str, float] = Field(default_factory=dict, description=(
        "Ray custom resources one replica reserves, name -> amount (0 < amount <= 1024), e.g. {fake_gpu: 1}, or "
        "on Kubernetes a resource a worker group advertises for its accelerator type; a replica is placed only on "
        "a node that has them, and Ray's cluster autoscaler adds such a node when none has them free"))

    @field_validator("custom")
    @classmethod
    def _custom(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name.strip():
                raise ValueError("a custom resource needs a non-empty name")
            if name in RESERVED_RESOURCES:
                own = RESERVED_RESOURCES[name]
                raise ValueError(f"{name!r} is Ray's own resource, not a custom one" + (f": use {own}" if own else ""))
            if not (isinstance(amount, (int, float)) and math.isfinite(amount) and 0 < amount <= 1024):
                raise ValueError(f"{name}: the amount must be > 0 and <= 1024 (got {amount!r})")
        return value


class BatchingConfig(_Strict):
    """@serve.batch of compatible requests (same steps and guidance), counted in images."""

    max_batch_images: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10, description=(
        "how long a batch's first request waits for others; 0: none (requests that arrive while a batch runs form "
        "the next one, so batches still fill under load and an idle replica answers at once)"))


def parse_size_text(text: str) -> tuple[int, int]:
    """'WxH' as (width, height); ValueError when the text is not of that form (matched whole, digits only)."""
    match = SIZE_PATTERN.fullmatch(text)
    if not match:
        raise ValueError(f"expected 'WxH' such as '512x512' or '768x512', got {text!r}")
    return int(match.group(1)), int(match.group(2))


class VariantLimits(_Strict):
    """One variant's own request bounds, each at most the app's `limits` (None: the app's value)."""

    max_n: int | None = Field(None, ge=1, le=256)
    max_steps: int | None = Field(None, ge=1, le=10_000)
    default_steps: int | None = Field(None, ge=1, le=10_000)
    max_size: int | None = Field(None, ge=1, le=4096, description="largest width or height, pixels")
    default_size: str | None = Field(None, description="'WxH' used when a request gives no size")
    max_prompt_chars: int | None = Field(None, ge=1, le=10_000)

    @field_validator("default_size")
    @classmethod
    def _default_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size_text(value)
        return value


@dataclass(frozen=True)
class ResolvedLimits:
    """The bounds a variant's replica applies: its own limits over the app's. Plain data, passed to the replica."""

    max_n: int
    max_steps: int
    default_steps: int
    min_size: int
    max_size: int
    default_width: int
    default_height: int
    max_guidance: float
    max_prompt_chars: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedLimits:
        return cls(**data)


class VariantConfig(_Strict):
    """One model variant: a Diffusion deployment with its own scheme, kernel policy, scaling and resources."""

    name: str = Field(pattern=VARIANT_NAME_PATTERN)
    model: str | None = Field(None, description="a diffusers pipeline directory (model_index.json), or a digits model "
                                                "directory; None: the embedded digits model")
    quantization: str | dict[str, Any] | None = Field(
        "bf16", description="a scheme name (bf16, nf4, ...), a quantization_config block (the denoiser), a mapping "
                            "component -> scheme or block, or a PipelineQuantizationConfig (quant_backend, "
                            "quant_kwargs, components_to_quantize; or quant_mapping)")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    kernel_policy: dict[str, Any] = Field(default_factory=dict)
    limits: VariantLimits = Field(default_factory=VariantLimits)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_ongoing_requests: int = Field(8, ge=1, le=1024)
    max_queued_requests: int = Field(32, ge=0, le=100_000)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    autotune: AutotuneConfig = Field(default_factory=AutotuneConfig)
    gemm_sample_every: int = Field(20, ge=0, le=1_000_000, description="time the layers' GEMMs every N batches (0: never)")
    health_check_period_s: float = Field(10.0, gt=0, le=3600)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or len(value) > 4096):
            raise ValueError("expected a model directory path (1..4096 characters) or null for the embedded model")
        return value

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, value: Any) -> Any:
        check_quantization(value)
        return value

    @field_validator("kernel_policy")
    @classmethod
    def _kernel_policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_kernel_policy(value, "")  # the field path comes from pydantic's location

    def quantization_spec(self) -> str | dict[str, Any] | None:
        """What load_pipeline / load_model take: None for bf16, else the scheme name, block or mapping."""
        q = self.quantization
        return None if q is None or (isinstance(q, str) and q in BF16_NAMES) else q

    @property
    def scheme_label(self) -> str:
        """A short label for metrics: the scheme name, a block's quant_method, or 'component=scheme, ...'."""
        return quantization_label(self.quantization_spec())

    @property
    def deployment_name(self) -> str:
        return f"{DEPLOYMENT_PREFIX}{self.name}"

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.resources.num_cpus, "num_gpus": self.resources.num_gpus}
        if self.resources.custom:
            options["resources"] = dict(self.resources.custom)
        return options


class ShadowConfig(_Strict):
    """Mirror a sampled share of requests onto another variant (same seed) after the response, and compare."""

    variant: str | None = None
    sample_rate: float = Field(0.0, ge=0.0, le=1.0)


class RolloutGuards(_Strict):
    """What must hold over a rollout step's window for the candidate to move on; a guard set to null is not checked.
    Fidelity guards (SSIM, pixel MAE) judge the shadow comparisons of the candidate against the baseline."""

    max_error_rate: float | None = Field(0.01, ge=0, le=1, description="the candidate's share of 5xx answers")
    max_p95_latency_ratio: float | None = Field(1.2, gt=0, le=1000,
                                                description="candidate p95 latency / baseline p95, same window")
    min_ssim: float | None = Field(None, ge=-1, le=1, description="mean SSIM of the candidate against the baseline")
    max_pixel_mae: float | None = Field(None, ge=0, le=1, description="mean absolute pixel difference (0..1)")

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class RolloutConfig(_Strict):
    """Progressive rollout: the candidate's share of the candidate + baseline traffic climbs through `steps`; each
    step lasts at least `step_interval_s` and needs `min_requests` candidate requests, then every guard must hold to
    move on; one failing guard rolls the candidate back to 0 and stops. The last step (1.0) completes it."""

    candidate: str
    baseline: str
    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0], min_length=1, max_length=32)
    step_interval_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)
    min_requests: int = Field(200, ge=1, le=10_000_000)
    min_comparisons: int = Field(10, ge=1, le=1_000_000,
                                 description="shadow comparisons a step needs before the fidelity guards are judged")
    guards: RolloutGuards = Field(default_factory=RolloutGuards)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[float]) -> list[float]:
        if any(not math.isfinite(s) or not 0 < s <= 1 for s in value):
            raise ValueError(f"every step is a candidate share in (0, 1], got {value}")
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"steps must increase, got {value}")
        if value[-1] != 1.0:
            raise ValueError(f"the last step must be 1.0 (the candidate takes all of the baseline's traffic), got {value}")
        return value


class ExperimentConfig(_Strict):
    """The A/B split; the Ingress's user_config, so it changes live without restarting replicas."""

    weights: dict[str, float] = Field(default_factory=dict, description="variant -> weight (>= 0); empty: equal")
    salt: str = Field("quantserve", min_length=1, max_length=128)
    sticky_key: str = Field("user", description="'user', 'none' or 'header:<Header-Name>'")
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    rollout: RolloutConfig | None = None

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise ValueError(f"weights must be finite numbers >= 0, got {bad}")
        return value

    @field_validator("sticky_key")
    @classmethod
    def _sticky(cls, value: str) -> str:
        return validate_sticky_key(value, "")

    def resolved_weights(self, variants: list[str]) -> dict[str, float]:
        """Weights for every variant (equal when none are given)."""
        return validate_weights(self.weights or {name: 1.0 for name in variants}, variants, "experiment.weights")

    def check(self, variants: list[str]) -> None:
        """Validate against the variants served: known names, a positive total, a known shadow."""
        self.resolved_weights(variants)
        if self.shadow.variant is not None and self.shadow.variant not in variants:
            raise ValueError(f"experiment.shadow.variant: unknown variant {self.shadow.variant!r}; "
                             f"variants: {', '.join(variants)}")
        if self.rollout is not None:
            self._check_rollout(self.rollout, variants)

    def _check_rollout(self, rollout: RolloutConfig, variants: list[str]) -> None:
        for role in ("candidate", "baseline"):
            if getattr(rollout, role) not in variants:
                raise ValueError(f"experiment.rollout.{role}: unknown variant {getattr(rollout, role)!r}; "
                                 f"variants: {', '.join(variants)}")
        if rollout.candidate == rollout.baseline:
            raise ValueError(f"experiment.rollout: candidate and baseline are both {rollout.candidate!r}; "
                             "name two different variants")
        weights = self.resolved_weights(variants)
        if weights[rollout.candidate] + weights[rollout.baseline] <= 0:
            raise ValueError(f"experiment.weights: the rollout splits the share of {rollout.candidate} + "
                             f"{rollout.baseline}, which is 0; give either a weight > 0")
        fidelity = [g for g in ("min_ssim", "max_pixel_mae") if getattr(rollout.guards, g) is not None]
        if fidelity and (self.shadow.variant != rollout.baseline or self.shadow.sample_rate <= 0):
            raise ValueError(f"experiment.rollout.guards.{fidelity[0]}: fidelity guards judge shadow comparisons "
                             f"against the baseline; set experiment.shadow to {{variant: {rollout.baseline}, "
                             f"sample_rate: > 0}} (it is {self.shadow.model_dump()})")


class HTTPConfig(_Strict):
    host: str = Field("127.0.0.1", min_length=1, max_length=255)
    port: int = Field(8000, ge=1, le=65535)


class AuthConfig(_Strict):
    """Optional API keys (quantserve/serve/auth.py): clients send `Authorization: Bearer <key>`; with no key from
    any source (these, or $QUANTSERVE_API_KEY on the Ingress replicas) the API is open."""

    api_keys: list[str] = Field(default_factory=list, max_length=1000,
                                description="keys, or 'sha256:<hex>' digests of keys (better: the file need not "
                                            "hold the keys themselves)")
    api_keys_file: str | None = Field(None, description="a file on the Ingress replicas' machines with one key per "
                                                        "line (e.g. a mounted Kubernetes Secret)")
    docs: bool = Field(False, description="serve /docs and /openapi.json (the docs page loads scripts from a CDN)")

    @model_validator(mode="after")
    def _keys_are_usable(self) -> AuthConfig:
        from .auth import AuthError, config_digests

        try:
            config_digests(self.api_keys)
        except AuthError as exc:
            raise ValueError(str(exc)) from None
        return self

    def __repr__(self) -> str:  # never the keys
        return (f"AuthConfig(api_keys=<{len(self.api_keys)} keys>, api_keys_file={self.api_keys_file!r}, "
                f"docs={self.docs})")

    __str__ = __repr__

    def ingress_args(self) -> dict[str, Any]:
        """What the Ingress needs: digests only, never the keys."""
        from .auth import config_digests

        return {"digests": config_digests(self.api_keys), "file": self.api_keys_file, "docs": self.docs}


class MetricsConfig(_Strict):
    """Port of Ray's metrics agent, which serves the Prometheus exposition at /metrics."""

    port: int = Field(8080, ge=1, le=65535)


class LimitsConfig(_Strict):
    """Bounds of every request field."""

    max_n: int = Field(4, ge=1, le=256)
    max_steps: int = Field(100, ge=1, le=10_000)
    default_steps: int = Field(25, ge=1, le=10_000)
    min_size: int = Field(8, ge=1, le=4096)
    max_size: int = Field(512, ge=1, le=4096)
    default_size: int = Field(64, ge=1, le=4096)
    max_guidance: float = Field(20.0, ge=1.0, le=100.0)
    max_prompt_chars: int = Field(1000, ge=1, le=10_000)
    max_user_chars: int = Field(128, ge=1, le=10_000)
    max_body_bytes: int = Field(16_384, ge=256, le=10_000_000)
    max_header_bytes: int = Field(16_384, ge=1024, le=1_048_576, description="all request headers together (431 beyond)")
    body_timeout_s: float = Field(10.0, gt=0, le=600, description="the most time a client may take to send its body "
                                                                 "(408 beyond): a stalled upload frees its slot")
    max_headers: int = Field(100, ge=8, le=10_000, description="request headers (431 beyond)")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="the most time a client may take to send its "
                                                                   "request line and headers (408 beyond; Serve's "
                                                                   "proxy, set at start)")

    @model_validator(mode="after")
    def _consistent(self) -> LimitsConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        if not self.min_size <= self.default_size <= self.max_size:
            raise ValueError(f"default_size ({self.default_size}) must lie in [min_size, max_size]")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) must be <= max_steps ({self.max_steps})")
        return self

    def for_variant(self, own: VariantLimits, where: str = "limits") -> ResolvedLimits:
        """The variant's limits over these; a ValueError names the variant's field that exceeds the app's bound."""
        for name in ("max_n", "max_steps", "max_size", "max_prompt_chars"):
            value = getattr(own, name)
            if value is not None and value > getattr(self, name):
                raise ValueError(f"{where}.{name} ({value}) must be <= limits.{name} ({getattr(self, name)}): the "
                                 "app's limits bound every variant")
        max_steps = own.max_steps or self.max_steps
        default_steps = own.default_steps or min(self.default_steps, max_steps)
        if default_steps > max_steps:
            raise ValueError(f"{where}.default_steps ({default_steps}) must be <= max_steps ({max_steps})")
        max_size = own.max_size or self.max_size
        width, height = parse_size_text(own.default_size) if own.default_size else (self.default_size,) * 2
        if own.default_size and not all(self.min_size <= side <= max_size for side in (width, height)):
            raise ValueError(f"{where}.default_size ({own.default_size}): each side must lie in "
                             f"[{self.min_size}, {max_size}]")
        width, height = min(width, max_size), min(height, max_size)
        return ResolvedLimits(max_n=own.max_n or self.max_n, max_steps=max_steps, default_steps=default_steps,
                              min_size=self.min_size, max_size=max_size, default_width=width, default_height=height,
                              max_guidance=self.max_guidance,
                              max_prompt_chars=own.max_prompt_chars or self.max_prompt_chars)


class FrontConfig(_Strict):
    """The Ingress deployment (the HTTP API and the A/B router): light, CPU-free by default, with room for many
    requests in flight."""

    num_replicas: int = Field(1, ge=1, le=64)
    num_cpus: float = Field(0.0, ge=0, le=64)
    max_ongoing_requests: int = Field(256, ge=1, le=100_000)


class ServeConfig(_Strict):
    """The whole application: what `quantserve serve CONFIG.yaml` and `build_app` read."""

    app_name: str = Field("quantserve", pattern=VARIANT_NAME_PATTERN)
    variants: list[VariantConfig] = Field(min_length=1, max_length=32)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    ingress: FrontConfig = Field(default_factory=FrontConfig)
    request_timeout_s: float = Field(120.0, gt=0, le=3600)
    retry_after_s: int = Field(1, ge=1, le=3600)
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _no_router_block(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "router" in data:
            raise ValueError("router: the A/B router runs inside the Ingress since issue 13 (one Ray hop fewer per "
                             "request); move num_replicas / num_cpus / max_ongoing_requests to `ingress`")
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> ServeConfig:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variants: duplicate name(s) {', '.join(dupes)}")
        self.experiment.check(names)
        for i, v in enumerate(self.variants):
            limits = self.limits.for_variant(v.limits, f"variants.{i}.limits")
            if v.batching.max_batch_images < limits.max_n:
                where = f"variants.{i}.limits.max_n" if v.limits.max_n else "limits.max_n"
                raise ValueError(f"variants.{i}.batching.max_batch_images ({v.batching.max_batch_images}) must be >= "
                                 f"{where} ({limits.max_n}): a request's images run in one batch")
        return self

    def variant_limits(self, name: str) -> ResolvedLimits:
        """The bounds the named variant's replica applies."""
        return self.limits.for_variant(self.variant(name).limits)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per error: 'field.path: message (got value)'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        if not loc and not prefix:  # a whole-config check: its message starts with the fields it is about
            lines.append(err.get("msg", "invalid").removeprefix("Value error, "))
            continue
        loc = f"{prefix}{loc}" if loc else prefix.rstrip(".")
        message = err.get("msg", "invalid").removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if err.get("type") == "missing" or isinstance(got, (dict, list)) else f" (got {got!r})"
        if message.startswith((".", ":")):  # a validator that names its own sub-field after the location
            lines.append(f"{loc}{message}")
        else:
            lines.append(f"{loc}: {message}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config") -> ServeConfig:
    """A ServeConfig from plain data (YAML/JSON); a ConfigError names every bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid serve config:\n{format_validation_error(exc)}") from None


def load_config(path: str | Path) -> ServeConfig:
    """Read a serve config YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the serve config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))


def default_config() -> ServeConfig:
    """The embedded digits model in two variants, bf16 and nf4, split 50/50, sticky by user."""
    return ServeConfig(
        variants=[VariantConfig(name="bf16", quantization="bf16"), VariantConfig(name="nf4", quantization="nf4")],
        experiment=ExperimentConfig(weights={"bf16": 0.5, "nf4": 0.5}),
    )
