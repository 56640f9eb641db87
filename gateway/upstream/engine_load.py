"""Reads each replica's engine queue and batch (`vllm:num_requests_waiting` and `vllm:num_requests_running` on its
`/metrics`) while its in-flight limit matters, and hands them to the pool's scheduler, which adapts the limit
(gateway/scheduling/limits.py).

Polled rather than read from vLLM's per-response `endpoint-load-metrics` header: vLLM 0.32 sends that header on
non-streamed answers only, and a stream is what a saturated pool mostly holds. A replica is asked only while its
limit is binding or requests wait at the gateway, so an idle pool costs its engines nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import aiohttp

from gateway.upstream.errors import TransportError, map_upstream_errors, read_bounded

if TYPE_CHECKING:
    from gateway.upstream.pool import Replica, ReplicaSet

log = logging.getLogger("gateway.engine_load")

WAITING = b"vllm:num_requests_waiting"
RUNNING = b"vllm:num_requests_running"
MAX_EXPOSITION_BYTES = 4 * 1024 * 1024


def engine_gauge(exposition: bytes, name: bytes) -> float | None:
    """The sum of gauge `name` over the exposition's series (one per engine), or None if absent. A scan for the
    one metric, not a parse of the whole text: the exposition is ~50 KB and read twice a second."""
    total, found, at = 0.0, False, 0
    start = b"\n" + name
    while (at := exposition.find(start, at)) >= 0:
        at += len(start)
        end = exposition.find(b"\n", at)
        line = exposition[at : end if end >= 0 else len(exposition)]
        at = end if end >= 0 else len(exposition)
        if line[:1] not in (b"{", b" "):
            continue  # another metric with this prefix (`..._by_reason`)
        try:
            value = float(line.rsplit(b" ", 1)[-1])
        except ValueError:
            continue
        if math.isfinite(value) and value >= 0:
            total, found = total + value, True
    return total if found else None


class EngineLoadProbe:
    """One task: every `interval` seconds, the replicas whose limits matter are asked for their queues at once."""

    def __init__(self, pools: Callable[[], Iterable[ReplicaSet]], interval: float, timeout: float) -> None:
        self._pools = pools
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.create_task(self._run(session), name="engine-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self._interval)
            asked = [
                self._report(session, replica_set, replica)
                for replica_set in self._pools()
                if replica_set.scheduler.enabled
                for replica in replica_set.replicas
                if replica.healthy and replica_set.scheduler.wants_report(replica)
            ]
            if asked:
                await asyncio.gather(*asked)

    async def _report(self, session: aiohttp.ClientSession, replica_set: ReplicaSet, replica: Replica) -> None:
        try:
            with map_upstream_errors():
                async with session.get(f"{replica.base_url}/metrics", timeout=self._timeout) as response:
                    if response.status != 200:  # no exposition (not vLLM): no report, so the limit may grow
                        replica_set.scheduler.observe(replica, None, None)
                        return
                    body = await read_bounded(response, MAX_EXPOSITION_BYTES)
        except (TransportError, TimeoutError):
            return  # the health check decides about a replica that does not answer
        if body is None:
            return  # an outsized answer says nothing about the engine's queue
        body = b"\n" + body
        replica_set.scheduler.observe(replica, engine_gauge(body, WAITING), engine_gauge(body, RUNNING))
