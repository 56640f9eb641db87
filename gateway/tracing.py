"""OpenTelemetry traces, configured by the standard `OTEL_*` environment variables; off, and nearly free, without.

On when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and
`OTEL_TRACES_EXPORTER` is not `none`. The protocol is `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (or
`OTEL_EXPORTER_OTLP_PROTOCOL`): `http/protobuf` (the default) or `grpc`. The SDK itself reads the rest: the
sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), the service name and resource attributes, batching.

A client's W3C `traceparent`/`tracestate` is the request span's parent, and each upstream attempt passes its own
to vLLM, so vLLM's spans (`--otlp-traces-endpoint`) join the same trace. Span attributes follow OpenTelemetry's
GenAI conventions (`gen_ai.request.model`, `gen_ai.usage.*`) and never hold a key, a prompt or an image.

The provider is this object's, not the process-global one: an app and its tests own their tracing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("gateway.tracing")
PROPAGATOR = TraceContextTextMapPropagator()
MAX_TRACE_HEADER_BYTES = 512  # W3C: traceparent is 55 characters, tracestate at most 512
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def _exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()  # endpoint, headers, TLS, compression: from the same variables
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


class Tracing:
    def __init__(self, provider: TracerProvider | None) -> None:
        self._provider = provider
        self._tracer: Tracer | None = provider.get_tracer("vlm-gateway") if provider is not None else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tracing:
        exporter = _exporter_from_env(os.environ if env is None else env)
        if exporter is None:
            return OFF
        resource = Resource.create({SERVICE_NAME: (env or os.environ).get("OTEL_SERVICE_NAME", "vlm-gateway")})
        provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: OTLP spans to %s", type(exporter).__module__.rsplit(".", 2)[-2])
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        parent: Context | None = None,
        links: Sequence[Link] = (),
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A span made current for the block (None in the block when tracing is off). With `links` it starts
        its own trace (work done for several requests at once, each linked)."""
        if self._tracer is None:
            return _NO_SPAN
        if links:
            parent = Context()
        return self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes, links=links, record_exception=False
        )

    def parent_from(self, headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
        """The client's trace context from its ASGI headers (bounded; a malformed one starts a new trace)."""
        if self._tracer is None:
            return None
        carrier = {}
        for name, value in headers:
            if name in (b"traceparent", b"tracestate") and len(value) <= MAX_TRACE_HEADER_BYTES:
                carrier[name.decode()] = value.decode("latin-1")
        return PROPAGATOR.extract(carrier) if carrier else None

    def inject(self, headers: dict[str, str]) -> None:
        """The current span's `traceparent` (and `tracestate`) into an upstream request's headers."""
        if self._tracer is not None:
            PROPAGATOR.inject(headers)

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what the batch processor still holds


OFF = Tracing(None)


def failed(span: Span | None, reason: str) -> None:
    """Mark a span as failed with a short, fixed reason (an error code, never a message with request data)."""
    if span is not None:
        span.set_attribute("error.type", reason)
        span.set_status(Status(StatusCode.ERROR))
