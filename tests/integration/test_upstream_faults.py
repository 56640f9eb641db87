"""Upstream faults (CASES B1-B4, B6) against a real gateway process and a fake replica on loopback."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import WHOLE_BODY, Behaviour, FakeVllm, sse_chunk
from tests.harness.processes import free_port
from tests.support import RunningGateway, post_json, run_gateway_async, write_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
JSON = {"content-type": "application/json"}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


PAUSE = 2.5  # longer than the pools' 1 s idle timeout
BREAKER_COOLDOWN = 1.0


def _config(tmp_path: Path, upstreams: list[str], **pool: Any) -> list[str]:
    # These tests send one identical request again and again and count hits per replica: under affinity routing
    # it maps to one replica chosen by the (random) ports, so rotation is asked for unless a test says otherwise.
    pool.setdefault("routing", "least_outstanding")
    models = [{"name": "m", "upstreams": upstreams, **pool}]
    path = write_config(tmp_path / "gateway.yaml", models, health_check_interval=60, replica_cooldown=30)
    return ["--config", str(path)]


async def _post(gateway: RunningGateway, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return await post_json(gateway, "/v1/chat/completions", body, headers=headers)


async def _stream_events(gateway: RunningGateway, body: dict[str, Any]) -> tuple[int, list[bytes]]:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", content=orjson.dumps(body), headers=JSON) as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            return response.status_code, [e for e in raw.split(b"\n\n") if e]


async def test_reset_before_headers_fails_over_and_marks_replica_down(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="reset")
    async with run_gateway_async(_config(tmp_path, [fake_a.url, fake_b.url]), log_dir) as gateway:
        for _ in range(3):
            response = await _post(gateway, CHAT)
            assert response.status_code == 200, response.text
        assert fake_a.hits == 1, "a replica that reset the connection must not be tried again"
        assert fake_b.hits == 3
        assert gateway.metric("gateway_upstream_retries_total", {"model": "m"}) == 1
        assert gateway.metric("gateway_replica_healthy", {"replica": fake_a.url}) == 0
        assert gateway.metric("gateway_replica_healthy", {"replica": fake_b.url}) == 1


async def test_connection_refused_is_served_by_another_replica(tmp_path: Path, log_dir: Path, fake_b: FakeVllm) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with run_gateway_async(_config(tmp_path, [dead, fake_b.url]), log_dir) as gateway:
        statuses = [(await _post(gateway, CHAT)).status_code for _ in range(4)]
        assert statuses == [200] * 4
        assert fake_b.hits == 4


async def test_429_cools_the_replica_and_retries_once_elsewhere(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="status", status=429, retry_after="30")
    # One session pinned by its key to the saturated replica: the first request meets the 429 there and is
    # retried on the other; the next ones skip it while it cools, under either routing mode.
    for routing in ("least_outstanding", "affinity"):
        fake_a.hits = fake_b.hits = 0
        args = _config(tmp_path, [fake_a.url, fake_b.url], routing=routing)
        async with run_gateway_async(args, log_dir) as gateway:
            session = await _session_owned_by(gateway, fake_a, fake_b) if routing == "affinity" else None
            headers = {"x-session-id": session} if session else {}
            fake_a.behaviour = Behaviour(mode="status", status=429, retry_after="30")
            fake_a.hits = fake_b.hits = 0
            for _ in range(4):
                assert (await _post(gateway, CHAT, headers)).status_code == 200
            assert fake_a.hits == 1, f"{routing}: the cooling replica must be skipped for its Retry-After"
            assert fake_b.hits == 4


async def _session_owned_by(gateway: RunningGateway, owner: FakeVllm, other: FakeVllm) -> str:
    """A session id whose affinity key maps to `owner` (found by asking: routing is a pure function of it)."""
    owner.behaviour = Behaviour()
    for n in range(64):
        before = owner.hits
        assert (await _post(gateway, CHAT, {"x-session-id": f"s{n}"})).status_code == 200
        if owner.hits > before:
            return f"s{n}"
    raise AssertionError("no session mapped to the replica in 64 tries")


async def test_all_replicas_saturated_gives_client_retry_after(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    for fake in (fake_a, fake_b):
        fake.behaviour = Behaviour(mode="status", status=503, retry_after="7")
    async with run_gateway_async(_config(tmp_path, [fake_a.url, fake_b.url]), log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"]["type"] == "service_unavailable"
        assert fake_a.hits + fake_b.hits == 2, "exactly one bounded retry"
        again = await _post(gateway, CHAT)
        assert again.status_code == 503 and "retry-after" in again.headers
        assert fake_a.hits + fake_b.hits == 2, "cooling replicas are not hammered"


async def test_upstream_400_passes_through_without_retry(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    for fake in (fake_a, fake_b):
        fake.behaviour = Behaviour(mode="status", status=400)
    async with run_gateway_async(_config(tmp_path, [fake_a.url, fake_b.url]), log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "fake status 400"
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert fake_a.hits + fake_b.hits == 1
        assert gateway.metric("gateway_replica_healthy", {"model": "m"}) == 2, "a 400 is not the replica's fault"


@pytest.mark.parametrize(
    "message",
    [
        'Traceback (most recent call last):\n  File "/opt/vllm/entrypoints/openai/serving_chat.py", line 10',
        "Invalid request: <vllm.sampling_params.SamplingParams object at 0x7f3a2c1d9e50>",
        "ValueError('prompt too long')",
        "cannot read /srv/models/qwen/preprocessor_config.json",
        "upstream http://10.0.3.7:8000/v1 refused",
    ],
)
async def test_upstream_400_with_internal_details_gets_the_generic_message(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, message: str
) -> None:
    """F10: the status passes through; a message that shows internals does not."""
    fake_a.behaviour = Behaviour(mode="status", status=400, message=message)
    async with run_gateway_async(_config(tmp_path, [fake_a.url]), log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 400
        assert response.json()["error"]["message"] == "The model server rejected the request."
        for leaked in ("Traceback", "0x7f", "ValueError", "/srv", "10.0.3.7", fake_a.url):
            assert leaked not in response.text


async def test_upstream_500_becomes_502_without_internals(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    fake_a.behaviour = Behaviour(mode="status", status=500)
    async with run_gateway_async(_config(tmp_path, [fake_a.url]), log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 502
        assert "fake status" not in response.text
        assert response.json()["error"]["code"] == "upstream_error"


async def test_first_token_timeout_gives_504(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    fake_a.behaviour = Behaviour(mode="stall_first")
    args = _config(tmp_path, [fake_a.url], timeouts={"first_token": 1, "idle": 5})
    async with run_gateway_async(args, log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "timeout_first_token"}) == 1


async def test_stall_mid_stream_ends_with_error_event_then_done(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="stall_mid", chunks=5)
    args = _config(tmp_path, [fake_a.url, fake_b.url], timeouts={"first_token": 5, "idle": 1})
    async with run_gateway_async(args, log_dir) as gateway:
        status, events = await _stream_events(gateway, STREAM)
        assert status == 200
        assert events[:2] == [sse_chunk(0).rstrip(), sse_chunk(1).rstrip()]
        error = orjson.loads(events[2].removeprefix(b"data: "))["error"]
        assert error["code"] == "upstream_timeout"
        assert events[3] == b"data: [DONE]"
        assert fake_a.hits + fake_b.hits == 1, "no silent retry after the first byte"


async def test_slow_reading_client_is_not_an_idle_replica(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    """A client pausing longer than the idle timeout blocks the relay's writes; the replica kept sending, so the
    stream must complete and the replica must not be blamed."""
    fake_a.behaviour = Behaviour(chunks=400, padding=64 * 1024)  # ~26 MB: far more than the socket buffers hold
    args = _config(tmp_path, [fake_a.url], timeouts={"first_token": 5, "idle": 1})
    async with run_gateway_async(args, log_dir) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", content=orjson.dumps(STREAM), headers=JSON) as r:
                received = bytearray()
                async for chunk in r.aiter_raw():
                    if not received:
                        await asyncio.sleep(PAUSE)  # stop reading for longer than `idle`
                    received += chunk
        assert received.endswith(b"data: [DONE]\n\n")
        assert b'"error"' not in received
        assert received.count(b"data: ") == 400 + 2
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "timeout_idle"}) == 0


async def test_a_gateway_paused_past_the_idle_timeout_keeps_the_stream(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    """A gateway process that gets no CPU for longer than the idle timeout (a starved node, a stop) wakes with its
    idle timer due and the replica's bytes already buffered: the replica was not silent, so the stream goes on."""
    fake_a.behaviour = Behaviour(chunks=40, chunk_delay=0.1)
    args = _config(tmp_path, [fake_a.url], timeouts={"first_token": 5, "idle": 1})
    async with run_gateway_async(args, log_dir) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", content=orjson.dumps(STREAM), headers=JSON) as r:
                received = bytearray()
                async for chunk in r.aiter_raw():
                    if not received:
                        gateway.process.signal(signal.SIGSTOP)
                        await asyncio.sleep(PAUSE)  # the replica keeps sending into the stopped gateway's socket
                        gateway.process.signal(signal.SIGCONT)
                    received += chunk
        assert b'"error"' not in received, bytes(received[-300:])
        assert received.count(b"data: ") == 40 + 2 and received.endswith(b"data: [DONE]\n\n")
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "timeout_idle"}) == 0


async def test_replica_dying_mid_stream_gives_error_event_and_marks_it_down(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="drop_mid", chunks=5)
    async with run_gateway_async(_config(tmp_path, [fake_a.url]), log_dir) as gateway:
        status, events = await _stream_events(gateway, STREAM)
        assert status == 200
        assert len(events) == 4
        assert orjson.loads(events[2].removeprefix(b"data: "))["error"]["code"] == "upstream_error"
        assert events[3] == b"data: [DONE]"
        assert gateway.metric("gateway_replica_healthy", {"replica": fake_a.url}) == 0
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "broken_stream"}) == 1
        follow_up = await _post(gateway, CHAT)
        assert follow_up.status_code == 503, "the only replica is down until a health check passes"
        assert follow_up.headers.get("retry-after")


async def test_stream_is_relayed_byte_for_byte_with_usage_counted(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(chunks=4, chunk_delay=0.01)
    async with run_gateway_async(_config(tmp_path, [fake_a.url]), log_dir) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            async with client.stream(
                "POST", "/v1/chat/completions", content=orjson.dumps(STREAM), headers=JSON
            ) as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert response.headers["content-type"].startswith("text/event-stream")
        expected = b"".join(sse_chunk(i) for i in range(4))
        assert raw.startswith(expected) and raw.endswith(b"data: [DONE]\n\n")
        assert fake_a.bodies[0] == orjson.dumps(STREAM), "the client's bytes go upstream unchanged"
        assert gateway.metric("gateway_prompt_tokens_total", {"model": "m"}) == 7
        assert gateway.metric("gateway_completion_tokens_total", {"model": "m"}) == 3
        assert gateway.metric("gateway_time_to_first_token_seconds_count", {"model": "m"}) == 1
        assert gateway.metric("gateway_inter_token_latency_seconds_count", {"model": "m"}) >= 3


@pytest.mark.parametrize("mode", ["normal", "split_whole"])
async def test_a_whole_body_is_relayed_byte_for_byte_in_one_read_or_several(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, mode: str
) -> None:
    """One read (the relay's short way: no watch, no deadline) or a body still arriving after the first read."""
    fake_a.behaviour = Behaviour(mode=mode, chunk_delay=0.2)
    async with run_gateway_async(_config(tmp_path, [fake_a.url]), log_dir) as gateway:
        response = await _post(gateway, CHAT)
        assert response.status_code == 200
        assert response.content == WHOLE_BODY
        assert response.headers["content-length"] == str(len(WHOLE_BODY))
        assert gateway.metric("gateway_prompt_tokens_total", {"model": "m"}) == 7
        assert gateway.metric("gateway_completion_tokens_total", {"model": "m"}) == 1


async def test_breaker_stops_sending_to_a_failing_replica_then_probes_it(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="status", status=500)
    models = [{"name": "m", "upstreams": [fake_a.url, fake_b.url], "routing": "least_outstanding"}]
    path = write_config(
        tmp_path / "breaker.yaml",
        models,
        health_check_interval=60,
        breaker_failures=3,
        breaker_cooldown=BREAKER_COOLDOWN,
    )
    async with run_gateway_async(["--config", str(path)], log_dir) as gateway:
        statuses = [(await _post(gateway, CHAT)).status_code for _ in range(20)]
        assert statuses.count(502) == 3 and fake_a.hits == 3, "three failures open the breaker; then A is skipped"
        assert fake_b.hits == 17
        await asyncio.sleep(1.2 * BREAKER_COOLDOWN)  # the cool-down running out is what is tested
        statuses = [(await _post(gateway, CHAT)).status_code for _ in range(6)]
        assert fake_a.hits == 4 and statuses.count(502) == 1, "after the cool-down, exactly one probe"
        fake_a.behaviour = Behaviour()
        await asyncio.sleep(1.2 * BREAKER_COOLDOWN)  # the cool-down running out is what is tested
        for _ in range(6):
            assert (await _post(gateway, CHAT)).status_code == 200
        assert fake_a.hits > 5, "a good probe closes the breaker and A serves again"


async def test_retry_budget_keeps_failover_below_a_fraction_of_traffic(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="status", status=429)
    models = [{"name": "m", "upstreams": [fake_a.url, fake_b.url], "routing": "least_outstanding"}]
    path = write_config(
        tmp_path / "budget.yaml",
        models,
        health_check_interval=60,
        replica_cooldown=0,
        retry_budget_ratio=0.2,
        retry_budget_burst=2,
    )
    async with run_gateway_async(["--config", str(path)], log_dir) as gateway:
        statuses = [(await _post(gateway, CHAT)).status_code for _ in range(60)]
        retries = gateway.metric("gateway_upstream_retries_total", {"model": "m"})
        assert retries <= 0.2 * 60 + 2
        assert statuses.count(429) == fake_a.hits - retries, "a request whose retry was not granted gets the 429"
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "retry_budget_exhausted"}) > 0
