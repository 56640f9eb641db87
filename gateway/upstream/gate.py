"""A model pool's gate: bounded in-flight requests and a bounded wait queue with a time budget.

Beyond the bounds the answer is immediate (429 / 503 with Retry-After), so neither tasks nor memory grow without
limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from prometheus_client import Gauge

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.tracing import OFF, Tracing


class Gate:
    """At most `limit` holders; up to `queue` more wait at most `queue_timeout` seconds, in arrival order."""

    def __init__(self, limit: int | None, queue: int, queue_timeout: float, waiting: Gauge | None = None) -> None:
        self.limit = limit
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._waiting = waiting

    def slot(self, tracing: Tracing = OFF) -> _Slot:
        """A place among the pool's in-flight requests, waiting in its queue if need be (the wait is the
        request's admission span). A plain class, not a generator-based context manager: it is entered once per
        proxied request."""
        return _Slot(self, tracing)

    async def _acquire(self) -> None:
        assert self.limit is not None
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue:
            raise RateLimited(
                "Too many requests in flight for this model; retry shortly.", headers={"Retry-After": "1"}
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._waiting is not None:
            self._waiting.inc()
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter  # _release hands the slot over directly (active is not decremented)
        except TimeoutError:
            raise ServiceUnavailable(
                "The request waited too long for a free slot; retry shortly.", headers={"Retry-After": "2"}
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted at the last moment: pass it on
            raise
        finally:
            if self._waiting is not None:
                self._waiting.dec()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class _Slot:
    __slots__ = ("_gate", "_tracing")

    def __init__(self, gate: Gate, tracing: Tracing) -> None:
        self._gate = gate
        self._tracing = tracing

    async def __aenter__(self) -> None:
        gate = self._gate
        if gate.limit is None:
            gate.active += 1
            return
        with self._tracing.span("gateway.admission", attributes={"gateway.admission.queued": len(gate._waiters)}):
            await gate._acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate._release()
