"""Replicas of each model: health, cooldown and least-outstanding-requests routing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.admission import Gate
from gateway.config import ModelPool, Settings
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.pool")


@dataclass(eq=False)
class Replica:
    model: str
    base_url: str
    healthy: bool = True  # optimistic until the first check: a down replica costs one failed connect
    cooldown_until: float = 0.0
    outstanding: int = 0
    consecutive_failures: int = field(default=0)
    breaker_open: bool = False
    probing: bool = False  # a half-open breaker lets exactly one request through

    def available(self, now: float) -> bool:
        if not self.healthy or now < self.cooldown_until:
            return False
        return not (self.breaker_open and self.probing)


class ReplicaSet:
    """The replicas of one model pool."""

    def __init__(
        self, pool: ModelPool, metrics: GatewayMetrics, *, breaker_failures: int = 5, breaker_cooldown: float = 10.0
    ) -> None:
        self.pool = pool
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self.replicas = [Replica(pool.name, url) for url in pool.upstreams]
        self.gate = Gate(pool.max_inflight, pool.max_queue, pool.queue_timeout, metrics.pool_queued.labels(pool.name))
        self.visual_tokens = metrics.pool_visual_tokens.labels(pool.name)
        self._metrics = metrics
        self._rotation = 0
        self._healthy_gauges = {r: metrics.replica_healthy.labels(pool.name, r.base_url) for r in self.replicas}
        self._outstanding_gauges = {r: metrics.replica_outstanding.labels(pool.name, r.base_url) for r in self.replicas}
        for replica in self.replicas:
            self._healthy_gauges[replica].set(1)

    def pick(self, exclude: set[Replica]) -> Replica | None:
        """The available replica with the fewest open requests; ties rotate so idle replicas share load."""
        now = time.monotonic()
        best: Replica | None = None
        count = len(self.replicas)
        self._rotation = (self._rotation + 1) % count
        for offset in range(count):
            replica = self.replicas[(self._rotation + offset) % count]
            if replica in exclude or not replica.available(now):
                continue
            if best is None or replica.outstanding < best.outstanding:
                best = replica
        if best is not None and best.breaker_open:
            best.probing = True  # half-open: this request is the probe
        return best

    def soonest_available_in(self) -> float:
        """Seconds until some replica leaves cooldown (for Retry-After when all are cooling)."""
        now = time.monotonic()
        waits = [r.cooldown_until - now for r in self.replicas if r.healthy]
        return max(1.0, min(waits)) if waits else 5.0

    def acquire(self, replica: Replica) -> None:
        replica.outstanding += 1
        self._outstanding_gauges[replica].inc()

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        self._outstanding_gauges[replica].dec()

    def mark_down(self, replica: Replica) -> None:
        """A connect or mid-stream failure: stop routing here until a health check passes again."""
        replica.consecutive_failures += 1
        if replica.healthy:
            log.warning("replica %s of %s marked down", replica.base_url, replica.model)
        replica.healthy = False
        self._healthy_gauges[replica].set(0)

    def record_failure(self, replica: Replica) -> None:
        """A 5xx or a timeout: enough in a row open the breaker; a failed probe re-opens it."""
        replica.consecutive_failures += 1
        if replica.probing or replica.consecutive_failures >= self.breaker_failures:
            if not replica.breaker_open:
                log.warning("breaker opened for replica %s of %s", replica.base_url, replica.model)
            replica.breaker_open, replica.probing = True, False
            replica.cooldown_until = time.monotonic() + self.breaker_cooldown

    def record_success(self, replica: Replica) -> None:
        if replica.breaker_open:
            log.info("breaker closed for replica %s of %s", replica.base_url, replica.model)
        replica.consecutive_failures = 0
        replica.breaker_open = replica.probing = False

    def cool_down(self, replica: Replica, seconds: float) -> None:
        """A 429/503: the replica is alive but saturated; skip it for a while."""
        replica.cooldown_until = time.monotonic() + seconds

    def mark_up(self, replica: Replica) -> None:
        if not replica.healthy:
            log.info("replica %s of %s is healthy again", replica.base_url, replica.model)
        replica.healthy = True
        self._healthy_gauges[replica].set(1)

    def healthy_count(self) -> int:
        now = time.monotonic()
        return sum(r.available(now) for r in self.replicas)


class Pools:
    """All model pools plus the background task that health-checks their replicas."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.by_model = {
            pool.name: ReplicaSet(
                pool, metrics, breaker_failures=settings.breaker_failures, breaker_cooldown=settings.breaker_cooldown
            )
            for pool in settings.models
        }
        self._task: asyncio.Task[None] | None = None

    def get(self, model: str) -> ReplicaSet | None:
        return self.by_model.get(model)

    def start(self, session: aiohttp.ClientSession) -> None:
        if self.by_model:
            self._task = asyncio.create_task(self._check_forever(session), name="replica-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        checks = [
            self._check(session, replica_set, replica)
            for replica_set in self.by_model.values()
            for replica in replica_set.replicas
        ]
        await asyncio.gather(*checks)

    async def _check_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.check_all(session)
            await asyncio.sleep(self.settings.health_check_interval)

    async def _check(self, session: aiohttp.ClientSession, replica_set: ReplicaSet, replica: Replica) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.health_check_timeout)
        try:
            async with session.get(f"{replica.base_url}/health", timeout=timeout) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        if ok:
            replica_set.mark_up(replica)
        else:
            replica_set.mark_down(replica)
