from __future__ import annotations

import time

from gateway.config import ModelPool
from gateway.metrics import GatewayMetrics
from gateway.upstream.pool import Replica, ReplicaSet
from gateway.upstream.relay import usage_from_stream_tail

COOLDOWN = 0.01
BREAKER_COOLDOWN = 0.05


def _replicas(n: int) -> ReplicaSet:
    return ReplicaSet(ModelPool(name="m", upstreams=[f"http://r{i}" for i in range(n)]), GatewayMetrics())


def test_least_outstanding_wins() -> None:
    replicas = _replicas(3)
    a, b, c = replicas.replicas
    replicas.acquire(a)
    replicas.acquire(a)
    replicas.acquire(b)
    assert replicas.pick(set())[0] is c
    replicas.acquire(c)
    replicas.acquire(c)
    assert replicas.pick(set())[0] is b


def test_ties_rotate_across_idle_replicas() -> None:
    replicas = _replicas(3)
    picked = {replicas.pick(set())[0].base_url for _ in range(6)}  # type: ignore[union-attr]
    assert picked == {"http://r0", "http://r1", "http://r2"}


def test_down_cooling_and_excluded_replicas_are_skipped() -> None:
    replicas = _replicas(3)
    a, b, c = replicas.replicas
    replicas.mark_down(a)
    replicas.cool_down(b, 60)
    assert replicas.pick(set())[0] is c
    assert replicas.pick({c})[0] is None
    assert replicas.healthy_count() == 1
    assert replicas.soonest_available_in() == 1.0, "c is available now; Retry-After floors at 1 s"
    replicas.cool_down(c, 90)
    assert replicas.pick(set())[0] is None
    assert 50 < replicas.soonest_available_in() <= 60, "the down replica does not count; b frees up first"
    replicas.mark_up(a)
    assert replicas.pick(set())[0] is a


def test_cooldown_expires() -> None:
    replicas = _replicas(1)
    (a,) = replicas.replicas
    replicas.cool_down(a, COOLDOWN)
    time.sleep(2 * COOLDOWN)  # the time running out is what is tested
    assert replicas.pick(set())[0] is a


def test_release_balances_acquire_in_metrics() -> None:
    metrics = GatewayMetrics()
    replicas = ReplicaSet(ModelPool(name="m", upstreams=["http://r0"]), metrics)
    (a,) = replicas.replicas
    replicas.acquire(a)
    replicas.release(a)
    assert a.outstanding == 0
    assert b'gateway_replica_outstanding_requests{model="m",replica="http://r0"} 0.0' in metrics.exposition()


def test_usage_is_found_in_the_stream_tail() -> None:
    tail = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":38,"total_tokens":54,"completion_tokens":16}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_from_stream_tail(tail) == (38, 16)
    assert usage_from_stream_tail(b"data: [DONE]\n\n") == (0, 0)
    assert usage_from_stream_tail(b'data: {"usage":{"prompt_tokens":3') == (0, 0)


def test_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe() -> None:
    replicas = ReplicaSet(
        ModelPool(name="m", upstreams=["http://r0", "http://r1"]),
        GatewayMetrics(),
        breaker_failures=3,
        breaker_cooldown=BREAKER_COOLDOWN,
    )
    a, b = replicas.replicas
    for _ in range(2):
        replicas.record_failure(a)
    assert not a.breaker_open
    replicas.record_failure(a)
    assert a.breaker_open
    assert {replicas.pick(set())[0] for _ in range(4)} == {b}, "open: skipped"
    time.sleep(1.2 * BREAKER_COOLDOWN)  # the cool-down running out is what is tested
    assert _use(replicas, {b}) is a and a.probing, "half-open: one probe"
    assert _use(replicas, {b}) is None, "no second request while the probe is out"
    replicas.record_failure(a)
    assert a.breaker_open and not a.probing and _use(replicas, {b}) is None, "a failed probe re-opens"
    time.sleep(1.2 * BREAKER_COOLDOWN)  # the cool-down running out is what is tested
    assert _use(replicas, {b}) is a
    replicas.record_success(a)
    assert not a.breaker_open and _use(replicas, {b}) is a and not a.probing, "a good probe closes it"


def _use(replicas: ReplicaSet, exclude: set[Replica]) -> Replica | None:
    """Pick a replica and send to it, as the client does: choosing alone marks no probe."""
    chosen, _ = replicas.pick(exclude)
    if chosen is not None:
        replicas.begin(chosen)
    return chosen


def test_retry_budget_caps_retries_to_a_fraction_of_requests() -> None:
    from gateway.upstream.client import RetryBudget

    budget = RetryBudget(ratio=0.2, burst=2)
    granted = 0
    for _ in range(100):
        budget.earn()
        granted += budget.spend()
    assert 20 <= granted <= 22, "about one retry per five requests, plus the banked burst"
