"""User feedback on generated images (issue 15): every 200 generation carries a response id, and
`POST /v1/feedback {"id": ..., "score": -1..1}` attributes a score to the variant that served it.

The id names its variant and is signed (HMAC-SHA256, truncated), so any Ingress replica can attribute feedback
without shared state and a made-up or altered id is refused (404). The key is derived from the app name and the
API-key digests (serve/auth.py), so it is the same on every Ingress replica and survives restarts, and nobody
without an accepted key can mint ids for an app that has keys. Scores are kept per variant in the replica (for
/v1/ab) and exported as metrics; an id scores once per replica (409 for a second score).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, ValidationError

from .api_schema import RequestError, json_object

ID_PREFIX = "gen_"
MAX_ID_CHARS = 200
REMEMBERED_IDS = 100_000  # ids already scored, per replica


def feedback_key(app_name: str, api_key_digests: Iterable[str] = ()) -> bytes:
    return hashlib.sha256("\n".join(["quantserve-feedback", app_name, *sorted(api_key_digests)]).encode()).digest()


class ResponseIds:
    """Signed response ids: gen_<variant, base64url>_<random>_<mac>."""

    def __init__(self, key: bytes):
        self.key = key

    def _mac(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()[:20]

    def new(self, variant: str) -> str:
        name = base64.urlsafe_b64encode(variant.encode()).decode().rstrip("=")
        payload = f"{name}_{secrets.token_hex(8)}"
        return f"{ID_PREFIX}{payload}_{self._mac(payload)}"

    def variant_of(self, rid: str) -> str | None:
        """The variant an id was made for; None for anything this app did not make."""
        if not rid.startswith(ID_PREFIX) or len(rid) > MAX_ID_CHARS:
            return None
        payload, _, mac = rid[len(ID_PREFIX):].rpartition("_")
        if not payload or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        name = payload.split("_", 1)[0]
        try:
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    score: StrictFloat | StrictInt


def parse_feedback(body: bytes) -> tuple[str, float]:
    """(id, score) of a feedback body; RequestError (4xx) naming the field otherwise."""
    data = json_object(body)
    try:
        parsed = FeedbackBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc", ())
        param = str(loc[0]) if loc else "body"  # the field, not the union member pydantic tried last
        raise RequestError(422, f"{param}: {first.get('msg', 'invalid')} (expected {{\"id\": a response id, "
                                f"\"score\": a number from -1 to 1}})", param) from None
    score = float(parsed.score)
    if not math.isfinite(score) or not -1.0 <= score <= 1.0:
        raise RequestError(422, f"score: must be a number from -1 to 1 (got {parsed.score!r})", "score")
    if not parsed.id or len(parsed.id) > MAX_ID_CHARS:
        raise RequestError(422, f"id: expected a response id of 1..{MAX_ID_CHARS} characters", "id")
    return parsed.id, score


@dataclass
class Tally:
    count: int = 0
    total: float = 0.0
    positive: int = 0
    negative: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.total / self.count if self.count else None,
                "positive": self.positive, "negative": self.negative}


class FeedbackBook:
    """Scores per variant, and the ids already scored (bounded)."""

    def __init__(self, variants: Iterable[str]):
        self.tallies = {name: Tally() for name in variants}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def record(self, rid: str, variant: str, score: float) -> Tally:
        """Count one score; RequestError 409 when this id was scored already."""
        if rid in self._seen:
            raise RequestError(409, "id: this response was scored already", "id", "duplicate_feedback")
        self._seen[rid] = None
        if len(self._seen) > REMEMBERED_IDS:
            self._seen.popitem(last=False)
        tally = self.tallies.setdefault(variant, Tally())
        tally.count += 1
        tally.total += score
        tally.positive += score > 0
        tally.negative += score < 0
        return tally

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: t.to_dict() for name, t in sorted(self.tallies.items())}
