"""The progressive rollout as plain Python (serve/rollout.py): guard evaluation, the state machine, weights, the
config's validation and the action body. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from quantserve.serve.api_schema import RequestError, parse_action
from quantserve.serve.config import ConfigError, RolloutConfig, parse_config
from quantserve.serve.rollout import (
    COMPLETE,
    PAUSED,
    ROLLED_BACK,
    RUNNING,
    Rollout,
    RolloutActionError,
    fingerprint,
    judge,
    split_weights,
)

T0 = 1_000_000.0


def config(**changes) -> dict:
    base = {"candidate": "nf4", "baseline": "bf16", "steps": [0.1, 0.5, 1.0], "step_interval_s": 60,
            "min_requests": 20, "min_comparisons": 5,
            "guards": {"max_error_rate": 0.05, "max_p95_latency_ratio": 1.5, "min_ssim": 0.9, "max_pixel_mae": 0.05}}
    base.update(changes)
    return RolloutConfig.model_validate(base).model_dump(mode="json")


def traffic(t: float, n: int, cand_latency: float = 0.1, base_latency: float = 0.1, cand_errors: int = 0):
    """n candidate and n baseline requests at time t (the first cand_errors of the candidate's are 500s)."""
    rows = [(t, "nf4", 500 if i < cand_errors else 200, cand_latency * (1 + 0.01 * i)) for i in range(n)]
    rows += [(t, "bf16", 200, base_latency * (1 + 0.01 * i)) for i in range(n)]
    return rows


def comparisons(t: float, n: int, ssim: float = 0.97, mae: float = 0.01):
    return [(t, "nf4", "bf16", mae, 35.0, ssim) for _ in range(n)]


def test_judge_reports_each_guard_with_its_figures():
    results, waiting = judge({"max_error_rate": 0.05, "max_p95_latency_ratio": 1.5, "min_ssim": 0.9,
                              "max_pixel_mae": 0.05}, "nf4", "bf16",
                             traffic(T0, 40, cand_latency=0.07, base_latency=0.1, cand_errors=1),
                             comparisons(T0, 6, ssim=0.95, mae=0.02), min_requests=20, min_comparisons=5)
    assert waiting == []
    by = {r.guard: r for r in results}
    assert by["max_error_rate"].value == pytest.approx(1 / 40) and by["max_error_rate"].holds
    assert by["max_p95_latency_ratio"].value == pytest.approx(0.7, rel=0.02) and by["max_p95_latency_ratio"].holds
    assert "nf4 p95 is 0.70x bf16 [" in by["max_p95_latency_ratio"].text and "holds" in by["max_p95_latency_ratio"].text
    assert by["min_ssim"].value == pytest.approx(0.95) and by["min_ssim"].holds
    assert by["max_pixel_mae"].value == pytest.approx(0.02) and by["max_pixel_mae"].holds


def test_judge_failing_guards_say_fails_and_the_limit():
    results, _ = judge({"max_error_rate": 0.01, "min_ssim": 0.99}, "nf4", "bf16",
                       traffic(T0, 30, cand_errors=3), comparisons(T0, 5, ssim=0.9))
    by = {r.guard: r for r in results}
    assert not by["max_error_rate"].holds and by["max_error_rate"].value == pytest.approx(0.1)
    assert "FAILS (max_error_rate <= 0.01)" in by["max_error_rate"].text
    assert not by["min_ssim"].holds and "FAILS (min_ssim >= 0.99)" in by["min_ssim"].text


def test_judge_waits_for_data_and_says_what_for():
    results, waiting = judge({"max_p95_latency_ratio": 1.2, "min_ssim": 0.9}, "nf4", "bf16",
                             [(T0, "nf4", 200, 0.1)] * 3, comparisons(T0, 2), min_requests=10, min_comparisons=5)
    assert results == []
    assert any("nf4 has 3 of the 10 requests" in w for w in waiting)
    assert any("needs successful requests of both nf4 (3) and bf16 (0)" in w for w in waiting)
    assert any("min_ssim needs 5 shadow comparisons" in w and "has 2" in w for w in waiting)


def test_judge_latency_ratio_against_known_distributions():
    """Exponential latencies with means 1 and 2: the p95 ratio is 0.5, and the bootstrap interval holds it."""
    rng = np.random.default_rng(7)
    rows = [(T0, "nf4", 200, x) for x in rng.exponential(1.0, 3000)]
    rows += [(T0, "bf16", 200, x) for x in rng.exponential(2.0, 3000)]
    (result,), _ = judge({"max_p95_latency_ratio": 0.6}, "nf4", "bf16", rows, [])
    assert result.value == pytest.approx(0.5, abs=0.05) and result.holds
    low, high = (float(x) for x in result.text.split("[")[1].split("]")[0].split(", "))
    assert low < 0.5 < high and high - low < 0.15


def test_judge_refuses_an_unknown_guard():
    with pytest.raises(ValueError, match="unknown guard 'max_cost'.*accepted: max_error_rate"):
        judge({"max_cost": 1.0}, "nf4", "bf16", traffic(T0, 5), [])


def test_a_permissive_rollout_climbs_every_step_then_completes():
    r = Rollout.start(config(), now=T0)
    assert (r.status, r.step, r.weight) == (RUNNING, 0, 0.1)
    t = T0
    for expected_step, expected_weight in ((1, 0.5), (2, 1.0)):
        r.observe(traffic(t + 1, 25), comparisons(t + 1, 6))
        assert r.tick(now=t + 30) is None  # the window is not over
        assert r.waiting and "to go" in r.waiting[0]
        event = r.tick(now=t + 61)
        assert event is not None and event["step"] == expected_step and event["weight"] == expected_weight
        t += 61
    assert r.status == COMPLETE and r.weight == 1.0
    assert [e["decision"] for e in r.events] == ["start", "advance", "complete"]
    assert r.tick(now=t + 1000) is None  # finished: nothing more is judged


def test_a_step_without_enough_requests_holds_past_its_interval():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 10), comparisons(T0 + 1, 6))
    assert r.tick(now=T0 + 120) is None and r.step == 0
    assert any("10 of the 20 requests" in w for w in r.waiting)
    r.observe(traffic(T0 + 121, 10))
    assert r.tick(now=T0 + 122)["decision"] == "advance"


def test_requests_of_an_earlier_step_do_not_count_in_the_next():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 25), comparisons(T0 + 1, 6))
    assert r.tick(now=T0 + 61)["decision"] == "advance"
    assert r.tick(now=T0 + 122) is None  # the new step's window is empty
    assert any("0 of the 20 requests" in w for w in r.waiting)


def test_a_failing_guard_rolls_back_to_zero_and_records_which():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 25), comparisons(T0 + 1, 6, ssim=0.5))
    event = r.tick(now=T0 + 61)
    assert event["decision"] == "rollback" and event["guard"] == "min_ssim" and event["weight"] == 0.0
    assert r.status == ROLLED_BACK and r.weight == 0.0
    assert r.failed["guard"] == "min_ssim" and r.failed["value"] == pytest.approx(0.5) and r.failed["limit"] == 0.9
    assert "FAILS" in r.failed["text"]
    r.observe(traffic(T0 + 62, 50), comparisons(T0 + 62, 6))
    assert r.tick(now=T0 + 500) is None and r.status == ROLLED_BACK  # it stays stopped


def test_a_failing_guard_rolls_back_even_while_another_still_waits_for_data():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 25, cand_errors=10))  # no shadow comparison yet: the fidelity guards wait
    event = r.tick(now=T0 + 61)
    assert event["decision"] == "rollback" and event["guard"] == "max_error_rate"


def test_a_slow_candidate_fails_the_latency_guard():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 25, cand_latency=0.3, base_latency=0.1), comparisons(T0 + 1, 6))
    event = r.tick(now=T0 + 61)
    assert event["guard"] == "max_p95_latency_ratio" and "nf4 p95 is 3.00x bf16" in r.failed["text"]


def test_manual_actions_and_their_conflicts():
    r = Rollout.start(config(), now=T0)
    assert r.control("pause", now=T0 + 1)["decision"] == "pause" and r.status == PAUSED
    r.observe(traffic(T0 + 2, 30), comparisons(T0 + 2, 6))
    assert r.tick(now=T0 + 100) is None  # paused: not judged
    with pytest.raises(RolloutActionError, match="only a running rollout pauses"):
        r.control("pause")
    r.control("resume", now=T0 + 200)
    assert r.status == RUNNING and r.step_started == T0 + 200  # a fresh window
    with pytest.raises(RolloutActionError, match="only a paused rollout resumes"):
        r.control("resume")
    r.control("promote", now=T0 + 201)
    assert (r.status, r.weight) == (COMPLETE, 1.0)
    with pytest.raises(RolloutActionError, match="already complete"):
        r.control("promote")
    r.control("rollback", now=T0 + 202, who="alice")
    assert (r.status, r.weight) == (ROLLED_BACK, 0.0) and r.failed["guard"] == "manual" and "alice" in r.failed["text"]
    with pytest.raises(RolloutActionError, match="already rolled back") as conflict:
        r.control("rollback")
    assert conflict.value.status == 409
    with pytest.raises(RolloutActionError, match="accepted: promote, rollback, pause, resume") as bad:
        r.control("restart")
    assert bad.value.status == 422
    assert [e["decision"] for e in r.events] == ["start", "pause", "resume", "promote", "rollback"]


def test_state_round_trips_without_the_window():
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 25), comparisons(T0 + 1, 6))
    r.tick(now=T0 + 61)
    back = Rollout.from_dict(r.to_dict())
    assert (back.step, back.weight, back.version, back.events, back.status) == (r.step, r.weight, r.version,
                                                                                 r.events, r.status)
    assert len(back.requests) == 0  # records are not persisted: the step goes on collecting


def test_fingerprint_ignores_key_order():
    a = config()
    b = dict(reversed(list(a.items())))
    assert fingerprint(a) == fingerprint(b) and fingerprint(a) != fingerprint(config(min_requests=21))


def test_split_weights_shares_the_pair_and_keeps_the_others():
    assert split_weights({"bf16": 0.5, "nf4": 0.3, "int8": 0.2}, "nf4", "bf16", 0.25) == pytest.approx(
        {"bf16": 0.6, "nf4": 0.2, "int8": 0.2})
    assert split_weights({"bf16": 1.0, "nf4": 0.0}, "nf4", "bf16", 1.0) == {"bf16": 0.0, "nf4": 1.0}
    with pytest.raises(ValueError, match="share in \\[0, 1\\]"):
        split_weights({"bf16": 1.0, "nf4": 1.0}, "nf4", "bf16", 1.5)


def serve_config(**rollout_changes) -> dict:
    rollout = {"candidate": "nf4", "baseline": "bf16", **rollout_changes}
    return {"variants": [{"name": "bf16", "quantization": "bf16"}, {"name": "nf4", "quantization": "nf4"}],
            "experiment": {"weights": {"bf16": 1, "nf4": 1}, "rollout": rollout}}


@pytest.mark.parametrize("changes, message", [
    ({"steps": [0.5, 0.25, 1.0]}, "steps must increase"),
    ({"steps": [0.1, 0.5]}, "the last step must be 1.0"),
    ({"steps": [0.0, 1.0]}, "in \\(0, 1\\]"),
    ({"candidate": "int4"}, "experiment.rollout.candidate: unknown variant 'int4'; variants: bf16, nf4"),
    ({"baseline": "nf4"}, "candidate and baseline are both 'nf4'"),
    ({"guards": {"min_ssim": 0.9}}, "experiment.rollout.guards.min_ssim: fidelity guards judge shadow comparisons"),
    ({"guards": {"max_error_rate": 2}}, "max_error_rate"),
    ({"min_requests": 0}, "min_requests"),
    ({"wait": 3}, "wait"),
])
def test_bad_rollout_configs_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(serve_config(**changes))


def test_a_rollout_needs_weight_on_its_pair_and_fidelity_guards_need_the_shadow():
    data = serve_config()
    data["experiment"]["weights"] = {"bf16": 1, "nf4": 0}
    parse_config(data)  # the pair's share is 1: fine
    data["variants"].append({"name": "int8", "quantization": "int8wo"})
    data["experiment"]["weights"] = {"int8": 1}
    with pytest.raises(ConfigError, match="the rollout splits the share of nf4 \\+ bf16, which is 0"):
        parse_config(data)
    ok = serve_config(guards={"min_ssim": 0.9})
    ok["experiment"]["shadow"] = {"variant": "bf16", "sample_rate": 0.1}
    assert parse_config(ok).experiment.rollout.guards.active() == {"max_error_rate": 0.01,
                                                                  "max_p95_latency_ratio": 1.2, "min_ssim": 0.9}


@pytest.mark.parametrize("body, status, text", [
    (b'{"action": "pause"}', 200, "pause"),
    (b'{"action": "restart"}', 422, "action: got 'restart'; accepted: promote, rollback, pause, resume"),
    (b'{}', 422, "action: got missing"),
    (b'{"action": "pause", "force": true}', 422, "force: unknown field"),
    (b'[1]', 400, "expected a JSON object"),
    (b'{"action": ', 400, "not valid JSON"),
])
def test_parse_action(body, status, text):
    if status == 200:
        assert parse_action(body) == text
        return
    with pytest.raises(RequestError) as exc:
        parse_action(body)
    assert exc.value.status == status and text in str(exc.value)


def test_a_step_not_yet_due_is_judged_every_few_seconds_not_at_every_sync(monkeypatch):
    import quantserve.serve.rollout as rollout_module

    calls = []
    real_judge = rollout_module.judge
    monkeypatch.setattr(rollout_module, "judge", lambda *a, **k: calls.append(1) or real_judge(*a, **k))
    r = Rollout.start(config(), now=T0)
    r.observe(traffic(T0 + 1, 30), comparisons(T0 + 1, 6))
    for second in range(2, 12):  # a router syncs every second while the 60 s step runs
        assert r.tick(now=T0 + second) is None
    assert len(calls) == 2  # at 2 s and at 7 s (LIVE_JUDGE_INTERVAL_S = 5)
    assert r.guards and "to go" in r.waiting[0] and "49 s" in r.waiting[0]  # the countdown still moves
    assert r.tick(now=T0 + 61)["decision"] == "advance"  # judged the moment it falls due
    assert len(calls) == 3
    assert r.tick(now=T0 + 62) is None and len(calls) == 3  # the new step: judged again only after 5 s
