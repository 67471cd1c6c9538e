"""quantserve's metrics, through ray.serve.metrics: Ray's metrics agent exports them for Prometheus.

Ray prefixes each name with `ray_` (and counters get `_total`), so `quantserve_images` is scraped as
`ray_quantserve_images_total`. Every model metric carries variant, backend, scheme and kernel; Ray Serve adds
deployment, replica and application.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

MODEL_TAGS = ("variant", "backend", "scheme", "kernel")
FIDELITY_TAGS = ("variant", "scheme", "reference", "reference_scheme")
ROLLOUT_TAGS = ("application", "candidate", "baseline")  # set by the keeper itself: it is not a Serve replica
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
DIFF_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0]
PSNR_BUCKETS = [10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 40.0, 50.0, 60.0, 100.0]  # dB; identical images count as 100
COLD_START_BUCKETS = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
SSIM_BUCKETS = [0.25, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0]  # Ray wants positive bounds: SSIM <= 0.25 (even negative) lands in the first


class VariantMetrics:
    """The metrics one Diffusion replica records, all labelled with its variant, backend, scheme and kernel."""

    def __init__(self, variant: str, backend: str, scheme: str, kernel: str):
        self.tags = {"variant": variant, "backend": backend, "scheme": scheme, "kernel": kernel}
        self.requests = Counter("quantserve_requests", description="Generation requests a replica answered, by HTTP status.",
                                tag_keys=MODEL_TAGS + ("status",))
        self.images = Counter("quantserve_images", description="Images generated.", tag_keys=MODEL_TAGS)
        self.steps = Counter("quantserve_denoising_steps",
                             description="Denoising steps run, counted per image (steps x images).", tag_keys=MODEL_TAGS)
        self.request_latency = Histogram("quantserve_request_latency_seconds",
                                         description="Time from a request's arrival at the replica to its images.",
                                         boundaries=LATENCY_BUCKETS, tag_keys=MODEL_TAGS)
        self.step_latency = Histogram("quantserve_step_latency_seconds",
                                      description="Wall time of one denoising step of a batch.",
                                      boundaries=STEP_BUCKETS, tag_keys=MODEL_TAGS)
        self.images_per_second = Gauge("quantserve_images_per_second",
                                       description="Images per second of the replica's last batch.", tag_keys=MODEL_TAGS)
        self.gemm_gflops = Gauge("quantserve_gemm_gflops",
                                 description="Quantized-GEMM throughput per kernel, from sampled timing of the layers.",
                                 tag_keys=MODEL_TAGS)
        self.gemm_calls = Counter("quantserve_gemm_sampled_calls",
                                  description="GEMM layer calls timed by the sampler.", tag_keys=MODEL_TAGS)
        self.cold_start = Histogram("quantserve_cold_start_seconds", boundaries=COLD_START_BUCKETS,
                                    tag_keys=MODEL_TAGS + ("phase",),
                                    description="A replica's start by phase: process (worker start, Ray, imports), "
                                                "load (weights read, quantized when not pre-quantized), and load's "
                                                "parts: imports (pipeline classes), skeleton (config, empty model), "
                                                "read (weight bytes), unpack (pre-quantized layers) or quantize "
                                                "(quantize on load), to_device, build (kernel routing), components "
                                                "(tokenizers, scheduler); autotune, "
                                                "health (the first forward, kernels built on first use), total.")
        self.queue_wait = Histogram("quantserve_queue_wait_seconds", boundaries=LATENCY_BUCKETS, tag_keys=MODEL_TAGS,
                                    description="Time a request waited in its replica before its batch ran.")
        self.pending_work = Gauge("quantserve_pending_work_seconds", tag_keys=MODEL_TAGS,
                                  description="Seconds of work a replica holds (queued and running jobs, from its "
                                              "measured seconds per image-step): the work-aware autoscaler's signal.")
        self.model_bytes = Gauge("quantserve_model_bytes", description="Bytes of the loaded model (weights and buffers).",
                                 tag_keys=MODEL_TAGS)
        for metric in (self.requests, self.images, self.steps, self.request_latency, self.step_latency,
                       self.images_per_second, self.gemm_gflops, self.gemm_calls, self.model_bytes, self.cold_start,
                       self.queue_wait, self.pending_work):
            metric.set_default_tags(dict(self.tags))  # Ray Serve adds its own tags to the dict it is given

    def with_kernel(self, backend: str, kernel: str) -> dict[str, str]:
        """Tags for a per-kernel series (GEMM throughput), which may differ from the variant's main kernel."""
        return {**self.tags, "backend": backend, "kernel": kernel}


class RouterMetrics:
    """A/B assignments and shadow comparisons, recorded by the A/B router (inside the Ingress)."""

    def __init__(self, schemes: Mapping[str, str]):
        self.schemes = dict(schemes)
        self.assignments = Counter("quantserve_ab_assignments", description="Requests assigned to each variant, by reason.",
                                   tag_keys=("variant", "scheme", "reason"))
        self.shadow_diff = Histogram("quantserve_shadow_pixel_diff",
                                     description="Mean absolute pixel difference (0..1) between a response and its shadow.",
                                     boundaries=DIFF_BUCKETS, tag_keys=("variant", "scheme", "shadow_variant", "shadow_scheme"))
        self.fidelity_mae = Histogram("quantserve_fidelity_mae", boundaries=DIFF_BUCKETS, tag_keys=FIDELITY_TAGS,
                                      description="Mean absolute pixel difference (0..1) of a shadowed response's "
                                                  "images against the reference variant's (same seed and prompt).")
        self.fidelity_psnr = Histogram("quantserve_fidelity_psnr_db", boundaries=PSNR_BUCKETS, tag_keys=FIDELITY_TAGS,
                                       description="PSNR (dB, identical = 100) of a shadowed response's images against "
                                                   "the reference variant's.")
        self.fidelity_ssim = Histogram("quantserve_fidelity_ssim", boundaries=SSIM_BUCKETS, tag_keys=FIDELITY_TAGS,
                                       description="SSIM of a shadowed response's images against the reference "
                                                   "variant's (1 = identical).")
        self.shadow_runs = Counter("quantserve_shadow_runs", description="Shadow runs, by outcome.",
                                   tag_keys=("variant", "shadow_variant", "outcome"))
        self.rejections = Counter("quantserve_rejected_requests",
                                  description="Requests turned away because a variant's queue was full (503).",
                                  tag_keys=("variant", "scheme"))

    def assigned(self, variant: str, reason: str) -> None:
        self.assignments.inc(tags={"variant": variant, "scheme": self.schemes.get(variant, ""), "reason": reason})

    def shadowed(self, variant: str, shadow: str, fidelity: Any | None, outcome: str) -> None:
        """One shadow run's outcome, and its Fidelity (serve/fidelity.py) when it was compared."""
        self.shadow_runs.inc(tags={"variant": variant, "shadow_variant": shadow, "outcome": outcome})
        if fidelity is not None:
            scheme, shadow_scheme = self.schemes.get(variant, ""), self.schemes.get(shadow, "")
            self.shadow_diff.observe(fidelity.mae, tags={"variant": variant, "scheme": scheme,
                                                         "shadow_variant": shadow, "shadow_scheme": shadow_scheme})
            pair = {"variant": variant, "scheme": scheme, "reference": shadow, "reference_scheme": shadow_scheme}
            self.fidelity_mae.observe(fidelity.mae, tags=pair)
            self.fidelity_psnr.observe(fidelity.psnr, tags=pair)
            self.fidelity_ssim.observe(fidelity.ssim, tags=pair)

    def rejected(self, variant: str) -> None:
        self.rejections.inc(tags={"variant": variant, "scheme": self.schemes.get(variant, "")})


class IngressMetrics:
    """HTTP responses by route and status, labelled with the variant that served them ('none' when none did)."""

    def __init__(self) -> None:
        self.responses = Counter("quantserve_http_responses", description="HTTP responses of the ingress.",
                                 tag_keys=("path", "status", "variant"))

        self.feedback = Counter("quantserve_feedback", description="User feedback on responses, by the variant that "
                                                                   "served them and the score's sign.",
                                tag_keys=("variant", "sign"))
        self.feedback_mean = Gauge("quantserve_feedback_mean", tag_keys=("variant",),
                                   description="Mean feedback score (-1..1) per variant, over this Ingress replica's "
                                               "feedback so far.")

    def responded(self, path: str, status: int, variant: str) -> None:
        self.responses.inc(tags={"path": path, "status": str(status), "variant": variant})

    def scored(self, variant: str, score: float, mean: float) -> None:
        sign = "positive" if score > 0 else "negative" if score < 0 else "neutral"
        self.feedback.inc(tags={"variant": variant, "sign": sign})
        self.feedback_mean.set(mean, tags={"variant": variant})


class RolloutMetrics:
    """A progressive rollout's weight, decisions and guard figures, recorded once per application by its rollout
    keeper (serve/rollout_keeper.py; outside Serve's replicas, so Serve adds no tags and `application` is ours)."""

    def __init__(self) -> None:
        self.weight = Gauge("quantserve_ab_rollout_weight", tag_keys=ROLLOUT_TAGS,
                            description="The rollout candidate's share of the candidate + baseline traffic.")
        self.decisions = Counter("quantserve_ab_rollout_decisions", tag_keys=ROLLOUT_TAGS + ("decision", "guard"),
                                 description="Rollout decisions: start, advance, complete, rollback (guard: the one "
                                             "that failed), and the manual promote, rollback, pause, resume.")
        self.guard_value = Gauge("quantserve_ab_rollout_guard_value", tag_keys=ROLLOUT_TAGS + ("guard",),
                                 description="Each rollout guard's figure over the current step's window "
                                             "(error rate, p95 latency ratio, mean SSIM, mean pixel MAE).")
        self.guard_limit = Gauge("quantserve_ab_rollout_guard_limit", tag_keys=ROLLOUT_TAGS + ("guard",),
                                 description="Each rollout guard's limit.")

    def decided(self, tags: Mapping[str, str], decision: str, guard: str) -> None:
        self.decisions.inc(tags={**tags, "decision": decision, "guard": guard})

    def export(self, tags: Mapping[str, str], weight: float, limits: Mapping[str, Any],
               results: list[dict[str, Any]]) -> None:
        """The weight now, every guard's limit and the latest figure of each guard judged."""
        self.weight.set(weight, tags=dict(tags))
        for guard, limit in limits.items():
            if limit is not None:
                self.guard_limit.set(float(limit), tags={**tags, "guard": guard})
        for result in results:
            self.guard_value.set(float(result["value"]), tags={**tags, "guard": result["guard"]})
