"""A/B assignment: weighted split between variants, sticky by a salted hash, forced variants and shadow sampling.

Plain Python with no Ray: the A/B router (inside each Ingress replica) holds one `Splitter` and swaps it when its user_config changes.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

STICKY_NONE = "none"
STICKY_USER = "user"
STICKY_HEADER_PREFIX = "header:"
FORCE_HEADER = "X-Quantserve-Force-Variant"  # a request header that forces a variant


class UnknownVariantError(LookupError):
    """A request named a variant (body `model` or the forcing header) that this deployment does not serve."""

    def __init__(self, field_name: str, name: str, variants: Sequence[str]):
        self.field_name, self.name, self.variants = field_name, name, list(variants)
        shown = name if len(name) <= 64 else f"{name[:64]}... ({len(name)} characters)"  # never echo a whole header
        super().__init__(f"{field_name}: no variant {shown!r}; variants served: {', '.join(self.variants)}")

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]


def validate_weights(weights: Mapping[str, object], variants: Sequence[str], field_name: str = "weights") -> dict[str, float]:
    """Every variant's weight (unnamed variants get 0), checked: known names, finite numbers >= 0, some > 0."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"{field_name}: expected a mapping variant -> weight, got {type(weights).__name__}")
    unknown = [name for name in weights if name not in variants]
    if unknown:
        raise ValueError(f"{field_name}: unknown variant(s) {', '.join(map(repr, unknown))}; "
                         f"variants: {', '.join(variants)}")
    result: dict[str, float] = {}
    for name in variants:
        value = weights.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{field_name}.{name}: expected a number >= 0, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{field_name}.{name}: expected a finite number >= 0, got {value!r}")
        result[name] = float(value)
    if sum(result.values()) <= 0:
        raise ValueError(f"{field_name}: at least one variant needs a weight > 0, got {dict(weights)!r}")
    return result


def validate_sticky_key(sticky_key: str, field_name: str = "sticky_key") -> str:
    """'user' (the request's user field), 'none', or 'header:<Name>' (a request header)."""
    if sticky_key in (STICKY_USER, STICKY_NONE):
        return sticky_key
    if isinstance(sticky_key, str) and sticky_key.startswith(STICKY_HEADER_PREFIX):
        header = sticky_key[len(STICKY_HEADER_PREFIX):]
        if header and all(c.isalnum() or c in "-_" for c in header) and len(header) <= 64:
            return STICKY_HEADER_PREFIX + header.lower()
    raise ValueError(f"{field_name}: got {sticky_key!r}; accepted: 'user', 'none' or 'header:<Header-Name>'")


def hash_unit(salt: str, key: str) -> float:
    """A number in [0, 1) from the salted SHA-256 of `key`: uniform, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Assignment:
    """The variant a request goes to and why: 'requested' (body model), 'forced' (header), 'sticky' or 'weighted'."""

    variant: str
    reason: str


@dataclass
class Splitter:
    """Weighted, sticky assignment of requests to variants, plus shadow sampling; one per experiment config."""

    variants: Sequence[str]
    weights: Mapping[str, float]
    salt: str = "quantserve"
    sticky_key: str = STICKY_USER
    shadow_variant: str | None = None
    shadow_sample_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self.variants = list(self.variants)
        if not self.variants:
            raise ValueError("variants: at least one variant is needed")
        self.weights = validate_weights(self.weights, self.variants)
        self.sticky_key = validate_sticky_key(self.sticky_key)
        if not isinstance(self.salt, str) or not self.salt:
            raise ValueError(f"salt: expected a non-empty string, got {self.salt!r}")
        if self.shadow_variant is not None and self.shadow_variant not in self.variants:
            raise ValueError(f"shadow.variant: unknown variant {self.shadow_variant!r}; variants: {', '.join(self.variants)}")
        rate = self.shadow_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"shadow.sample_rate: expected a number in [0, 1], got {rate!r}")
        total = sum(self.weights.values())
        cumulative, edges = 0.0, []
        for name in self.variants:
            cumulative += self.weights[name] / total
            edges.append((cumulative, name))
        self._edges = edges
        self._last_positive = [name for name in self.variants if self.weights[name] > 0][-1]

    def pick(self, u: float) -> str:
        """The variant whose share of [0, 1) holds `u` (variants in declared order, zero weights never picked)."""
        for edge, name in self._edges:
            if u < edge and self.weights[name] > 0:
                return name
        return self._last_positive  # u rounding past the last edge

    def sticky_id(self, user: str | None, headers: Mapping[str, str] | None = None) -> str | None:
        """The value the assignment sticks to for this request, or None (then the assignment is random)."""
        if self.sticky_key == STICKY_USER:
            return user or None
        if self.sticky_key.startswith(STICKY_HEADER_PREFIX):
            wanted = self.sticky_key[len(STICKY_HEADER_PREFIX):]
            for name, value in (headers or {}).items():
                if name.lower() == wanted:
                    return value or None
        return None

    def check_variant(self, name: str, field_name: str) -> str:
        if name not in self.variants:
            raise UnknownVariantError(field_name, name, self.variants)
        return name

    def assign(self, *, requested: str | None = None, forced: str | None = None,
               sticky_id: str | None = None) -> Assignment:
        """The variant for one request: the forcing header wins, then the body's model, then the split."""
        if forced:
            return Assignment(self.check_variant(forced, f"header {FORCE_HEADER}"), "forced")
        if requested:
            return Assignment(self.check_variant(requested, "model"), "requested")
        if sticky_id:
            return Assignment(self.pick(hash_unit(self.salt, sticky_id)), "sticky")
        return Assignment(self.pick(self.rng.random()), "weighted")

    def shadow_for(self, assignment: Assignment) -> str | None:
        """The shadow variant to mirror this request onto, when sampled (never the variant that served it)."""
        if self.shadow_variant is None or self.shadow_variant == assignment.variant or self.shadow_sample_rate <= 0:
            return None
        return self.shadow_variant if self.rng.random() < self.shadow_sample_rate else None

    def describe(self) -> dict[str, object]:
        """The experiment as plain JSON, with a fingerprint of the salt instead of the salt itself."""
        return {
            "variants": list(self.variants),
            "weights": dict(self.weights),
            "salt_sha256": hashlib.sha256(self.salt.encode()).hexdigest()[:12],
            "sticky_key": self.sticky_key,
            "shadow": {"variant": self.shadow_variant, "sample_rate": self.shadow_sample_rate},
        }
