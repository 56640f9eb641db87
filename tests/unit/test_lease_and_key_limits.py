"""The lease (one settlement per request, each verdict's bookkeeping) and the per-key limiter on their own."""

from __future__ import annotations

import time

import pytest

from gateway.access.limits import KeyLimiter
from gateway.config import ModelPool, RateLimits
from gateway.errors import RateLimited
from gateway.metrics import GatewayMetrics
from gateway.upstream.lease import Lease, Verdict
from gateway.upstream.pool import ReplicaSet


def _replicas() -> ReplicaSet:
    pool = ModelPool(name="m", upstreams=["http://r0"])
    return ReplicaSet(pool, GatewayMetrics(), breaker_failures=2, breaker_cooldown=30)


def test_a_lease_holds_its_replica_until_settled_and_settles_once() -> None:
    replicas = _replicas()
    replica = replicas.replicas[0]
    lease = Lease.acquire(replicas, replica)
    assert replica.outstanding == 1
    lease.settle(Verdict.UNREACHABLE)
    lease.settle(Verdict.SUCCEEDED)  # a `finally` settling again changes nothing
    assert replica.outstanding == 0 and not replica.healthy, "the first verdict stands"


@pytest.mark.parametrize(
    ("verdict", "healthy", "failures", "cooled"),
    [
        (Verdict.SUCCEEDED, True, 0, False),
        (Verdict.FAILED, True, 1, False),
        (Verdict.UNREACHABLE, False, 1, False),
        (Verdict.SATURATED, True, 0, True),
        (Verdict.ABANDONED, True, 0, False),
    ],
)
def test_each_verdict_does_its_own_bookkeeping(verdict: Verdict, healthy: bool, failures: int, cooled: bool) -> None:
    replicas = _replicas()
    replica = replicas.replicas[0]
    Lease.acquire(replicas, replica).settle(verdict, cooldown=5)
    assert (replica.healthy, replica.consecutive_failures) == (healthy, failures)
    assert (replica.cooldown_until > time.monotonic()) == cooled
    assert replica.available(time.monotonic()) == (healthy and not cooled)


def test_failures_in_a_row_open_the_breaker_and_a_success_closes_it() -> None:
    replicas = _replicas()
    replica = replicas.replicas[0]
    for _ in range(2):
        Lease.acquire(replicas, replica).settle(Verdict.FAILED)
    assert replica.breaker_open and not replica.available(time.monotonic())
    replica.probing = True  # the half-open breaker lets one request through; it was abandoned
    Lease.acquire(replicas, replica).settle(Verdict.ABANDONED)
    assert replica.breaker_open and not replica.probing, "an abandoned probe decides nothing"
    Lease.acquire(replicas, replica).settle(Verdict.SUCCEEDED)
    assert not replica.breaker_open and replica.consecutive_failures == 0


async def test_a_key_is_held_to_its_own_concurrency_and_request_budget() -> None:
    limiter = KeyLimiter(RateLimits(requests_per_minute=100), {"tight": RateLimits(concurrency=1)})
    assert limiter.limits("tight").requests_per_minute == 100, "a key's own limits override field by field"
    await limiter.admit("tight")
    with pytest.raises(RateLimited) as busy:
        await limiter.admit("tight")
    assert busy.value.headers["Retry-After"] == "1"
    await limiter.admit("other")  # 429 for that key only
    await limiter.leave("tight")
    headers = dict(await limiter.admit("tight"))
    assert headers[b"x-ratelimit-limit-requests"] == b"100"
    assert int(headers[b"x-ratelimit-remaining-requests"]) == 98, "two requests of this key spent; the refused one not"


async def test_a_token_budget_refuses_what_a_minute_cannot_hold_and_what_is_spent() -> None:
    limiter = KeyLimiter(RateLimits(tokens_per_minute=600), {})
    with pytest.raises(RateLimited, match="more than this key's per-minute limit"):
        await limiter.charge_tokens("k", 601)
    await limiter.charge_tokens("k", 590)
    with pytest.raises(RateLimited) as spent:
        await limiter.charge_tokens("k", 100)
    assert int(spent.value.headers["Retry-After"]) >= 9, "90 tokens at 10 a second"
    assert spent.value.headers["x-ratelimit-limit-tokens"] == "600"
