"""Process-wide admission: shedding under memory pressure, and refusal while draining. The per-pool gate
(bounded in-flight work and wait queue) is gateway/upstream/gate.py."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from gateway.errors import ServiceUnavailable

log = logging.getLogger("gateway.access.admission")


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


def return_freed_memory() -> None:
    """Hand freed heap back to the kernel (glibc keeps it otherwise), so resident memory really falls."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Admission:
    """Process-wide state: draining, and memory pressure sampled in the background (not per request).

    Shedding never latches: while resident memory is over the mark, `relieve` (e.g. dropping media caches) runs
    each second and freed memory is returned to the kernel; once it is under the mark again, work is admitted.
    """

    def __init__(self, shed_at_bytes: int | None, relieve: Callable[[], None] | None = None) -> None:
        self.draining = False
        self.shed_at_bytes = shed_at_bytes
        self.under_pressure = False
        self._relieve = relieve
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
        last_relief = 0.0
        while True:
            pressure = resident_bytes() >= self.shed_at_bytes
            if pressure != self.under_pressure:
                log.warning("memory pressure %s", "on: shedding new work" if pressure else "off")
            self.under_pressure = pressure
            now = time.monotonic()
            if pressure and now - last_relief >= 1.0:
                last_relief = now
                if self._relieve is not None:
                    self._relieve()
                await asyncio.to_thread(return_freed_memory)
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
