"""Response ids and feedback (issue 15): signed ids any Ingress replica can attribute, scores bounded and counted
once, every mistake a 4xx naming its field; and end to end on the running app."""

from __future__ import annotations

import json

import pytest
import requests

from quantserve.serve.api_schema import RequestError
from quantserve.serve.feedback import FeedbackBook, ResponseIds, feedback_key, parse_feedback

from .conftest import RunningApp

FORCE = "X-Quantserve-Force-Variant"


def test_ids_name_their_variant_and_refuse_forgery() -> None:
    ids = ResponseIds(feedback_key("app", ["ab" * 32]))
    rid = ids.new("nf4-α")
    assert rid.startswith("gen_") and ids.variant_of(rid) == "nf4-α"
    assert ResponseIds(feedback_key("app", ["ab" * 32])).variant_of(rid) == "nf4-α"  # another replica, same key
    assert ResponseIds(feedback_key("other-app")).variant_of(rid) is None
    assert ResponseIds(feedback_key("app")).variant_of(rid) is None  # keys changed: old ids are refused
    name, rnd, mac = rid[4:].split("_")
    forged = f"gen_{ResponseIds(b'x').new('bf16')[4:].split('_')[0]}_{rnd}_{mac}"  # bf16's name, nf4's mac
    assert ids.variant_of(forged) is None
    for bad in ("", "gen_", "gen__", "nope", rid[:-1], rid + "0", "gen_" + "a" * 300):
        assert ids.variant_of(bad) is None
    assert len({ids.new("bf16") for _ in range(200)}) == 200


@pytest.mark.parametrize("body,status,param", [
    (b"{", 400, "body"),
    (b"[1]", 400, "body"),
    (json.dumps({"id": "gen_x"}).encode(), 422, "score"),
    (json.dumps({"score": 1}).encode(), 422, "id"),
    (json.dumps({"id": "gen_x", "score": 2}).encode(), 422, "score"),
    (json.dumps({"id": "gen_x", "score": -1.5}).encode(), 422, "score"),
    (json.dumps({"id": "gen_x", "score": "1"}).encode(), 422, "score"),
    (json.dumps({"id": "gen_x", "score": True}).encode(), 422, "score"),
    (b'{"id": "gen_x", "score": NaN}', 422, "score"),
    (json.dumps({"id": 7, "score": 1}).encode(), 422, "id"),
    (json.dumps({"id": "gen_x", "score": 1, "extra": 1}).encode(), 422, "extra"),
])
def test_bad_feedback_bodies_name_the_field(body: bytes, status: int, param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_feedback(body)
    assert (info.value.status, info.value.param) == (status, param), str(info.value)


def test_scores_are_tallied_per_variant_once_per_id() -> None:
    book = FeedbackBook(["bf16", "nf4"])
    book.record("a", "nf4", 1.0)
    book.record("b", "nf4", -0.5)
    book.record("c", "bf16", 0.0)
    with pytest.raises(RequestError) as info:
        book.record("a", "nf4", 1.0)
    assert info.value.status == 409
    assert book.summary() == {"bf16": {"count": 1, "mean": 0.0, "positive": 0, "negative": 0},
                              "nf4": {"count": 2, "mean": 0.25, "positive": 1, "negative": 1}}
    assert parse_feedback(b'{"id": "gen_x", "score": -1}') == ("gen_x", -1.0)


def test_feedback_end_to_end(app: RunningApp) -> None:
    served = app.post({"prompt": "3", "steps": 2}, headers={FORCE: "nf4"})
    assert served.status_code == 200
    rid = served.json()["id"]
    assert served.headers["X-Quantserve-Response-Id"] == rid
    url = f"{app.url}/v1/feedback"
    before = app.get("/v1/ab").json()["feedback"]["nf4"]["count"]
    ok = requests.post(url, json={"id": rid, "score": 0.5}, timeout=30)
    assert ok.status_code == 200 and ok.json()["variant"] == "nf4" and ok.headers["X-Quantserve-Variant"] == "nf4"
    assert app.get("/v1/ab").json()["feedback"]["nf4"]["count"] == before + 1
    again = requests.post(url, json={"id": rid, "score": 1}, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["param"] == "id"
    unknown = requests.post(url, json={"id": rid[:-2] + "00", "score": 1}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_response"
    bad = requests.post(url, json={"id": rid, "score": 3}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "score"
    png = requests.post(f"{app.url}/v1/images/generations", json={"prompt": "3", "steps": 1,
                                                                 "response_format": "png"}, timeout=60)
    assert png.status_code == 200 and png.headers["X-Quantserve-Response-Id"].startswith("gen_")
