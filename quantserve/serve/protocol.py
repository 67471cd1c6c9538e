"""The pipeline protocol: what the server needs from a kind of pipeline, so that serve/ stays engine-agnostic (as
Ray's LLM serving keeps its server apart from the engine behind it).

A `PipelineFamily` knows which model directories it serves, checks a variant's config against one, and loads a
variant into a `ServedPipeline`. A `ServedPipeline` normalises a request for its pipeline (which fields, the size
rule, allow-listed extras, defaults), runs a batch of compatible jobs with per-image seeds and a per-step callback,
runs a health probe of its own denoiser, and describes itself for GET /v1/models. Families are found by name in
`families.py`: the diffusers text-to-image family ships in serve/, others (the embedded digits model) register
through the `quantserve.pipelines` entry point group.

A job is a plain dict (it crosses Ray): prompt, negative_prompt, n, size ('WxH' or None), steps, guidance, seed,
extras. `normalize` returns it with every default filled in, plus width and height; normalising twice changes
nothing. Image i of a job uses seed + i, whatever batch the job runs in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config import ResolvedLimits, VariantConfig, parse_size_text

JOB_FIELDS = ("prompt", "negative_prompt", "n", "size", "steps", "guidance", "seed", "extras")
StepCallback = Callable[[int, int], None]  # (steps done, 1..steps; steps) after each denoising step


class GenerationCancelled(Exception):
    """Raised from a step callback to stop a pipeline call whose requester is gone (a closed stream)."""


class ClientError(ValueError):
    """A request this variant cannot take: a 4xx (422 unless told) naming the field."""

    def __init__(self, param: str, message: str, status: int = 422):
        self.param, self.status = param, status
        super().__init__(message if message.startswith(f"{param}:") else f"{param}: {message}")


@dataclass(frozen=True)
class ModelSource:
    """What a family sees of a variant's model: the config value, the directory, its model_index.json if any, and
    the config field to name in errors (e.g. `variants.1.model`)."""

    model: str | None
    path: Path
    index: Mapping[str, Any] | None
    field: str = "model"

    @property
    def class_name(self) -> str | None:
        name = (self.index or {}).get("_class_name")
        return name if isinstance(name, str) else None


@dataclass(frozen=True)
class ExtraField:
    """A pipeline-specific request field a family allows, with its type and bounds (inclusive)."""

    name: str
    kind: type  # int, float or bool
    low: float | None = None
    high: float | None = None
    description: str = ""

    def check(self, value: Any) -> Any:
        """The value as `kind`; a ClientError naming the field when it has another type or lies out of bounds."""
        ok = (isinstance(value, bool) if self.kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if self.kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            raise ClientError(self.name, f"expected {self.describe()}, got {value!r}")
        if self.kind is not bool and not ((self.low is None or value >= self.low) and
                                          (self.high is None or value <= self.high)):
            raise ClientError(self.name, f"must be between {self.low} and {self.high} (got {value!r})")
        return self.kind(value)

    def describe(self) -> str:
        bounds = f" in [{self.low}, {self.high}]" if self.kind is not bool else ""
        return f"{'a number' if self.kind is float else 'an integer' if self.kind is int else 'true or false'}{bounds}"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind.__name__, "min": self.low, "max": self.high, "description": self.description}


@dataclass
class JobResult:
    """One job's images (PIL, in seed order) and what else its answer carries (e.g. the digits' class labels)."""

    images: list[Any]
    meta: dict[str, Any] = field(default_factory=dict)


def check_common(job: Mapping[str, Any], limits: ResolvedLimits, default_guidance: float,
                 size_rule: Callable[[int, int], str | None]) -> dict[str, Any]:
    """The fields every family reads, bounded by the variant's limits, with defaults filled in.

    `size_rule(width, height)` returns why a size is refused (None: accepted); a refused size names `size`."""
    prompt = job.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > limits.max_prompt_chars:
        size = len(prompt) if isinstance(prompt, str) else prompt
        raise ClientError("prompt", f"must be 1..{limits.max_prompt_chars} characters of text (got {size!r})")
    negative = job.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > limits.max_prompt_chars):
        raise ClientError("negative_prompt", f"must be text of at most {limits.max_prompt_chars} characters")
    n = _int(job.get("n", 1), "n", 1, limits.max_n)
    steps = job.get("steps")
    steps = limits.default_steps if steps is None else _int(steps, "steps", 1, limits.max_steps)
    guidance = job.get("guidance")
    guidance = float(default_guidance if guidance is None else guidance)
    if not math.isfinite(guidance) or not 0.0 <= guidance <= limits.max_guidance:
        raise ClientError("guidance", f"must be between 0 and {limits.max_guidance} (got {guidance!r})")
    seed = _int(job.get("seed", 0), "seed", 0, 2**31 - 1)
    size = job.get("size")
    if size is None:
        width, height = limits.default_width, limits.default_height
    else:
        try:
            width, height = parse_size_text(size) if isinstance(size, str) else (None, None)
        except ValueError:
            width = height = None
        if width is None or height is None:
            raise ClientError("size", f"expected 'WxH' such as '512x512' or '768x512' (got {size!r})")
    if not all(limits.min_size <= side <= limits.max_size for side in (width, height)):
        raise ClientError("size", f"each side must be between {limits.min_size} and {limits.max_size} pixels "
                                  f"(got '{width}x{height}')")
    refused = size_rule(width, height)
    if refused:
        raise ClientError("size", f"{refused} (got '{width}x{height}')")
    extras = job.get("extras") or {}
    if not isinstance(extras, Mapping):
        raise ClientError("extras", f"expected a mapping of extra fields, got {type(extras).__name__}")
    return {"prompt": prompt, "negative_prompt": negative, "n": n, "size": f"{width}x{height}", "width": width,
            "height": height, "steps": steps, "guidance": guidance, "seed": seed, "extras": dict(extras)}


def check_extras(extras: Mapping[str, Any], allowed: Mapping[str, ExtraField], owner: str) -> dict[str, Any]:
    """Every extra field allow-listed and within its bounds; a ClientError names the first that is not."""
    out = {}
    for name, value in sorted(extras.items()):
        spec = allowed.get(name)
        if spec is None:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise ClientError(name, f"not a request field of {owner}; its extra fields: {accepted}")
        out[name] = spec.check(value)
    return out


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ClientError(name, f"must be an integer between {low} and {high} (got {value!r})")
    return value


class ServedPipeline(ABC):
    """A loaded variant as the server sees it; one per replica. `run` is called from one thread at a time."""

    family: ClassVar[str]
    #: the pipeline class it runs (FluxPipeline, DigitsPipeline, ...)
    pipeline_class: str
    #: the weight modules (for the sampled GEMM timing of the metrics)
    modules: Sequence[Any]
    #: the load report: LoadReport or PipelineReport (backend, scheme, layers, model_bytes, bf16_bytes, seconds, ...)
    report: Any
    #: a prompt this pipeline accepts, for the deploy-time autotune's probe generation (serve/tuning.py)
    probe_prompt: ClassVar[str] = "a red apple on a wooden table"

    @abstractmethod
    def normalize(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """The job with this pipeline's rules applied and defaults filled in; ClientError names a bad field."""

    @abstractmethod
    def batch_key(self, job: Mapping[str, Any]) -> Hashable:
        """Jobs with equal keys run in one pipeline call (a normalised job)."""

    @abstractmethod
    def run(self, jobs: Sequence[Mapping[str, Any]], on_step: StepCallback | None = None) -> list[JobResult]:
        """Generate the normalised, compatible `jobs` in one pipeline call; one JobResult per job, in order."""

    @abstractmethod
    def health(self) -> None:
        """A tiny real forward of the denoiser; raise when it cannot compute or gives a non-finite output."""

    def quantization_configs(self) -> dict[str, Any]:
        """component -> its quantization_config as a dict (None: not quantized)."""
        return {}

    @property
    def phases(self) -> dict[str, float]:
        """Exclusive seconds per load phase (runtime/phases.py: imports, skeleton, read, ...), summing to about the
        whole load: the report's (a PipelineReport counts its imports and components too)."""
        return dict(getattr(self.report, "phases", None) or {})

    def info(self) -> dict[str, Any]:
        """What GET /v1/models adds for this family (request fields, defaults, size rule)."""
        return {}


class PipelineFamily(ABC):
    """A kind of pipeline the server can serve: which models it claims, how it checks and loads a variant."""

    name: ClassVar[str]

    @abstractmethod
    def claims(self, source: ModelSource) -> bool:
        """Whether this family serves the model (for `model: null`, whether it serves the default model)."""

    @abstractmethod
    def supported(self) -> list[str]:
        """The pipeline classes (model_index.json `_class_name`) it serves, for error messages."""

    def default_model_dir(self) -> Path | None:
        """The directory `model: null` means, for the one family that serves a default model."""
        return None

    def extra_fields(self) -> list[str]:
        """Every extra request field any of its pipelines accepts (the Ingress refuses a field no family takes)."""
        return []

    def check(self, source: ModelSource, config: VariantConfig, field_prefix: str) -> None:
        """Refuse, naming the config field, what is wrong before loading (e.g. quantization of a missing component).
        `field_prefix` is e.g. `variants.1`."""

    def check_prompt(self, prompt: str) -> str | None:
        """Why no pipeline of this family can take `prompt`, judged without a model (the Ingress asks, so that a bad
        prompt is a 422 at once, not a place in a queue); None: it may be fine, the replica judges."""
        return None

    @abstractmethod
    def load(self, source: ModelSource, config: VariantConfig, limits: ResolvedLimits, device: str) -> ServedPipeline:
        """Load the variant (quantized as its config says) on `device`."""
