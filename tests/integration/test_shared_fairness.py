"""Tenant counters shared by gateways through a real Redis (Debian's redis-server, started here): each gateway
orders its own queue by what every tenant was served through all of them, and keeps ordering while Redis is away."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis

from gateway.scheduling.fairness import TenantCounters
from gateway.scheduling.shared import SharedCounters
from tests.fake_upstream import Behaviour, FakeVllm
from tests.harness.redis_server import RedisServer
from tests.support import eventually, post_json, run_gateway_async, write_config

KEYS = [{"key": f"sk-{tenant}", "namespace": tenant} for tenant in ("heavy", "light", "holder")]
ONE_SLOT = {"initial_limit": 1, "min_limit": 1, "max_limit": 1}


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


async def test_a_gateway_serves_first_the_tenant_that_other_gateways_served_least(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm, redis: RedisServer
) -> None:
    """Gateway B serves `heavy` alone; then `light` and `heavy` both wait at gateway A (one slot). A dispatches all
    of light's requests first: heavy's counter there holds what B served it. With counters per gateway, A would
    lift heavy to light's counter on arrival and alternate them."""
    settings = {"keys": KEYS, "rate_limits_redis_url": redis.url}
    configs = []
    for name, fake in (("a", fake_a), ("b", fake_b)):
        pool = {"name": "m", "upstreams": [fake.url], "scheduling": ONE_SLOT, "queue_timeout": 60}
        configs.append(["--config", str(write_config(tmp_path / f"{name}.yaml", [pool], **settings))])
    heavy = {"model": "m", "tenant": "heavy"}
    async with run_gateway_async(configs[0], log_dir) as a, run_gateway_async(configs[1], log_dir) as b:
        for n in range(20):
            assert (await post_json(b, "/v1/chat/completions", _chat(f"heavy-b{n}"), key="sk-heavy")).status_code == 200
        served_at_b = b.metric("gateway_tenant_tokens_total", heavy)
        assert served_at_b >= 20 * 8, "each request: the replica's usage report, 7 prompt + 1 output tokens"
        # A's counter for heavy holds what B served it (the estimates corrected to the usage reports' counts)
        assert await eventually(lambda: a.metric("gateway_tenant_virtual_tokens", heavy) >= served_at_b - 1, 10)
        assert a.metric("gateway_tenant_tokens_total", heavy) == 0, "A itself has served heavy nothing"

        fake_a.behaviour = Behaviour(chunks=30, chunk_delay=0.1)  # the holder's stream keeps A's one slot ~3 s
        holder = asyncio.create_task(
            post_json(a, "/v1/chat/completions", _chat("holder", stream=True), key="sk-holder")
        )
        assert await eventually(lambda: fake_a.hits == 1, 5)
        queued = {"model": "m", "band": "default"}
        work = []
        for tenant in ("light", "heavy"):
            for n in range(4):
                body = _chat(f"{tenant}-a{n}")
                work.append(asyncio.create_task(post_json(a, "/v1/chat/completions", body, key=f"sk-{tenant}")))
            waiting = len(work)
            assert await eventually(lambda n=waiting: a.metric("gateway_queue_requests", queued) == n, 5)
        assert [r.status_code for r in await asyncio.gather(holder, *work)] == [200] * 9
        order = [orjson.loads(body)["messages"][0]["content"].split("-")[0] for body in fake_a.bodies[1:]]
        assert order == ["light"] * 4 + ["heavy"] * 4
        assert a.metric("gateway_fairness_sync_errors_total") == 0


async def test_counters_meet_in_redis_lift_once_and_outlast_an_outage(tmp_path: Path, redis: RedisServer) -> None:
    registry = CollectorRegistry()
    errors = Counter("sync_errors", "", registry=registry)
    a, b = TenantCounters(model="m"), TenantCounters(model="m")
    at_a, at_b = SharedCounters(redis.url, [a], errors), SharedCounters(redis.url, [b], errors)

    async def exchange() -> None:
        await at_a.exchange()
        await at_b.exchange()
        await at_a.exchange()

    try:
        a.charge("t1", 100, 1.0)
        b.charge("t1", 20, 2.0)
        await exchange()
        assert a.value("t1") == b.value("t1") == 110, "what each gateway charged, weighted, summed"

        a.lift("t2", ["t1"])
        b.lift("t2", ["t1"])
        await exchange()
        assert a.value("t2") == b.value("t2") == 110, "two gateways lifting one tenant lift it once"

        async with Redis.from_url(redis.url) as client:
            await client.save()  # the restart below finds the counters again
        redis.stop()
        a.charge("t1", 10, 1.0)
        await at_a.exchange()
        assert errors._value.get() == 1, "counted"
        assert a.value("t1") == 120, "ordering goes on with the local count"
        redis.start()
        await exchange()
        assert a.value("t1") == b.value("t1") == 120, "the moves made while Redis was away reached it"
        assert errors._value.get() == 1
    finally:
        await at_a.stop()
        await at_b.stop()
