"""An OTLP/HTTP trace receiver for the tests: decodes what arrives with the official opentelemetry-proto messages.

`POST /v1/traces` with an `ExportTraceServiceRequest` (protobuf, optionally gzip) is answered 200 and its spans
kept, flattened, for a test to find by name and trace id. It runs in a thread, so sync and async tests both use it.
`start_grpc()` also serves OTLP/gRPC (the collector's TraceService, from opentelemetry-proto's stubs) on
`grpc_port`, into the same list.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.harness.processes import free_port

POLL = 0.1  # how often the received spans are looked at while a test waits for one


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    links: tuple[str, ...]  # trace ids of linked spans
    events: tuple[str, ...]
    duration_ms: float = 0.0


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class OtlpReceiver:
    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)
    grpc_port: int = field(default_factory=free_port)
    _server: ThreadingHTTPServer | None = None
    _grpc: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._keep(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def start_grpc(self) -> OtlpReceiver:
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
                receiver._keep(request)
                return ExportTraceServiceResponse()

        self._grpc = grpc.server(ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._grpc)
        self._grpc.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)

    def _keep(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            status_code=span.status.code,
                            links=tuple(link.trace_id.hex() for link in span.links),
                            events=tuple(event.name for event in span.events),
                            duration_ms=(span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                        )
                    )
        with self._lock:
            self.spans.extend(found)
            del self.spans[:-100_000]  # bounded, whatever a long e2e session sends

    def find(self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 15.0) -> list[ReceivedSpan]:
        """Spans matching `predicate`, waiting up to `timeout` for at least one (exporters batch)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                matched = [span for span in self.spans if predicate(span)]
            if matched or time.monotonic() > deadline:
                return matched
            time.sleep(POLL)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


def render_trace(spans: list[ReceivedSpan], shown: tuple[str, ...] = ()) -> str:
    """A trace as an indented tree: service, span name, duration and the attributes named in `shown`."""
    children: dict[str, list[ReceivedSpan]] = {}
    ids = {span.span_id for span in spans}
    for span in spans:
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            attributes = " ".join(f"{k}={span.attributes[k]}" for k in shown if k in span.attributes)
            lines.append(f"{'  ' * depth}{span.service}: {span.name}  {span.duration_ms:.1f} ms  {attributes}".rstrip())
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)
