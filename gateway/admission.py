"""Admission control: bounded in-flight work per model pool, a bounded wait queue with a time budget, shedding
under memory pressure, and refusal while draining. Beyond the bounds the answer is immediate (429 / 503 with
Retry-After), so neither tasks nor memory grow without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

from prometheus_client import Gauge

from gateway.errors import RateLimited, ServiceUnavailable

log = logging.getLogger("gateway.admission")


class Gate:
    """At most `limit` holders; up to `queue` more wait at most `queue_timeout` seconds, in arrival order."""

    def __init__(self, limit: int | None, queue: int, queue_timeout: float, waiting: Gauge | None = None) -> None:
        self.limit = limit
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._waiting = waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.limit is not None:
            await self._acquire()
        else:
            self.active += 1
        try:
            yield
        finally:
            self._release()

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


def memory_limit_bytes() -> int | None:
    """The cgroup's memory limit (Kubernetes' resources.limits.memory), if any."""
    for path in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:
            return int(value)
    return None


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Admission:
    """Process-wide state: draining, and memory pressure sampled in the background (not per request)."""

    def __init__(self, shed_at_bytes: int | None) -> None:
        self.draining = False
        self.shed_at_bytes = shed_at_bytes
        self.under_pressure = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.shed_at_bytes is not None:
            self._task = asyncio.create_task(self._watch_memory(), name="memory-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch_memory(self) -> None:
        assert self.shed_at_bytes is not None
        while True:
            pressure = resident_bytes() >= self.shed_at_bytes
            if pressure != self.under_pressure:
                log.warning("memory pressure %s", "on: shedding new work" if pressure else "off")
            self.under_pressure = pressure
            await asyncio.sleep(0.25)

    def check(self) -> None:
        if self.draining:
            raise ServiceUnavailable(
                "The gateway is shutting down; retry on another replica.",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        if self.under_pressure:
            raise ServiceUnavailable(
                "The gateway is under memory pressure; retry shortly.", headers={"Retry-After": "2"}
            )
