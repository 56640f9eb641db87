"""Tracing's switch and exporter come from the standard OTEL_* variables; span names stay low-cardinality."""

from __future__ import annotations

import pytest

from gateway.server.middleware import route_name
from gateway.tracing import OFF, Tracing


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, None),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"},
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        ),
    ],
)
def test_the_exporter_follows_the_environment(env: dict[str, str], exporter: str | None) -> None:
    tracing = Tracing.from_env(env)
    try:
        if exporter is None:
            assert tracing is OFF and not tracing.enabled
            assert tracing.parent_from([(b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]) is None
        else:
            assert tracing.enabled
            processor = tracing._provider._active_span_processor._span_processors[0]  # type: ignore[union-attr]
            assert type(processor._batch_processor._exporter).__module__ == exporter
    finally:
        tracing.shutdown()


def test_a_client_trace_is_continued_and_bad_headers_are_ignored() -> None:
    tracing = Tracing.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        with tracing.span(
            "x", parent=tracing.parent_from([(b"traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())])
        ) as span:
            assert span is not None and format(span.get_span_context().trace_id, "032x") == trace_id
            headers: dict[str, str] = {}
            tracing.inject(headers)
            assert headers["traceparent"].startswith(f"00-{trace_id}-")
        for bad in (b"garbage", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01", b"x" * 5000):
            with tracing.span("y", parent=tracing.parent_from([(b"traceparent", bad)])) as span:
                assert span is not None and format(span.get_span_context().trace_id, "032x") != trace_id
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/responses", "/v1/responses"),
        ("/v1/responses/resp_abc", "/v1/responses/{id}"),
        ("/v1/responses/resp_abc/cancel", "/v1/responses/{id}/cancel"),
        ("/v1/collections/photos/items/a/b/c/d/e/f", "/v1/collections/{id}/items/{id}"),
        ("/v1/collections/photos/snapshot", "/v1/collections/{id}/snapshot"),
        ("/v1/adapters/dyn", "/v1/adapters/{id}"),
    ],
)
def test_route_names_hide_ids(path: str, name: str) -> None:
    assert route_name(path) == name
