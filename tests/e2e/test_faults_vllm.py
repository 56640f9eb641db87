"""Replica faults with real vLLM processes: kill -9, SIGSTOP, client hang-up (CASES B1, B2, B5, B6, C5)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL, Replica, gateway_args, wait_for
from tests.e2e.test_chat_vllm import client
from tests.support import RunningGateway, metric_value, run_gateway

LONG_STREAM = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a very long story"}],
    "max_tokens": 7000,  # ~13 s of tokens at the tiny model's pace on this machine
    "stream": True,
    "extra_body": {"ignore_eos": True},
}


def _serving_replica(gateway: RunningGateway, replicas: list[Replica]) -> Replica:
    """The replica holding this test's one request, from the gateway's own per-replica gauge (exact and
    immediate; vLLM's num_requests_running is refreshed only as its engine steps, so it can be stale)."""
    serving: list[Replica] = []
    seen: list[list[float]] = []

    def exactly_one() -> bool:
        text = gateway.metrics()
        counts = [metric_value(text, "gateway_replica_outstanding_requests", {"replica": r.url}) for r in replicas]
        seen.append(counts)
        serving[:] = [r for r, count in zip(replicas, counts, strict=True) if count == 1]
        return sorted(counts) == [0] * (len(replicas) - 1) + [1]

    assert wait_for(exactly_one, timeout=10), (
        f"outstanding per replica, polled: {seen[:3]}...{seen[-2:]}; " + (gateway.log()[-3000:])
    )
    return serving[0]


def test_client_disconnect_aborts_the_generation_upstream(
    gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    generated_before = sum(r.generated_tokens() for r in live_replicas)
    finished_before = sum(r.finished("length") for r in live_replicas)
    stream = client(gateway).chat.completions.create(**LONG_STREAM)  # type: ignore[call-overload]
    iterator = iter(stream)
    next(iterator), next(iterator)
    serving = _serving_replica(gateway, live_replicas)
    stream.close()  # the client hangs up mid-stream
    assert wait_for(lambda: serving.running_requests() == 0, timeout=10), "vLLM kept generating for nobody"
    # Had vLLM not aborted, the request would have run on to its 7,000 tokens before leaving the running set.
    assert sum(r.generated_tokens() for r in live_replicas) - generated_before < 3500
    assert sum(r.finished("length") for r in live_replicas) == finished_before


def test_frozen_replica_mid_stream_hits_the_idle_timeout(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica]
) -> None:
    args = gateway_args(tmp_path, live_replicas, timeouts={"first_token": 30, "idle": 5})
    with run_gateway(args, log_dir) as gateway:
        stream = client(gateway).chat.completions.create(**LONG_STREAM)  # type: ignore[call-overload]
        iterator = iter(stream)
        next(iterator)
        frozen = _serving_replica(gateway, live_replicas)
        frozen.process.signal(signal.SIGSTOP)
        try:
            with pytest.raises(openai.APIError) as caught:
                for _ in iterator:
                    pass
            assert caught.value.code == "upstream_timeout"
            assert gateway.metric("gateway_upstream_errors_total", {"kind": "timeout_idle"}) == 1
        finally:
            frozen.process.signal(signal.SIGCONT)


def test_replica_killed_mid_stream(gateway: RunningGateway, live_replicas: list[Replica]) -> None:
    sdk = client(gateway)
    stream = sdk.chat.completions.create(**LONG_STREAM)  # type: ignore[call-overload]
    iterator = iter(stream)
    next(iterator)
    victim = _serving_replica(gateway, live_replicas)
    survivor = next(r for r in live_replicas if r is not victim)
    victim.process.kill()
    with pytest.raises(openai.APIError) as caught:
        for _ in iterator:
            pass
    assert "failed in the middle of the stream" in caught.value.message
    assert gateway.metric("gateway_replica_healthy", {"replica": victim.url}) == 0
    for _ in range(3):  # the survivor serves everything now, with no error seen by clients
        reply = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices
    ready = httpx.get(f"{gateway.base_url}/health/ready").json()
    assert ready["models"][MODEL] == {"healthy_replicas": 1, "replicas": 2, "scaled_to_zero": False}
    assert survivor.process.alive()


def test_dead_replica_not_yet_noticed_is_failed_over(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica]
) -> None:
    """With health checks too slow to notice, the connect failure itself routes the request elsewhere (B6)."""
    config = gateway_args(tmp_path, live_replicas)
    config_path = Path(config[1])
    config_path.write_text(config_path.read_text().replace("health_check_interval: 1", "health_check_interval: 3600"))
    with run_gateway(config, log_dir) as gateway:
        sdk = client(gateway)
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        # Affinity routing sends this request to one replica every time: that one is the victim, found by asking.
        served = [metric_value(r.metrics(), "vllm:request_success_total") for r in live_replicas]
        assert sdk.chat.completions.create(**chat).choices  # type: ignore[call-overload]
        victim = next(
            r
            for r, before in zip(live_replicas, served, strict=True)
            if wait_for(lambda r=r, before=before: metric_value(r.metrics(), "vllm:request_success_total") > before, 5)
        )
        victim.process.kill()
        for _ in range(4):
            assert sdk.chat.completions.create(**chat).choices  # type: ignore[call-overload]
        assert gateway.metric("gateway_upstream_retries_total", {"model": MODEL}) == 1
        assert gateway.metric("gateway_upstream_errors_total", {"kind": "connect"}) == 1


def test_all_replicas_down_liveness_holds_and_readiness_reports(
    tmp_path: Path, log_dir: Path, replicas: list[Replica]
) -> None:
    with run_gateway(gateway_args(tmp_path, replicas), log_dir) as gateway:
        _all_down(gateway, replicas)


def _all_down(gateway: RunningGateway, replicas: list[Replica]) -> None:
    killers = [threading.Thread(target=r.process.kill) for r in replicas if r.process.alive()]
    for killer in killers:
        killer.start()
    for killer in killers:
        killer.join()
    assert wait_for(lambda: httpx.get(f"{gateway.base_url}/health/ready").status_code == 503, timeout=15)
    assert httpx.get(f"{gateway.base_url}/health/live").status_code == 200
    with pytest.raises(openai.InternalServerError) as caught:
        client(gateway).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert caught.value.response.headers.get("retry-after")
    assert API_KEY not in gateway.log()
