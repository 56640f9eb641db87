"""One trace across the gateway and vLLM: the real OpenAI SDK -> a real gateway exporting OTLP -> real vLLM CPU
replicas exporting their own spans (`--otlp-traces-endpoint`) to the same receiver, decoded with opentelemetry-proto.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.conftest import API_KEY, MODEL, Replica, gateway_args
from tests.harness.processes import free_port
from tests.otlp_receiver import OtlpReceiver, render_trace
from tests.support import RunningGateway, run_gateway

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class _Resetting(BaseHTTPRequestHandler):
    """A replica that passes its health check but drops every generation request before answering."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def resetting_replica() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Resetting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def traced_gateway(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica], otlp: OtlpReceiver, resetting_replica: str
) -> Iterator[RunningGateway]:
    # least_outstanding's rotation starts at the second upstream: the first request tries the resetting one first
    upstreams = [live_replicas[0].url, resetting_replica]
    args = gateway_args(tmp_path, live_replicas, routing="least_outstanding", upstreams=upstreams)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp.port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with run_gateway(args, log_dir, env=env) as running:
        yield running


def test_gateway_and_vllm_spans_form_one_trace_across_a_failover(
    traced_gateway: RunningGateway, live_replicas: list[Replica], otlp: OtlpReceiver, log_dir: Path
) -> None:
    sdk = OpenAI(base_url=f"{traced_gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert reply.choices
    vllm_spans = otlp.find(lambda s: s.trace_id == CLIENT_TRACE and s.service != "vlm-gateway", timeout=30)
    assert vllm_spans, "vLLM's own span joined the client's trace"
    # The gateway's request span ends after the last byte went out, so it may be exported after vLLM's spans.
    ours = otlp.find(lambda s: s.trace_id == CLIENT_TRACE and s.name == "POST /v1/chat/completions", timeout=30)
    assert ours, "the gateway's request span joined the client's trace"
    trace = otlp.trace(CLIENT_TRACE)
    request = ours[0]
    assert request.parent_span_id == CLIENT_SPAN and request.service == "vlm-gateway"
    attempts = sorted(
        (s for s in trace if s.name == "gateway.upstream.attempt"), key=lambda s: s.attributes["gateway.attempt"]
    )
    assert len(attempts) == 2, [a.attributes for a in attempts]
    assert attempts[0].attributes["error.type"] == "unreachable"
    assert attempts[1].attributes["gateway.replica"] == live_replicas[0].url
    assert all(a.parent_span_id == request.span_id for a in attempts)
    engine = vllm_spans[0]
    assert engine.parent_span_id == attempts[1].span_id, "vLLM's span hangs under the attempt that reached it"
    assert engine.attributes.get("gen_ai.usage.completion_tokens") == 4
    assert request.attributes["gen_ai.usage.output_tokens"] == 4
    shown = (
        "gen_ai.request.model",
        "gateway.replica",
        "error.type",
        "gen_ai.usage.output_tokens",
        "http.response.status_code",
    )
    (log_dir / "trace.txt").write_text(render_trace(otlp.trace(CLIENT_TRACE), shown))  # README's example
