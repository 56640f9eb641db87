"""Per-key budgets: requests per minute, tokens per minute, concurrent requests. 429 for that key only.

Token buckets refill continuously, so a key that used its minute's budget gets requests back gradually rather
than all at once at the top of the minute. Answers carry OpenAI's `x-ratelimit-*` headers. State is in this
process (keys are a closed set, so it is bounded); with `rate_limits_redis_url` set, gateway/access/redis_limits.py
keeps the same budgets in Redis so every gateway replica draws on one budget per key, and falls back to this one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import RateLimits
from gateway.errors import RateLimited


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    per_second: float
    level: float = field(default=-1.0)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def take(self, amount: float) -> tuple[bool, float, float]:
        """(granted, remaining, seconds until `amount` would be available)."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now
        if amount <= self.level:
            self.level -= amount
            return True, self.level, 0.0
        return False, self.level, (amount - self.level) / self.per_second


def _reset(seconds: float) -> str:
    return f"{max(seconds, 0.001):.3f}s"


def budget_headers(
    kind: str, per_minute: int, granted: bool, remaining: float, wait: float
) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-*` headers for one budget; raises the 429 when the budget refused."""
    headers = [
        (f"x-ratelimit-limit-{kind}".encode(), str(per_minute).encode()),
        (f"x-ratelimit-remaining-{kind}".encode(), str(int(remaining)).encode()),
        (
            f"x-ratelimit-reset-{kind}".encode(),
            _reset(wait or (per_minute - remaining) / (per_minute / 60)).encode(),
        ),
    ]
    if not granted:
        retry = {"Retry-After": str(max(1, math.ceil(wait)))} | {k.decode(): v.decode() for k, v in headers}
        raise RateLimited(f"This API key is over its {kind}-per-minute limit of {per_minute}.", headers=retry)
    return headers


def too_many_in_flight(concurrency: int) -> RateLimited:
    return RateLimited(f"This API key already has {concurrency} requests in flight.", headers={"Retry-After": "1"})


def over_token_budget(tokens: int, per_minute: int) -> RateLimited:
    return RateLimited(
        f"This request needs about {tokens} tokens, more than this key's per-minute limit of {per_minute}."
    )


Headers = list[tuple[bytes, bytes]]


class Limiter(Protocol):
    """What the middleware and the serving code use: each check returns its headers, or raises the 429."""

    def update_keys(self, per_key: dict[str, RateLimits]) -> None: ...
    async def admit(self, key_id: str) -> Headers: ...
    async def leave(self, key_id: str) -> None: ...
    async def charge_tokens(self, key_id: str, tokens: int) -> Headers: ...
    async def close(self) -> None: ...


class KeyLimiter:
    def __init__(self, defaults: RateLimits, per_key: dict[str, RateLimits]) -> None:
        self.defaults = defaults
        self.per_key: dict[str, RateLimits] = {}
        self.update_keys(per_key)
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._active: dict[str, int] = {}

    def update_keys(self, per_key: dict[str, RateLimits]) -> None:
        """A key's own limits override the gateway-wide ones field by field; unset fields keep the defaults."""
        defaults = self.defaults
        self.per_key = {
            key: defaults.model_copy(update={k: v for k, v in own.model_dump().items() if v is not None})
            for key, own in per_key.items()
        }

    def limits(self, key_id: str) -> RateLimits:
        return self.per_key.get(key_id, self.defaults)

    def _bucket(self, key_id: str, kind: str, per_minute: int) -> TokenBucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None or bucket.capacity != per_minute:
            bucket = self._buckets[(key_id, kind)] = TokenBucket(per_minute, per_minute / 60)
        return bucket

    def _spend(self, key_id: str, kind: str, per_minute: int | None, amount: float) -> list[tuple[bytes, bytes]]:
        if per_minute is None:
            return []
        return budget_headers(kind, per_minute, *self._bucket(key_id, kind, per_minute).take(amount))

    async def admit(self, key_id: str) -> list[tuple[bytes, bytes]]:
        """A request slot (requests per minute + concurrency); call `leave` when the request ends."""
        return self.admit_now(key_id)

    def admit_now(self, key_id: str) -> list[tuple[bytes, bytes]]:
        limits = self.limits(key_id)
        if limits.concurrency is not None and self._active.get(key_id, 0) >= limits.concurrency:
            raise too_many_in_flight(limits.concurrency)
        headers = self._spend(key_id, "requests", limits.requests_per_minute, 1)
        self._active[key_id] = self._active.get(key_id, 0) + 1
        return headers

    async def leave(self, key_id: str) -> None:
        self.leave_now(key_id)

    def leave_now(self, key_id: str) -> None:
        self._active[key_id] -= 1

    async def charge_tokens(self, key_id: str, tokens: int) -> list[tuple[bytes, bytes]]:
        return self.charge_tokens_now(key_id, tokens)

    def charge_tokens_now(self, key_id: str, tokens: int) -> list[tuple[bytes, bytes]]:
        return self._spend(key_id, "tokens", self.token_budget(key_id, tokens), tokens)

    def token_budget(self, key_id: str, tokens: int) -> int | None:
        """The key's tokens per minute (None: unlimited); refuses a request bigger than a whole minute's budget."""
        per_minute = self.limits(key_id).tokens_per_minute
        if per_minute is not None and tokens > per_minute:
            raise over_token_budget(tokens, per_minute)
        return per_minute

    async def close(self) -> None:
        pass
