"""Dynamic batching: many callers' items merged into one forward pass on one device thread.

One owner task per modality drains a bounded queue: it takes what is waiting (up to `max_batch`), waits at most
`max_wait` for more, skips items whose callers went away, and runs the encoder in a single-thread executor so
the event loop never blocks on torch. A full queue is an immediate 429; a worker that dies fails every waiter
and is restarted; an out-of-memory batch fails its callers with 503 and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from opentelemetry.trace import Link, SpanContext, get_current_span

from gateway.embeddings.encoder import Vectors
from gateway.errors import GatewayError, RateLimited, ServiceUnavailable
from gateway.metrics import GatewayMetrics
from gateway.tracing import OFF, Tracing

log = logging.getLogger("gateway.batcher")


@dataclass(slots=True)
class _Item:
    payload: Any
    future: asyncio.Future[Vectors]
    enqueued: float
    caller: SpanContext | None = None  # the request's span, linked from the batch's


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)


class Batcher:
    def __init__(
        self,
        modality: str,
        encode: Callable[[list[Any]], Vectors],
        device: ThreadPoolExecutor,
        metrics: GatewayMetrics,
        *,
        max_batch: int,
        max_wait: float,
        max_queue: int,
        tracing: Tracing = OFF,
    ) -> None:
        self.modality = modality
        self._tracing = tracing
        self._encode = encode
        self._device = device
        self._metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(max_queue)
        self._max_queue = max_queue
        self._in_batch: list[_Item] = []
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._queue_gauge = metrics.embedding_queue.labels(modality)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.modality}")
        self._worker.add_done_callback(self._on_worker_exit)

    async def close(self) -> None:
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._fail_all(ServiceUnavailable("The encoder is shutting down."))

    async def submit(self, payloads: Sequence[Any]) -> Vectors:
        """Rows for `payloads`, in order. All-or-nothing admission: a request never half-enters the queue."""
        if self._queue.qsize() + len(payloads) > self._max_queue:
            self._metrics.embedding_rejections.labels("queue_full").inc()
            raise RateLimited("The embedding queue is full; retry shortly.", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        caller = get_current_span().get_span_context() if self._tracing.enabled else None
        items = [_Item(p, loop.create_future(), now, caller) for p in payloads]
        for item in items:
            self._queue.put_nowait(item)
        self._queue_gauge.set(self._queue.qsize())
        try:
            rows = await asyncio.gather(*[item.future for item in items])
        except BaseException:
            for item in items:  # a caller that gave up frees its places in the next batch
                item.future.cancel()
            raise
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        self._queue_gauge.set(self._queue.qsize())
        return [item for item in batch if not item.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        metrics = self._metrics
        while True:
            live = await self._collect()
            if not live:
                continue
            self._in_batch = live
            started = time.perf_counter()
            for item in live:
                metrics.embedding_queue_seconds.labels(self.modality).observe(started - item.enqueued)
            metrics.embedding_batch_size.labels(self.modality).observe(len(live))
            try:
                vectors = await self._encode_traced(loop, live)
            except Exception as exc:
                error: GatewayError
                if _is_out_of_memory(exc):
                    log.error("encoder ran out of memory on a %s batch of %d", self.modality, len(live))
                    metrics.embedding_rejections.labels("out_of_memory").inc()
                    error = ServiceUnavailable("The encoder ran out of memory; retry with fewer inputs.")
                else:
                    log.exception("encoder failed on a %s batch", self.modality)
                    error = ServiceUnavailable("The encoder failed on this batch.")
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            finally:
                self._in_batch = []
            metrics.embedding_encode_seconds.labels(self.modality).observe(time.perf_counter() - started)
            metrics.embedding_items.labels(self.modality).inc(len(live))
            for row, item in enumerate(live):
                if not item.future.done():
                    item.future.set_result(vectors[row])

    async def _encode_traced(self, loop: asyncio.AbstractEventLoop, live: list[_Item]) -> Vectors:
        """The batch as one span (a root: it serves many requests), linked to each request's span."""
        callers = {
            (item.caller.trace_id, item.caller.span_id): item.caller
            for item in live
            if item.caller is not None and item.caller.is_valid
        }
        attributes = {"gateway.embeddings.modality": self.modality, "gateway.embeddings.batch_size": len(live)}
        links = [Link(caller) for caller in callers.values()]
        with self._tracing.span("gateway.embeddings.batch", attributes=attributes, links=links):
            return await loop.run_in_executor(self._device, self._encode, [item.payload for item in live])

    def _fail_all(self, error: GatewayError) -> None:
        pending = list(self._in_batch)
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)
        self._queue_gauge.set(0)

    def _on_worker_exit(self, task: asyncio.Task[None]) -> None:
        if self._closed or task.cancelled():
            return
        log.error(
            "embedding worker for %s died; failing its waiters and restarting", self.modality, exc_info=task.exception()
        )
        self._fail_all(ServiceUnavailable("The encoder worker restarted; retry the request."))
        self.start()
