"""Relay an opened upstream response to the ASGI client.

Streams go out byte-for-byte as the replica sends them: chunks are never parsed or re-encoded (a grounded chat adds
one event of its own before `data: [DONE]`). Only the last two reads are kept, to find the usage event that vLLM
sends just before the terminator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from opentelemetry.trace import get_current_span

from gateway.asgi import JSON_CONTENT_TYPE, Receive, Send, send_error
from gateway.config import Timeouts
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout, sse_error_frame
from gateway.metrics import GatewayMetrics
from gateway.upstream.client import OpenedUpstream
from gateway.upstream.errors import TransportError, map_upstream_errors
from gateway.upstream.lease import Verdict

USAGE_MARK = b'"usage":{'
EVENT_MARK = b"data:"
log = logging.getLogger("gateway.relay")
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


@dataclass(slots=True)
class RelayOutcome:
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    upstream_broke: bool = False

    @property
    def verdict(self) -> Verdict:
        """What the relay says about the replica (a client that hung up says nothing against it)."""
        if self.upstream_broke:
            return Verdict.UNREACHABLE
        return Verdict.FAILED if self.status == 504 else Verdict.SUCCEEDED


def _usage_from(payload: Any) -> tuple[int, int]:
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(usage, dict) and isinstance(payload, dict) and isinstance(payload.get("response"), dict):
        usage = payload["response"].get("usage")  # a Responses event wraps the response
    return _counts(usage)


def _counts(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from chat's usage or the Responses API's (input_tokens, output_tokens)."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0)


_DECODER = json.JSONDecoder()


def usage_from_stream_tail(tail: bytes) -> tuple[int, int]:
    """The last usage object in a stream's tail: chat's final chunk, or Responses' `response.completed` event
    (whose full response may begin before the tail; only the usage object itself is decoded)."""
    at = tail.rfind(USAGE_MARK)
    if at < 0:
        return 0, 0
    try:
        usage, _ = _DECODER.raw_decode(tail[at + len(USAGE_MARK) - 1 :].decode("utf-8", "replace"))
    except ValueError:
        return 0, 0
    return _counts(usage)


StreamError = Callable[[GatewayError, bytes], bytes]
FinalChunk = Callable[[bytes], bytes]
DONE_EVENT = b"data: [DONE]\n\n"


class BeforeDone:
    """Puts one event of the gateway's own just before the stream's `data: [DONE]`, however the replica's writes
    split the terminator across reads: trailing bytes that could begin it (at most 13) are held back until the
    next read shows whether they do, then sent either way."""

    def __init__(self, extra: bytes | None) -> None:
        self.extra = extra
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        """What of `chunk` (after anything held) goes to the client now."""
        data = self.held + chunk if self.held else chunk
        self.held = b""
        if self.extra is None:
            return data
        if data.endswith(DONE_EVENT):
            data, self.extra = data[: -len(DONE_EVENT)] + self.extra + DONE_EVENT, None
            return data
        for size in range(min(len(DONE_EVENT) - 1, len(data)), 0, -1):
            if DONE_EVENT.startswith(data[-size:]):
                self.held = data[-size:]
                return data[:-size]
        return data

    def flush(self) -> bytes:
        """What is still held when the stream ends (a replica that stopped mid-terminator)."""
        held, self.held = self.held, b""
        return held


def chat_stream_error(error: GatewayError, tail: bytes) -> bytes:
    return sse_error_frame(error)


class ClientWatch:
    """Notices the client hanging up (uvicorn then drops our writes silently) and closes the upstream request,
    so vLLM aborts the generation and frees its KV cache."""

    def __init__(self, receive: Receive, response: aiohttp.ClientResponse) -> None:
        self.gone = False
        self._response = response
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._response.close()

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def relay(
    opened: OpenedUpstream,
    receive: Receive,
    send: Send,
    *,
    stream: bool,
    timeouts: Timeouts,
    started: float,
    metrics: GatewayMetrics,
    stream_error: StreamError = chat_stream_error,
    final_chunk: FinalChunk | None = None,
    on_events: Callable[[int], None] | None = None,
    on_upstream_done: Callable[[], None] | None = None,
) -> RelayOutcome:
    """Relay the opened response; `stream_error` writes the event that ends a stream the replica broke off (its
    dialect's: chat's `data: {"error"}` + `[DONE]`, or the Responses API's `event: error`). `final_chunk`, given
    the stream's first bytes, makes one event of the gateway's own to send just before `data: [DONE]`.
    `on_events` is told how many SSE events each read of a stream held (vLLM streams about one token an event):
    the scheduler charges output tokens as they stream, not only at the end. `on_upstream_done` is called once the
    replica has sent its last byte, which may be well before a slow client has read them: the replica's slot is
    free from then on."""
    if not stream and opened.response.content.is_eof():
        # The whole answer came with the first read (vLLM writes a non-streamed body at once): nothing is left
        # to wait for or abort, so no watch task and no deadline.
        if on_upstream_done is not None:
            on_upstream_done()
        try:
            return await _send_whole(opened.first_chunk, send)
        finally:
            opened.response.release()
    watch = ClientWatch(receive, opened.response)
    try:
        if stream:
            extra = final_chunk(opened.first_chunk) if final_chunk is not None else None
            return await _relay_stream(
                opened, send, timeouts, started, metrics, watch, stream_error, extra, on_events, on_upstream_done
            )
        return await _relay_whole(opened, send, timeouts, started, metrics, watch, on_upstream_done)
    finally:
        await watch.stop()
        opened.response.release()


async def relay_settled(opened: OpenedUpstream, receive: Receive, send: Send, **options: Any) -> RelayOutcome:
    """`relay`, then the lease settled with the relay's verdict (abandoned if the relay raised: the caller left)."""
    try:
        outcome = await relay(opened, receive, send, **options)
        opened.lease.settle(outcome.verdict)
        return outcome
    finally:
        opened.lease.settle(Verdict.ABANDONED)  # only if the relay raised: a lease settles once


# How late a timer may run before the loop counts as having fallen behind (see `_next_chunk`).
LOOP_LAG = 0.1


async def _next_chunk(
    content: aiohttp.StreamReader, loop: asyncio.AbstractEventLoop, idle: float, total_deadline: float
) -> bytes:
    """The next bytes the replica sent, or TimeoutError once it has been silent for `idle` seconds (or the total
    deadline passed).

    The clock is a loop timer, and a loop that fell behind (a starved or stopped process) runs due timers before
    it reads the sockets that became readable meanwhile (uvloop, like libuv, runs timers first). A timer that ran
    late therefore proves nothing about the replica: the stream gets one short window to deliver what is waiting
    in the socket, and only a replica that stays silent through a timer that ran on time is called silent.
    """
    deadline = min(loop.time() + idle, total_deadline)
    while True:
        received = content.total_bytes
        try:
            async with asyncio.timeout_at(deadline):
                with map_upstream_errors():
                    return await content.readany()
        except TimeoutError:
            now = loop.time()
            if content.total_bytes != received or content.is_eof():
                deadline = min(now + idle, total_deadline)  # they arrived in the timer's loop pass: not silent
                continue
            if now >= total_deadline or now - deadline <= LOOP_LAG:
                raise
            deadline = min(now + LOOP_LAG, total_deadline)


async def _relay_stream(
    opened: OpenedUpstream,
    send: Send,
    timeouts: Timeouts,
    started: float,
    metrics: GatewayMetrics,
    watch: ClientWatch,
    stream_error: StreamError,
    extra: bytes | None = None,
    on_events: Callable[[int], None] | None = None,
    on_upstream_done: Callable[[], None] | None = None,
) -> RelayOutcome:
    model = opened.replica.model
    outcome = RelayOutcome()
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    first = opened.first_chunk
    now = time.perf_counter()
    metrics.of(metrics.time_to_first_token, model).observe(now - started)
    span = get_current_span()
    if span.is_recording():
        span.add_event("gen_ai.first_token", {"gen_ai.server.time_to_first_token": now - started})
    itl = metrics.of(metrics.inter_token_latency, model)
    previous, last = b"", first
    final = BeforeDone(extra)
    if on_events is not None and first:
        on_events(first.count(EVENT_MARK))
    if first and (sent := final.feed(first)):
        await send({"type": "http.response.body", "body": sent, "more_body": True})
    loop = asyncio.get_running_loop()
    total_deadline = loop.time() + max(0.0, timeouts.total - (now - started))
    content = opened.response.content
    error: GatewayError | None = None
    try:
        while True:
            if on_upstream_done is not None and content.is_eof():
                on_upstream_done()  # the rest is already read from the replica, or in this process's buffer
                on_upstream_done = None
            chunk = await _next_chunk(content, loop, timeouts.idle, total_deadline)
            if not chunk:
                break
            gap_end = time.perf_counter()
            itl.observe(gap_end - now)
            now = gap_end
            previous, last = last, chunk
            if on_events is not None:
                on_events(chunk.count(EVENT_MARK))
            # Only the total deadline runs here: a client reading slowly blocks `send`, and that backpressure must
            # not read as a silent replica (it would end the stream and count a failure against the replica).
            if not (sent := final.feed(chunk)):
                continue
            async with asyncio.timeout_at(total_deadline):
                await send({"type": "http.response.body", "body": sent, "more_body": True})
    except TimeoutError:
        kind = "timeout_total" if loop.time() >= total_deadline else "timeout_idle"
        metrics.upstream_errors.labels(model, kind).inc()
        log.warning("%s: %s on %s after %.1f s", model, kind, opened.replica.base_url, time.perf_counter() - started)
        error = UpstreamTimeout("The model server stopped sending tokens.")
    except TransportError:
        if not watch.gone:
            metrics.upstream_errors.labels(model, "broken_stream").inc()
            outcome.upstream_broke = True
            error = UpstreamError("The model server failed in the middle of the stream.")
    if watch.gone:
        outcome.status = 499
        return outcome
    if error is not None:
        outcome.status = error.status
        ending = final.flush() + stream_error(error, previous + last)
        await send({"type": "http.response.body", "body": ending, "more_body": False})
        return outcome
    outcome.prompt_tokens, outcome.completion_tokens = usage_from_stream_tail(previous + last)
    await send({"type": "http.response.body", "body": final.flush(), "more_body": False})
    return outcome


async def _relay_whole(
    opened: OpenedUpstream,
    send: Send,
    timeouts: Timeouts,
    started: float,
    metrics: GatewayMetrics,
    watch: ClientWatch,
    on_upstream_done: Callable[[], None] | None = None,
) -> RelayOutcome:
    model = opened.replica.model
    outcome = RelayOutcome()
    remaining = max(0.0, timeouts.total - (time.perf_counter() - started))
    try:
        async with asyncio.timeout(remaining):
            with map_upstream_errors():
                body = opened.first_chunk + await opened.response.content.read()
    except TimeoutError:
        metrics.upstream_errors.labels(model, "timeout_total").inc()
        return await _fail(send, UpstreamTimeout(), outcome)
    except TransportError:
        if watch.gone:
            outcome.status = 499
            return outcome
        metrics.upstream_errors.labels(model, "broken_stream").inc()
        outcome.upstream_broke = True
        return await _fail(send, UpstreamError(), outcome)
    if on_upstream_done is not None:
        on_upstream_done()
    return await _send_whole(body, send, outcome)


async def _send_whole(body: bytes, send: Send, outcome: RelayOutcome | None = None) -> RelayOutcome:
    """A complete non-streamed body, its usage read on the way through."""
    outcome = outcome or RelayOutcome()
    with contextlib.suppress(orjson.JSONDecodeError):
        outcome.prompt_tokens, outcome.completion_tokens = _usage_from(orjson.loads(body))
    headers = [JSON_CONTENT_TYPE, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return outcome


async def _fail(send: Send, error: GatewayError, outcome: RelayOutcome) -> RelayOutcome:
    outcome.status = error.status
    await send_error(send, error)
    return outcome
