"""Replica discovery through DNS: URL building, pool membership changes, DNS failures and config checks."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from gateway.config import ModelPool, Settings
from gateway.metrics import GatewayMetrics
from gateway.upstream.discovery import DiscoveryFailed, replica_urls, system_resolver
from gateway.upstream.pool import Pools, ReplicaSet
from tests.support import metric_value

HANG = 60.0  # a resolver that never answers in a test's time


def test_each_address_becomes_a_base_url_on_the_discover_port() -> None:
    urls = replica_urls("http://vllm.serving.svc:8000", ["10.0.0.7", "10.0.0.5", "fd00::1", "10.0.0.5"])
    assert urls == ["http://10.0.0.5:8000", "http://10.0.0.7:8000", "http://[fd00::1]:8000"]
    assert replica_urls("http://vllm.serving.svc", ["10.0.0.5"]) == ["http://10.0.0.5:80"]
    assert replica_urls("http://vllm:8000/base/", ["10.0.0.5"]) == ["http://10.0.0.5:8000/base"]


def test_pools_need_upstreams_or_a_discover_name() -> None:
    with pytest.raises(ValidationError, match="needs upstreams, discover, or both"):
        ModelPool(name="m")
    with pytest.raises(ValidationError, match="http:// URL with a host name"):
        ModelPool(name="m", discover="https://vllm.serving.svc:8000")
    with pytest.raises(ValidationError, match="http:// URL with a host name"):
        ModelPool(name="m", discover="vllm.serving.svc:8000")
    assert ModelPool(name="m", discover="http://vllm:8000/").discover == "http://vllm:8000"


def test_replicas_that_stay_keep_their_state_and_those_that_leave_stop_being_exported() -> None:
    metrics = GatewayMetrics()
    pool = ReplicaSet(ModelPool(name="m", upstreams=["http://static:8000"], discover="http://vllm:8000"), metrics)
    pool.adopt_discovered(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    static, first, second = pool.replicas
    pool.acquire(first)
    pool.mark_down(second)
    pool.adopt_discovered(["http://10.0.0.1:8000", "http://10.0.0.3:8000"])
    assert pool.replicas[:2] == [static, first] and first.outstanding == 1, "the same replica, still counted"
    assert pool.replicas[2].base_url == "http://10.0.0.3:8000" and pool.replicas[2].healthy
    exported = metrics.exposition().decode()
    assert 'replica="http://10.0.0.2:8000"' not in exported, "a pod that left is no longer a time series"
    assert metric_value(exported, "gateway_replica_healthy", {"replica": "http://10.0.0.3:8000"}) == 1
    pool.adopt_discovered([])
    assert pool.replicas == [static] and not pool.scaled_to_zero, "configured upstreams stay"
    pool.release(first)  # a request that was open on a pod that left settles without error
    assert first.outstanding == 0


def test_a_discovered_pool_with_no_address_is_scaled_to_zero_and_routes_nowhere() -> None:
    pool = ReplicaSet(ModelPool(name="m", discover="http://vllm:8000"), GatewayMetrics())
    assert not pool.scaled_to_zero, "not before discovery has answered once"
    pool.adopt_discovered([])
    assert pool.scaled_to_zero and pool.pick(set())[0] is None and pool.healthy_count() == 0
    assert pool.soonest_available_in() == 5.0
    pool.adopt_discovered(["http://10.0.0.1:8000"])
    assert not pool.scaled_to_zero and pool.pick(set())[0] is pool.replicas[0]


async def test_a_dns_outage_keeps_the_replicas_last_seen_and_is_counted() -> None:
    answers: list[list[str] | Exception] = [["10.0.0.1", "10.0.0.2"], DiscoveryFailed("SERVFAIL"), ["10.0.0.2"]]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("vllm.serving.svc", 8000)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    metrics = GatewayMetrics()
    settings = Settings(models=[{"name": "m", "discover": "http://vllm.serving.svc:8000"}])
    pools = Pools(settings, metrics, resolver=resolver)
    pool = pools.by_model["m"]
    await pools.discover_all()
    assert [r.base_url for r in pool.replicas] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    await pools.discover_all()
    assert len(pool.replicas) == 2, "an outage is not a scale-down"
    assert metric_value(metrics.exposition().decode(), "gateway_discovery_errors_total", {"model": "m"}) == 1
    await pools.discover_all()
    assert [r.base_url for r in pool.replicas] == ["http://10.0.0.2:8000"]


async def test_a_resolver_that_hangs_is_cut_at_the_health_check_timeout() -> None:
    async def hangs(host: str, port: int) -> list[str]:
        await asyncio.sleep(HANG)
        return []

    settings = Settings(models=[{"name": "m", "discover": "http://vllm:8000"}], health_check_timeout=0.05)
    pools = Pools(settings, GatewayMetrics(), resolver=hangs)
    await asyncio.wait_for(pools.discover_all(), 5)
    assert not pools.by_model["m"].discovered


async def test_the_system_resolver_tells_no_such_name_from_an_answer() -> None:
    assert "127.0.0.1" in await system_resolver("localhost", 8000)
    assert await system_resolver("no-pod-is-ready.invalid", 8000) == [], "NXDOMAIN: zero replicas, not an error"
