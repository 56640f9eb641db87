"""Fair share of a saturated pool against a real vLLM replica started with a small --max-num-seqs (CASES G1, G2):
one key floods, another sends a chat at a time; a key above its band is refused. Order and bounds are checked from
both sides — the clients' first tokens and vLLM's own queue counters — never timings. The flex band's place behind
interactive work is checked on the same replica by tests/e2e/test_batch_vllm.py, with a batch's lines."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.e2e.conftest import MODEL, VLLM_LIMITS
from tests.support import RunningGateway, eventually, metric_value, run_gateway, write_config

KEYS = [
    {"key": "sk-flood", "namespace": "team-flood"},
    {"key": "sk-light", "namespace": "team-light"},
]
FLOOD_WORKERS = 24
LIGHT_REQUESTS = 8
SAMPLE_EVERY = 0.25  # how often both sides' counters are read during the flood


@dataclass
class Sent:
    tenant: str
    sent: float
    first_token: float = 0.0
    status: int = 0


def _chat(text: str, tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
    }


async def _stream(http: httpx.AsyncClient, key: str, body: dict[str, object], record: Sent) -> None:
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    async with http.stream("POST", "/v1/chat/completions", content=orjson.dumps(body), headers=headers) as reply:
        record.status = reply.status_code
        async for chunk in reply.aiter_bytes():
            if not record.first_token and b"data:" in chunk:
                record.first_token = time.monotonic()


def _overtaking(light: Sent, flood: list[Sent]) -> int:
    """Flood requests sent before `light` that got their first token while it waited: how far back in line it was."""
    return sum(1 for f in flood if f.sent < light.sent and light.sent < f.first_token < light.first_token)


async def _queued(http: httpx.AsyncClient, band: str) -> float:
    return metric_value((await http.get("/metrics")).text, "gateway_queue_requests", {"band": band})


async def _until_queued(http: httpx.AsyncClient, band: str, at_least: int) -> None:
    async def enough() -> bool:
        return await _queued(http, band) >= at_least

    assert await eventually(enough, 120), f"{at_least} requests never waited in the {band} band"


async def _light_under_flood(http: httpx.AsyncClient, base: str, replica_url: str) -> tuple[list[Sent], list[Sent]]:
    """24 flood requests always open; 8 light chats, each sent while the flood has a backlog at the gateway."""
    flood: list[Sent] = []
    stop = asyncio.Event()
    samples: list[tuple[float, float]] = []  # (vLLM running + waiting, the replica's limit)

    async def flood_worker(n: int) -> None:
        while not stop.is_set():
            record = Sent("flood", time.monotonic())
            flood.append(record)
            await _stream(http, "sk-flood", _chat(f"flood {n} {len(flood)}", 64), record)

    async def sample() -> None:
        while not stop.is_set():
            engine = (await http.get(f"{replica_url}/metrics")).text
            ours = (await http.get("/metrics")).text
            held = metric_value(engine, "vllm:num_requests_running") + metric_value(engine, "vllm:num_requests_waiting")
            samples.append((held, metric_value(ours, "gateway_replica_inflight_limit", {"replica": replica_url})))
            await asyncio.sleep(SAMPLE_EVERY)

    workers = [asyncio.create_task(flood_worker(n)) for n in range(FLOOD_WORKERS)]
    sampler = asyncio.create_task(sample())
    light: list[Sent] = []
    sdk = AsyncOpenAI(base_url=base, api_key="sk-light", max_retries=0, timeout=120)
    for n in range(LIGHT_REQUESTS):
        await _until_queued(http, "default", FLOOD_WORKERS // 3)
        record = Sent("light", time.monotonic())
        stream = await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"light {n}"}], max_tokens=4, stream=True
        )
        async for _ in stream:
            record.first_token = record.first_token or time.monotonic()
        record.status = 200
        light.append(record)
    stop.set()
    await asyncio.gather(*workers, sampler)

    assert [r.status for r in light] == [200] * LIGHT_REQUESTS, "every request of the light key completes"
    assert all(f.status == 200 for f in flood), sorted({f.status for f in flood})
    limits = sorted(s[1] for s in samples)
    behind = [_overtaking(r, flood) for r in light]
    # A light chat waits for the flood requests already on the replica (at most the limit) and then goes next;
    # in vLLM's own first-come-first-served queue it would wait behind the flood's whole backlog as well (each
    # light chat is sent with >= 8 flood requests waiting). The median: first tokens are stamped by this
    # process, which a loaded machine sometimes lets fall behind its own streams.
    assert statistics.median(behind) <= statistics.median(limits) + 1, (behind, limits)
    held = max(s[0] for s in samples)
    assert held <= limits[-1] + 2, f"vLLM held {held} with the gateway's limit at most {limits[-1]}"
    assert limits[-1] <= FLOOD_WORKERS // 2, "the gateway held most of the flood, not vLLM"
    return light, flood


async def _scenario(gateway: RunningGateway, replica_url: str) -> None:
    base = f"{gateway.base_url}/v1"
    with pytest.raises(openai.PermissionDeniedError) as above:
        await AsyncOpenAI(base_url=base, api_key="sk-light", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, service_tier="priority"
        )
    assert above.value.body["param"] == "service_tier"  # type: ignore[index]

    limits = httpx.Limits(max_connections=FLOOD_WORKERS + 32)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=300, limits=limits) as http:
        await _light_under_flood(http, base, replica_url)

    exposition = gateway.metrics()
    for tenant in ("team-flood", "team-light"):
        assert metric_value(exposition, "gateway_tenant_tokens_total", {"tenant": tenant}) > 0, tenant
    assert metric_value(exposition, "gateway_queue_requests", {"band": "default"}) == 0


def test_a_flooded_pool_serves_every_tenant_in_its_turn(tmp_path: Path, log_dir: Path, saturable_replica: str) -> None:
    # The flood waits its turn however slowly this shared machine turns its requests over: no queue timeouts.
    models = [
        {"name": MODEL, "upstreams": [saturable_replica], "limit_mm_per_prompt": VLLM_LIMITS, "queue_timeout": 300}
    ]
    config = write_config(tmp_path / "fair.yaml", models, keys=KEYS, health_check_interval=1)
    with run_gateway(["--config", str(config)], log_dir) as gateway:
        asyncio.run(_scenario(gateway, saturable_replica))
