"""Traces from a real gateway process to a real OTLP/HTTP receiver (decoded with opentelemetry-proto), with fake
replicas on loopback: the client's trace continued, one span per upstream attempt with the failover reason, the
attempt's own traceparent sent to the replica, media and embedding spans, GenAI attributes and no request data;
the JSON access log names the request id and the trace id. (vLLM's spans joining: tests/e2e/test_tracing_vllm.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import Behaviour, FakeVllm
from tests.otlp_receiver import OtlpReceiver
from tests.support import png_data_url, run_gateway_async, write_config

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SECRET_PROMPT = "the-prompt-text-must-not-leave"
KEY = "sk-tracing-test-key"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def _env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",  # the exporter adds /v1/traces
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "vlm-gateway-test",
    }


async def test_a_failover_shows_two_attempts_under_the_clients_trace(
    tmp_path: Path, log_dir: Path, receiver: OtlpReceiver, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(mode="reset")
    # least_outstanding's rotation starts at the second upstream: the resetting replica is tried first
    models = [{"name": "m", "upstreams": [fake_b.url, fake_a.url], "routing": "least_outstanding"}]
    config = write_config(tmp_path / "g.yaml", models, access_log=True, log_format="json", health_check_interval=60)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": SECRET_PROMPT}, {"type": "image_url", "image_url": {"url": png_data_url()}}]}],
        "max_tokens": 4,
        "stream": True,
    }  # fmt: skip
    headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "Authorization": f"Bearer {KEY}"}
    async with run_gateway_async(["--config", str(config), "--api-key", KEY], log_dir, env=_env(receiver)) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", content=orjson.dumps(body), headers=headers)
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        spans = receiver.find(lambda s: s.trace_id == CLIENT_TRACE and s.name.startswith("POST"))
        log = gateway.log()
    assert spans, "the request span continues the client's trace"
    root = spans[0]
    assert root.parent_span_id == CLIENT_SPAN and root.service == "vlm-gateway-test"
    assert root.name == "POST /v1/chat/completions" and root.kind == 2  # SERVER
    assert root.attributes["gen_ai.request.model"] == "m" and root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["gateway.request_id"] == request_id
    assert root.attributes["gen_ai.usage.output_tokens"] == 3 and "gen_ai.first_token" in root.events
    trace = receiver.trace(CLIENT_TRACE)
    attempts = sorted(
        (s for s in trace if s.name == "gateway.upstream.attempt"), key=lambda s: s.attributes["gateway.attempt"]
    )
    assert [a.attributes["gateway.replica"] for a in attempts] == [fake_a.url, fake_b.url]
    assert attempts[0].attributes["error.type"] == "unreachable" and attempts[0].status_code == 2  # ERROR
    assert "error.type" not in attempts[1].attributes
    assert all(a.parent_span_id == root.span_id for a in attempts)
    assert fake_b.traceparents[-1] == f"00-{CLIENT_TRACE}-{attempts[1].span_id}-01", "the replica's parent: its attempt"
    decode = [s for s in trace if s.name == "gateway.media.decode"]
    assert decode and decode[0].attributes["gateway.media.visual_tokens"] > 0
    values = [str(v) for s in trace for v in s.attributes.values()]
    assert not any(SECRET_PROMPT in v or KEY in v or "base64" in v for v in values), "no prompt, key or image"
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("route") == "/v1/chat/completions"]
    assert access and access[-1]["trace_id"] == CLIENT_TRACE and access[-1]["request_id"] == request_id
    assert access[-1]["status"] == 200 and KEY not in log


async def test_embeddings_batches_link_every_request_they_serve(
    tmp_path: Path, log_dir: Path, receiver: OtlpReceiver, fake_a: FakeVllm
) -> None:
    models = [{"name": "m", "upstreams": [fake_a.url]}]
    embeddings: dict[str, Any] = {"clip_model": "tiny-random", "max_wait_ms": 200}
    config = write_config(tmp_path / "g.yaml", models, embeddings=embeddings)
    async with run_gateway_async(["--config", str(config)], log_dir, env=_env(receiver)) as gateway:
        gateway.wait_for_encoder(timeout=120)
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            response = await client.post("/v1/embeddings", json={"model": "clip-tiny-random", "input": ["a cat"]})
        assert response.status_code == 200, response.text
        batches = receiver.find(lambda s: s.name == "gateway.embeddings.batch")
        requests = receiver.find(lambda s: s.name == "POST /v1/embeddings")
    assert batches and requests
    assert requests[0].trace_id in batches[0].links, "the batch links the request it served"
    assert batches[0].attributes["gateway.embeddings.batch_size"] == 1


async def test_tracing_stays_off_without_an_endpoint(
    tmp_path: Path, log_dir: Path, receiver: OtlpReceiver, fake_a: FakeVllm
) -> None:
    config = write_config(tmp_path / "g.yaml", [{"name": "m", "upstreams": [fake_a.url]}])
    async with run_gateway_async(["--config", str(config)], log_dir) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
            assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
    assert fake_a.traceparents == [""], "nothing propagated when tracing is off"
    assert receiver.find(lambda s: True, timeout=1) == []


async def test_spans_reach_an_otlp_grpc_receiver(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    """The other standard transport: OTEL_EXPORTER_OTLP_PROTOCOL=grpc sends the same spans over gRPC."""
    receiver = OtlpReceiver().start_grpc()
    env = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    config = write_config(tmp_path / "g.yaml", [{"name": "m", "upstreams": [fake_a.url]}])
    try:
        async with run_gateway_async(["--config", str(config)], log_dir, env=env) as gateway:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
                assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
            spans = receiver.find(lambda s: s.trace_id == CLIENT_TRACE and s.name == "POST /v1/chat/completions")
    finally:
        receiver.stop()
    assert spans and spans[0].parent_span_id == CLIENT_SPAN
    assert spans[0].attributes["gen_ai.request.model"] == "m"
