"""Backpressure and shutdown with a real gateway process (CASES C1-C4)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
from PIL import Image

from tests.fake_upstream import Behaviour, FakeVllm
from tests.support import RunningGateway, eventually, post_json, run_gateway_async, write_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"content-type": "application/json"}


def _config(tmp_path: Path, fake: FakeVllm, pool: dict[str, Any] | None = None, **settings: Any) -> list[str]:
    models = [{"name": "m", "upstreams": [fake.url], **(pool or {})}]
    return ["--config", str(write_config(tmp_path / "g.yaml", models, **settings))]


async def _post(gateway: RunningGateway, body: dict[str, Any], key: str | None = None) -> httpx.Response:
    return await post_json(gateway, "/v1/chat/completions", body, key=key)


async def test_beyond_the_inflight_limit_and_queue_answers_429_at_once(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(chunks=20, chunk_delay=0.1)  # each stream holds its slot ~2 s
    args = _config(tmp_path, fake_a, {"max_inflight": 4, "max_queue": 2, "queue_timeout": 30})
    async with run_gateway_async(args, log_dir) as gateway:
        stream = {**CHAT, "stream": True}
        responses = await asyncio.gather(*[_post(gateway, stream) for _ in range(12)])
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 6 + [429] * 6, "4 in flight + 2 queued; the rest refused immediately"
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        assert fake_a.hits == 6
        assert (await _post(gateway, CHAT)).status_code == 200, "slots come back"


async def test_pool_saturation_gauges_follow_queued_and_visual_work(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    """The autoscaling signals (helm/ KEDA triggers) rise while work waits or runs and fall back to zero."""
    fake_a.behaviour = Behaviour(chunks=20, chunk_delay=0.2)  # 4 s each: the gauges are read while all 3 wait
    args = _config(tmp_path, fake_a, {"max_inflight": 1, "max_queue": 4, "queue_timeout": 30})
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png()).decode()}}
    with_image = {**CHAT, "stream": True, "messages": [{"role": "user", "content": [image]}]}
    async with run_gateway_async(args, log_dir) as gateway:
        work = [asyncio.create_task(_post(gateway, with_image)) for _ in range(3)]
        assert await eventually(lambda: gateway.metric("gateway_pool_queued_requests", {"model": "m"}) == 2, 3)
        # The open request counts its image once its replica answered: polled, as the queue gauge is.
        assert await eventually(
            lambda: gateway.metric("gateway_pool_visual_tokens_in_flight", {"model": "m"}) == 4, 3
        ), "one 56x56 image open"
        assert [r.status_code for r in await asyncio.gather(*work)] == [200] * 3
        assert gateway.metric("gateway_pool_queued_requests", {"model": "m"}) == 0
        assert gateway.metric("gateway_pool_visual_tokens_in_flight", {"model": "m"}) == 0


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


async def test_queue_time_budget_gives_503(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    fake_a.behaviour = Behaviour(chunks=30, chunk_delay=0.1)
    args = _config(tmp_path, fake_a, {"max_inflight": 1, "max_queue": 5, "queue_timeout": 0.5})
    async with run_gateway_async(args, log_dir) as gateway:
        # The stream holds the one slot for ~3 s before the second request is sent (sent together, either could go
        # first, and a quick answer would free the slot within the budget).
        first = asyncio.create_task(_post(gateway, {**CHAT, "stream": True}))
        assert await eventually(lambda: fake_a.hits == 1)
        second = await _post(gateway, CHAT)
        assert second.status_code == 503 and second.headers["retry-after"] == "2"
        assert (await first).status_code == 200


async def test_one_flooding_key_is_limited_alone(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    keys = [{"key": "sk-flood", "rate_limits": {"requests_per_minute": 5}}, {"key": "sk-calm"}]
    args = _config(tmp_path, fake_a, keys=keys, rate_limits={"tokens_per_minute": 100_000})
    async with run_gateway_async(args, log_dir) as gateway:
        flood = [await _post(gateway, CHAT, "sk-flood") for _ in range(8)]
        assert [r.status_code for r in flood] == [200] * 5 + [429] * 3
        assert flood[0].headers["x-ratelimit-limit-requests"] == "5"
        assert flood[0].headers["x-ratelimit-remaining-requests"] == "4"
        assert "x-ratelimit-remaining-tokens" in flood[0].headers
        assert int(flood[-1].headers["retry-after"]) >= 1
        assert "requests-per-minute limit of 5" in flood[-1].json()["error"]["message"]
        calm = [await _post(gateway, CHAT, "sk-calm") for _ in range(8)]
        assert [r.status_code for r in calm] == [200] * 8, "other keys are unaffected"
        assert fake_a.hits == 13


async def test_token_budget_counts_max_tokens(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    args = _config(tmp_path, fake_a, keys=[{"key": "sk-t", "rate_limits": {"tokens_per_minute": 1000}}])
    async with run_gateway_async(args, log_dir) as gateway:
        assert (await _post(gateway, {**CHAT, "max_tokens": 600}, "sk-t")).status_code == 200
        second = await _post(gateway, {**CHAT, "max_tokens": 600}, "sk-t")
        assert second.status_code == 429 and "tokens-per-minute" in second.json()["error"]["message"]
        too_big = await _post(gateway, {**CHAT, "max_tokens": 5000}, "sk-t")
        assert (
            too_big.status_code == 429 and "more than this key's per-minute limit" in too_big.json()["error"]["message"]
        )
        assert fake_a.hits == 1


async def test_memory_pressure_sheds_new_work_but_stays_alive(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    args = _config(tmp_path, fake_a, memory_limit_bytes=10 * 1024 * 1024)  # far below the process's own RSS
    async with run_gateway_async(args, log_dir) as gateway:
        assert await eventually(lambda: gateway.ready_status() == 503), "the memory sampler sees the pressure"
        response = await _post(gateway, CHAT)
        assert response.status_code == 503 and "memory pressure" in response.json()["error"]["message"]
        async with httpx.AsyncClient(base_url=gateway.base_url) as client:
            assert (await client.get("/health/live")).status_code == 200
        assert fake_a.hits == 0


async def test_sigterm_drains_in_flight_streams_and_refuses_new_work(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(chunks=20, chunk_delay=0.1)
    args = _config(tmp_path, fake_a, drain_delay=5.0, drain_timeout=20)  # 5 s: room for a slow runner
    async with run_gateway_async(args, log_dir) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:

            async def stream() -> bytes:
                async with client.stream(
                    "POST", "/v1/chat/completions", headers=JSON, content=orjson.dumps({**CHAT, "stream": True})
                ) as response:
                    return b"".join([c async for c in response.aiter_raw()])

            streams = [asyncio.create_task(stream()) for _ in range(5)]
            assert await eventually(lambda: fake_a.hits == 5), "all five streams are open"
            gateway.process.signal(signal.SIGTERM)
            assert await eventually(lambda: gateway.ready_status() == 503)
            ready = await client.get("/health/ready")
            refused = await client.post("/v1/chat/completions", content=orjson.dumps(CHAT), headers=JSON)
            bodies = await asyncio.gather(*streams)
        assert ready.status_code == 503 and "draining" in str(ready.json()["problems"])
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        for body in bodies:
            assert body.count(b"data: ") == 22 and body.endswith(b"data: [DONE]\n\n"), "0 broken streams"
        exit_code = await asyncio.to_thread(gateway.process.proc.wait, 20)  # type: ignore[union-attr]
        # uvicorn re-raises the SIGTERM it handled once its orderly shutdown is done, so the status says SIGTERM.
        assert exit_code in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in gateway.log(), "lifespan shutdown ran (final snapshots etc.)"


async def _eventually_status(gateway: RunningGateway, key: str, status: int, timeout: float = 15.0) -> bool:
    """The keys file is polled about once a second; a loaded runner may take a few polls to see a change."""

    async def answered() -> bool:
        return (await _post(gateway, CHAT, key)).status_code == status

    return await eventually(answered, timeout)


async def test_keys_file_changes_apply_without_restart(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    import hashlib

    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- key: sk-first\n  scopes: [read]\n")
    args = [*_config(tmp_path, fake_a), "--keys-file", str(keys_file)]
    async with run_gateway_async(args, log_dir) as gateway:
        assert (await _post(gateway, CHAT, "sk-first")).status_code == 200
        assert (await _post(gateway, CHAT, "sk-second")).status_code == 401
        digest = hashlib.sha256(b"sk-second").hexdigest()  # a file may hold digests only
        keys_file.write_text(f"- sha256: {digest}\n  rate_limits: {{requests_per_minute: 1}}\n")
        assert await _eventually_status(gateway, "sk-first", 401), "revoked without a restart"
        assert (await _post(gateway, CHAT, "sk-second")).status_code == 200
        assert (await _post(gateway, CHAT, "sk-second")).status_code == 429, "its own limits apply too"
        keys_file.write_text("- key: [this is not a key\n")
        assert await eventually(lambda: "not reloaded" in gateway.log())
        assert (await _post(gateway, CHAT, "sk-first")).status_code == 401, "a broken file changes nothing"
        assert "sk-second" not in gateway.log()
        keys_file.write_text("[]\n")
        assert await _eventually_status(gateway, "sk-second", 401), "an empty file lets nobody in"


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG", compress_level=0)
    return out.getvalue()


async def test_refused_photos_leave_no_memory_behind_and_shedding_recovers(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    """CASES F4: thirty distinct 7 MB photos, each refused for context length, must not pin the gateway in
    503s: nothing they prepared is kept, and any shedding they cause ends by itself."""
    pool = {"max_model_len": 256}
    async with run_gateway_async(_config(tmp_path, fake_a, pool), log_dir) as probe:
        assert probe.process.proc is not None
        baseline = _rss_bytes(probe.process.proc.pid)
    limit = int((baseline + 80 * 1024 * 1024) / 0.9)
    args = _config(tmp_path, fake_a, pool, memory_limit_bytes=limit)
    async with run_gateway_async(args, log_dir) as gateway:
        statuses = []
        for _ in range(30):
            url = "data:image/png;base64," + base64.b64encode(_noise_png(1500)).decode()
            body = {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            }
            statuses.append((await _post(gateway, body)).status_code)
        assert set(statuses) <= {400, 503} and 400 in statuses, statuses
        recovered = await eventually(lambda: httpx.get(f"{gateway.base_url}/health/ready").status_code == 200, 20)
        assert recovered, httpx.get(f"{gateway.base_url}/health/ready").text
        assert (await _post(gateway, CHAT)).status_code == 200
        assert fake_a.hits == 1, "no refused photo reached the replica"


async def test_a_client_that_hangs_up_while_queued_reaches_no_replica(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    """CASES G2: the request leaves the gateway's queue with its client; nothing is sent to the replica."""
    fake_a.behaviour = Behaviour(chunks=30, chunk_delay=0.1)  # the one slot is held ~3 s
    args = _config(tmp_path, fake_a, {"max_inflight": 1, "queue_timeout": 30})
    queued = {"model": "m", "band": "default"}
    async with run_gateway_async(args, log_dir) as gateway:
        holder = asyncio.create_task(_post(gateway, {**CHAT, "stream": True}))
        assert await eventually(lambda: fake_a.hits == 1, 5)
        leaving = asyncio.create_task(_post(gateway, CHAT))
        assert await eventually(lambda: gateway.metric("gateway_queue_requests", queued) == 1, 5)
        leaving.cancel()  # the client closes its connection while its request waits
        assert await eventually(lambda: gateway.metric("gateway_queue_requests", queued) == 0, 5)
        assert (await holder).status_code == 200
        assert fake_a.hits == 1, "the request that left was never sent"
        assert (await _post(gateway, CHAT)).status_code == 200 and fake_a.hits == 2
        assert gateway.metric("gateway_requests_total", {"status": "499"}) == 1


async def test_a_replica_that_dies_while_work_waits_leaves_the_queue_to_the_others(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    """CASES G3: two replicas of one slot each and six requests waiting at the gateway; one replica dies. The
    request it was serving ends there (its stream had started, so it is not retried), every waiting request is
    served by the other replica, and none reaches a replica twice."""
    for fake in (fake_a, fake_b):
        fake.behaviour = Behaviour(chunks=10, chunk_delay=0.1)  # each stream holds its slot ~1 s
    one_slot = {"initial_limit": 1, "min_limit": 1, "max_limit": 1}
    pool = {"upstreams": [fake_a.url, fake_b.url], "routing": "least_outstanding", "scheduling": one_slot}
    args = _config(tmp_path, fake_a, {**pool, "queue_timeout": 60}, health_check_interval=1)
    queued = {"model": "m", "band": "default"}
    async with run_gateway_async(args, log_dir) as gateway:
        work = [asyncio.create_task(_post(gateway, {**CHAT, "stream": True})) for _ in range(8)]
        assert await eventually(lambda: fake_a.hits == 1 and fake_b.hits == 1, 5)
        assert await eventually(lambda: gateway.metric("gateway_queue_requests", queued) == 6, 5)
        await fake_a.stop()
        responses = await asyncio.gather(*work)
        assert [r.status_code for r in responses] == [200] * 8
        whole = [r for r in responses if b"error" not in r.content and r.content.endswith(b"data: [DONE]\n\n")]
        assert len(whole) >= 7, "every waiting request was served whole"
        assert fake_a.hits == 1 and fake_b.hits == 7, "each request reached one replica once"
        assert gateway.metric("gateway_queue_requests", queued) == 0
        assert await eventually(lambda: gateway.metric("gateway_replica_healthy", {"model": "m"}) == 1, 5)
