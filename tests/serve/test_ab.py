"""The A/B assignment logic, without Ray: distribution, stickiness, salt, forcing, shadow sampling, validation."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from quantserve.serve.ab import (
    FORCE_HEADER,
    Splitter,
    UnknownVariantError,
    hash_unit,
    validate_weights,
)

VARIANTS = ["bf16", "nf4", "int8"]


def splitter(weights: dict[str, float], salt: str = "s", **kwargs: object) -> Splitter:
    return Splitter(VARIANTS, weights, salt=salt, rng=random.Random(0), **kwargs)


@pytest.mark.parametrize("weights", [{"bf16": 1, "nf4": 1}, {"bf16": 0.7, "nf4": 0.2, "int8": 0.1},
                                     {"bf16": 1, "nf4": 3, "int8": 6}])
def test_sticky_distribution_follows_the_weights(weights: dict[str, float]) -> None:
    s = splitter(weights)
    n = 20_000
    counts = Counter(s.assign(sticky_id=f"user-{i}").variant for i in range(n))
    total = sum(weights.values())
    for name in VARIANTS:
        expected = weights.get(name, 0) / total
        assert abs(counts[name] / n - expected) < 0.015, (name, counts)


def test_unsticky_requests_are_weighted_at_random() -> None:
    s = splitter({"bf16": 0.25, "nf4": 0.75})
    counts = Counter(s.assign().variant for _ in range(20_000))
    assert abs(counts["nf4"] / 20_000 - 0.75) < 0.015
    assert counts["int8"] == 0
    assert {s.assign().reason for _ in range(5)} == {"weighted"}


def test_same_user_same_variant_across_routers_while_weights_stay() -> None:
    a, b = splitter({"bf16": 1, "nf4": 1}), splitter({"bf16": 1, "nf4": 1})
    for i in range(500):
        user = f"u{i}"
        first = a.assign(sticky_id=user)
        assert first.reason == "sticky"
        assert all(a.assign(sticky_id=user) == first for _ in range(3))
        assert b.assign(sticky_id=user) == first  # another replica (own rng) agrees: the hash decides


def test_salt_changes_the_assignment() -> None:
    a, b = splitter({"bf16": 1, "nf4": 1}, salt="one"), splitter({"bf16": 1, "nf4": 1}, salt="two")
    users = [f"u{i}" for i in range(2000)]
    moved = sum(a.assign(sticky_id=u).variant != b.assign(sticky_id=u).variant for u in users) / len(users)
    assert 0.4 < moved < 0.6  # independent halves: about half the users move


def test_a_small_weight_change_moves_only_a_few_users() -> None:
    a, b = splitter({"bf16": 0.5, "nf4": 0.5}), splitter({"bf16": 0.6, "nf4": 0.4})
    users = [f"u{i}" for i in range(5000)]
    moved = [u for u in users if a.assign(sticky_id=u).variant != b.assign(sticky_id=u).variant]
    assert 0.07 < len(moved) / len(users) < 0.13  # the 10% between the old and the new edge
    assert all(a.assign(sticky_id=u).variant == "nf4" for u in moved)


def test_forced_beats_requested_beats_sticky() -> None:
    s = splitter({"bf16": 1})
    assert s.assign(forced="int8", requested="nf4", sticky_id="x").variant == "int8"
    assert s.assign(forced="int8").reason == "forced"
    assert s.assign(requested="nf4", sticky_id="x") == s.assign(requested="nf4")
    assert s.assign(requested="nf4").reason == "requested"
    assert s.assign(sticky_id="x").variant == "bf16"


def test_unknown_forced_or_requested_variant_names_the_field() -> None:
    s = splitter({"bf16": 1})
    with pytest.raises(UnknownVariantError, match="model: no variant 'gpt'; variants served: bf16, nf4, int8"):
        s.assign(requested="gpt")
    with pytest.raises(UnknownVariantError, match=FORCE_HEADER):
        s.assign(forced="gpt")
    # a huge forcing header is not echoed back whole
    with pytest.raises(UnknownVariantError) as info:
        s.assign(forced="x" * 100_000)
    assert len(str(info.value)) < 300 and "(100000 characters)" in str(info.value)


def test_sticky_key_user_header_or_none() -> None:
    by_header = splitter({"bf16": 1, "nf4": 1}, sticky_key="header:X-Team")
    assert by_header.sticky_key == "header:x-team"
    assert by_header.sticky_id("alice", {"x-team": "red"}) == "red"
    assert by_header.sticky_id("alice", {}) is None
    assert splitter({"bf16": 1}).sticky_id("alice", {"x-team": "red"}) == "alice"
    assert splitter({"bf16": 1}, sticky_key="none").sticky_id("alice") is None
    with pytest.raises(ValueError, match="sticky_key"):
        splitter({"bf16": 1}, sticky_key="cookie")


def test_shadow_sampling_rate_and_never_the_serving_variant() -> None:
    s = splitter({"bf16": 1, "nf4": 1}, shadow_variant="bf16", shadow_sample_rate=0.3)
    nf4 = s.assign(requested="nf4")
    sampled = sum(s.shadow_for(nf4) == "bf16" for _ in range(10_000)) / 10_000
    assert abs(sampled - 0.3) < 0.02
    assert all(s.shadow_for(s.assign(requested="bf16")) is None for _ in range(100))
    assert splitter({"bf16": 1}).shadow_for(nf4) is None  # no shadow configured
    with pytest.raises(ValueError, match="shadow.variant"):
        splitter({"bf16": 1}, shadow_variant="fp8")
    with pytest.raises(ValueError, match="shadow.sample_rate"):
        splitter({"bf16": 1}, shadow_variant="bf16", shadow_sample_rate=1.5)


@pytest.mark.parametrize(("weights", "message"), [
    ({"bf16": -1, "nf4": 1}, r"weights\.bf16: expected a finite number >= 0"),
    ({"bf16": math.nan}, r"weights\.bf16"),
    ({"bf16": math.inf}, r"weights\.bf16"),
    ({"bf16": "1"}, r"weights\.bf16: expected a number"),
    ({"bf16": True}, r"weights\.bf16: expected a number"),
    ({"bf16": 0, "nf4": 0}, r"weights: at least one variant needs a weight > 0"),
    ({}, r"weights: at least one variant needs a weight > 0"),
    ({"fp8": 1}, r"weights: unknown variant\(s\) 'fp8'; variants: bf16, nf4, int8"),
])
def test_weights_validation_names_the_field(weights: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_weights(weights, VARIANTS)


def test_zero_weight_variants_are_never_picked() -> None:
    s = splitter({"bf16": 0, "nf4": 1, "int8": 0})
    assert {s.assign(sticky_id=f"u{i}").variant for i in range(2000)} == {"nf4"}
    assert s.pick(0.0) == "nf4" and s.pick(0.999999999) == "nf4"


@given(st.text(max_size=40), st.text(min_size=1, max_size=20))
def test_hash_unit_is_in_the_unit_interval_and_deterministic(key: str, salt: str) -> None:
    u = hash_unit(salt, key)
    assert 0.0 <= u < 1.0
    assert hash_unit(salt, key) == u


def test_describe_hides_the_salt() -> None:
    d = splitter({"bf16": 1}, salt="secret-salt").describe()
    assert "secret-salt" not in str(d)
    assert d["weights"] == {"bf16": 1.0, "nf4": 0.0, "int8": 0.0}
