"""The router: per QuantLinear, the kernels that can run it here, and the one it uses (cache, policy, preference).

The candidates are a registry (runtime/candidates.py); the built-ins (the backend's own kernel, quantserve's Triton
and CPU kernels, the torch reference) are registered once, by runtime/kernel_candidates.py's `register()`, when this
module is imported. For one layer the router keeps the candidates whose `can_run` says yes on this device, drops the
ones the policy disables, then takes the forced one, else the autotune cache's winner for the layer's (format, N,
K, M bucket), else the first by the fixed preference (candidates.PREFERENCE).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import candidates as registry
from . import kernel_candidates
from .candidates import Candidate, candidates
from .candidates import register as register_candidate
from .quant_linear import QuantLinear

__all__ = ["Candidate", "Decision", "KernelPolicy", "candidates", "choose", "m_bucket", "nearest_entry",
           "quant_layers", "register_candidate", "route", "runnable_candidates", "shape_key"]

kernel_candidates.register()


@dataclass
class KernelPolicy:
    """Kernels forced or disabled by layer-name pattern (fnmatch), from a config dict or the environment.

    Environment: QUANTSERVE_FORCE_KERNEL="pattern=kernel,pattern=kernel" and QUANTSERVE_DISABLE_KERNELS="kernel,..."
    or "pattern=kernel|kernel,...".
    """

    force: dict[str, str] = field(default_factory=dict)
    disable: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> KernelPolicy:
        """A policy from its config form, checked by the one schema (runtime/kernel_policy.py) serve uses too."""
        from .kernel_policy import validate_kernel_policy

        normal = validate_kernel_policy(data)
        policy = cls(dict(normal.get("force", {})), {k: list(v) for k, v in normal.get("disable", {}).items()})
        policy.validate()
        return policy

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelPolicy:
        env = os.environ if environ is None else environ
        force: dict[str, str] = {}
        disable: dict[str, list[str]] = {}
        for item in filter(None, (s.strip() for s in env.get("QUANTSERVE_FORCE_KERNEL", "").split(","))):
            pattern, _, kernel = item.rpartition("=")
            force[pattern or "*"] = kernel
        for item in filter(None, (s.strip() for s in env.get("QUANTSERVE_DISABLE_KERNELS", "").split(","))):
            pattern, _, kernels = item.rpartition("=")
            disable.setdefault(pattern or "*", []).extend(kernels.split("|"))
        policy = cls(force, disable)
        policy.validate()
        return policy

    def merged(self, other: KernelPolicy) -> KernelPolicy:
        """This policy with `other`'s entries on top (the environment overrides the config)."""
        disable = {k: list(v) for k, v in self.disable.items()}
        for k, v in other.disable.items():
            disable.setdefault(k, []).extend(v)
        return KernelPolicy({**self.force, **other.force}, disable)

    def validate(self) -> None:
        known = registry.names()
        for pattern, kernel in self.force.items():
            if kernel not in known:
                raise ValueError(f"kernel_policy.force[{pattern!r}]: unknown kernel {kernel!r}; known: {sorted(known)}")
        for pattern, kernels in self.disable.items():
            for kernel in kernels:
                if kernel not in known:
                    raise ValueError(f"kernel_policy.disable[{pattern!r}]: unknown kernel {kernel!r}; known: {sorted(known)}")

    def forced(self, layer_name: str) -> str | None:
        return next((k for p, k in self.force.items() if fnmatch.fnmatchcase(layer_name, p)), None)

    def disabled(self, layer_name: str) -> set[str]:
        return {k for p, ks in self.disable.items() if fnmatch.fnmatchcase(layer_name, p) for k in ks}


def m_bucket(m: int) -> int:
    """Round a row count up to a power of two: shapes within one bucket share a tuning result."""
    return 1 << max(0, int(m) - 1).bit_length()


def shape_key(layer: QuantLinear, m: int) -> str:
    """The cache key of one tuning problem: packed format, N, K and the M bucket."""
    return f"{layer.qweight.fmt}|N={layer.out_features}|K={layer.in_features}|M={m_bucket(m)}"


def nearest_entry(cache: Mapping[str, Any], layer: QuantLinear, m: int) -> tuple[str | None, Any]:
    """The cache entry for this layer's shape at M's bucket, else at the nearest tuned bucket (by ratio)."""
    exact = shape_key(layer, m)
    if exact in cache:
        return exact, cache[exact]
    prefix = exact.rsplit("|M=", 1)[0] + "|M="
    target = m_bucket(m).bit_length()
    tuned = [(abs(int(k[len(prefix):]).bit_length() - target), k) for k in cache if k.startswith(prefix)]
    if not tuned:
        return None, None
    key = min(tuned)[1]
    return key, cache[key]


@dataclass
class Decision:
    layer: str
    kernel: str
    reason: str
    runnable: list[str]
    rejected: dict[str, str]
    by_bucket: dict[int, str] = field(default_factory=dict)  # M bucket -> winner, when the winners differ by M


def tuned_buckets(cache: Mapping[str, Any], layer: QuantLinear, runnable: Iterable[str]) -> dict[int, str]:
    """The autotune winner of every tuned M bucket of this layer's shape that can run here."""
    prefix = shape_key(layer, 1).rsplit("|M=", 1)[0] + "|M="
    allowed = set(runnable)
    out = {}
    for key, entry in cache.items():
        if key.startswith(prefix) and isinstance(entry, Mapping) and entry.get("winner") in allowed:
            try:
                out[int(key[len(prefix):])] = entry["winner"]
            except ValueError:
                continue
    return out


def runnable_candidates(layer: QuantLinear, device: torch.device, name: str = "",
                        policy: KernelPolicy | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that can run this layer here (in preference order), and why each other one cannot."""
    disabled = policy.disabled(name) if policy else set()
    ok, rejected = [], {}
    for candidate in candidates():
        if candidate.name in disabled:
            rejected[candidate.name] = "disabled by kernel policy"
            continue
        can, why = candidate.can_run(layer, device)
        if can:
            ok.append(candidate)
        else:
            rejected[candidate.name] = why
    return ok, rejected


def choose(layer: QuantLinear, name: str, device: torch.device, m: int, policy: KernelPolicy | None = None,
           cache: Mapping[str, Any] | None = None) -> Decision:
    """Pick the kernel for one layer, and say why."""
    ok, rejected = runnable_candidates(layer, device, name, policy)
    if not ok:
        raise RuntimeError(f"{name}: no kernel can run format {layer.qweight.fmt} on {device}: {rejected}")
    by_name = {c.name: c for c in ok}
    forced = policy.forced(name) if policy else None
    if forced is not None:
        if forced not in by_name:
            raise RuntimeError(f"{name}: kernel policy forces {forced!r}, which cannot run here: "
                               f"{rejected.get(forced, 'not registered')}")
        return Decision(name, forced, "forced by kernel policy", list(by_name), rejected)
    key, entry = nearest_entry(cache or {}, layer, m)
    if entry is not None and entry.get("winner") in by_name:
        timing = entry.get("timings_ms", {}).get(entry["winner"])
        why = f"autotuned: fastest for {key}" + (f" ({timing:.3f} ms)" if timing is not None else "")
        buckets = tuned_buckets(cache or {}, layer, by_name)
        if len(set(buckets.values())) > 1:
            why += "; by M bucket: " + ", ".join(f"{b} {w}" for b, w in sorted(buckets.items()))
        else:
            buckets = {}
        return Decision(name, entry["winner"], why, list(by_name), rejected, buckets)
    return Decision(name, ok[0].name, "fixed preference (no autotune entry)", list(by_name), rejected)


def route(model: nn.Module, device: torch.device | str | None = None, m: int = 1, policy: KernelPolicy | None = None,
          cache: Mapping[str, Any] | None = None) -> list[Decision]:
    """Give every QuantLinear of `model` its kernel; returns the decisions in module order."""
    device = torch.device(device) if device is not None else _model_device(model)
    decisions = []
    for name, layer in quant_layers(model):
        decision = choose(layer, name, device, m, policy, cache)
        layer.set_kernel(decision.kernel, registry.candidate(decision.kernel).kernel, decision.reason)
        if decision.by_bucket:
            layer.set_bucket_kernels({b: (w, registry.candidate(w).kernel) for b, w in decision.by_bucket.items()})
        decisions.append(decision)
    return decisions


def quant_layers(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")

