"""Per-key limits shared by two gateway replicas through a real Redis (Debian's redis-server, started here), and
what happens when Redis goes away (CASES C3 across replicas)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_upstream import Behaviour, FakeVllm
from tests.harness.processes import free_port
from tests.harness.redis_server import RedisServer
from tests.support import RunningGateway, eventually, post_json, run_gateway_async, write_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"content-type": "application/json"}


@pytest.fixture
def redis_url(redis: RedisServer) -> str:
    return redis.url


def _config(tmp_path: Path, fake: FakeVllm, name: str, **settings: Any) -> list[str]:
    models = [{"name": "m", "upstreams": [fake.url]}]
    return ["--config", str(write_config(tmp_path / f"{name}.yaml", models, **settings))]


async def _post(gateway: RunningGateway, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    return await post_json(gateway, "/v1/chat/completions", body, key=key)


async def test_two_replicas_draw_on_one_budget_per_key(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, redis_url: str
) -> None:
    keys = [{"key": "sk-shared", "rate_limits": {"requests_per_minute": 5}}, {"key": "sk-other"}]
    settings = {"keys": keys, "rate_limits_redis_url": redis_url}
    async with (
        run_gateway_async(_config(tmp_path, fake_a, "a", **settings), log_dir) as a,
        run_gateway_async(_config(tmp_path, fake_a, "b", **settings), log_dir) as b,
    ):
        statuses = [(await _post(gateway, "sk-shared")).status_code for gateway in (a, b, a, b, a, b, a)]
        assert statuses == [200] * 5 + [429] * 2, "5 per minute for the key, wherever its requests land"
        refused = await _post(b, "sk-shared")
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert int(refused.headers["retry-after"]) >= 1
        assert [(await _post(g, "sk-other")).status_code for g in (a, b)] == [200, 200], "other keys unaffected"
        assert a.metric("gateway_ratelimit_backend_errors_total") == 0


async def test_concurrency_is_counted_across_replicas_and_released(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, redis_url: str
) -> None:
    fake_a.behaviour = Behaviour(chunks=15, chunk_delay=0.1)  # a stream holds its slot ~1.5 s
    keys = [{"key": "sk-one", "rate_limits": {"concurrency": 1}}]
    settings = {"keys": keys, "rate_limits_redis_url": redis_url}
    async with (
        run_gateway_async(_config(tmp_path, fake_a, "a", **settings), log_dir) as a,
        run_gateway_async(_config(tmp_path, fake_a, "b", **settings), log_dir) as b,
    ):
        holding = asyncio.create_task(_post(a, "sk-one", {**CHAT, "stream": True}))
        assert await eventually(lambda: fake_a.hits == 1), "the stream holds its key's one slot"
        second = await _post(b, "sk-one")
        assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
        assert (await holding).status_code == 200
        assert (await _post(b, "sk-one")).status_code == 200, "the slot came back when the stream ended"


async def test_tokens_per_minute_are_shared(tmp_path: Path, log_dir: Path, fake_a: FakeVllm, redis_url: str) -> None:
    keys = [{"key": "sk-t", "rate_limits": {"tokens_per_minute": 1000}}]
    settings = {"keys": keys, "rate_limits_redis_url": redis_url}
    async with (
        run_gateway_async(_config(tmp_path, fake_a, "a", **settings), log_dir) as a,
        run_gateway_async(_config(tmp_path, fake_a, "b", **settings), log_dir) as b,
    ):
        assert (await _post(a, "sk-t", {**CHAT, "max_tokens": 600})).status_code == 200
        second = await _post(b, "sk-t", {**CHAT, "max_tokens": 600})
        assert second.status_code == 429 and "tokens-per-minute" in second.json()["error"]["message"]


async def test_redis_down_falls_back_to_the_replicas_own_budget(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    keys = [{"key": "sk-k", "rate_limits": {"requests_per_minute": 3, "concurrency": 2}}]
    args = _config(tmp_path, fake_a, "a", keys=keys, rate_limits_redis_url=dead)
    async with run_gateway_async(args, log_dir) as gateway:
        statuses = [(await _post(gateway, "sk-k")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429], "served, and still limited, while Redis is away"
        assert gateway.metric("gateway_ratelimit_backend_errors_total") >= 4
        assert "Redis for shared rate limits unreachable" in gateway.log()
