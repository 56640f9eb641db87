"""Replicas of each model: health, cooldown, breakers, discovery, and the choice of one (gateway/upstream/routing.py
holds the affinity rule)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client import Gauge

from gateway.config import ModelPool, Settings
from gateway.metrics import GatewayMetrics
from gateway.scheduling.bands import BANDS, Band
from gateway.scheduling.fairness import TenantCounters
from gateway.scheduling.limits import AdaptiveLimit
from gateway.scheduling.scheduler import QueueBounds, QueueMetrics, Scheduler
from gateway.scheduling.shared import SharedCounters
from gateway.upstream.adapters import sync_adapters
from gateway.upstream.discovery import DiscoveryFailed, Resolver, discover, system_resolver
from gateway.upstream.engine_load import EngineLoadProbe
from gateway.upstream.errors import TransportError, map_upstream_errors
from gateway.upstream.routing import Outcome, load_bound, rendezvous_order

log = logging.getLogger("gateway.pool")


@dataclass(frozen=True, slots=True)
class LoadedAdapter:
    path: str  # as the replicas see it
    owner: str  # the namespace whose admin key loaded it: only it (or an operator) may change or use it


@dataclass(eq=False)
class Replica:
    model: str
    base_url: str
    # Gauges live on the replica, so a request still open on one that left the pool can settle harmlessly.
    healthy_gauge: Gauge
    outstanding_gauge: Gauge
    # The scheduler's: how many requests this replica may hold (adapted to its engine's queue), and holds.
    limit: AdaptiveLimit
    granted: int = 0
    healthy: bool = True  # optimistic until the first check: a down replica costs one failed connect
    cooldown_until: float = 0.0
    outstanding: int = 0
    consecutive_failures: int = field(default=0)
    breaker_open: bool = False
    probing: bool = False  # a half-open breaker lets exactly one request through
    # The LoRA adapters this replica's /v1/models listed at its last health check; None until it answered once.
    adapters: frozenset[str] | None = None

    @property
    def load(self) -> int:
        """Requests on this replica: leases held, or slots the scheduler granted (a grant comes before its lease,
        and several are made in one dispatch), whichever is more."""
        return max(self.outstanding, self.granted)

    def available(self, now: float) -> bool:
        if not self.healthy or now < self.cooldown_until:
            return False
        return not (self.breaker_open and self.probing)


class ReplicaSet:
    """The replicas of one model pool: the configured upstreams plus those its `discover` name resolves to."""

    def __init__(
        self, pool: ModelPool, metrics: GatewayMetrics, *, breaker_failures: int = 5, breaker_cooldown: float = 10.0
    ) -> None:
        self.pool = pool
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self.scheduler = _scheduler(self, pool, metrics)
        self.visual_tokens = metrics.pool_visual_tokens.labels(pool.name)
        self._metrics = metrics
        self._rotation = 0
        self.replicas = [self._new_replica(url) for url in pool.upstreams]
        self.discovered = False  # whether `discover` has answered once (until then the pool is not "empty")
        self.static_adapters = frozenset(adapter.name for adapter in pool.lora_modules)
        # Adapters loaded through POST /v1/adapters, re-applied to a replica that lacks one.
        self.dynamic_adapters: dict[str, LoadedAdapter] = {}

    def adapter_names(self, namespace: str | None = None) -> list[str]:
        """The adapters `namespace` may see and use: the configured ones and those its own keys loaded (None:
        every one, for an operator)."""
        loaded = (n for n, a in self.dynamic_adapters.items() if namespace is None or a.owner == namespace)
        return [*self.static_adapters, *(n for n in loaded if n not in self.static_adapters)]

    def serves(self, replica: Replica, model: str) -> bool:
        """Whether `replica` can answer for `model`: the base model always; an adapter once its /v1/models lists
        it (a configured one is assumed until the replica's first check, as health is)."""
        if model == self.pool.name:
            return True
        if replica.adapters is None:
            return model in self.static_adapters
        return model in replica.adapters

    def _new_replica(self, url: str) -> Replica:
        metrics, name, scheduling = self._metrics, self.pool.name, self.pool.scheduling
        limit = AdaptiveLimit(
            scheduling.initial_limit,
            scheduling.min_limit,
            scheduling.max_limit,
            metrics.replica_limit.labels(name, url) if scheduling.enabled else None,
            scheduling.engine_queue,
        )
        replica = Replica(
            name, url, metrics.replica_healthy.labels(name, url), metrics.replica_outstanding.labels(name, url), limit
        )
        replica.healthy_gauge.set(1)
        return replica

    def adopt_discovered(self, urls: list[str]) -> None:
        """Make the pool the configured upstreams plus `urls`; replicas that stay keep their state."""
        self.discovered = True
        current = {r.base_url: r for r in self.replicas}
        wanted = dict.fromkeys([*self.pool.upstreams, *urls])
        for url in wanted.keys() - current.keys():
            log.info("replica %s joined pool %s", url, self.pool.name)
        for url in current.keys() - wanted.keys():
            log.info("replica %s left pool %s", url, self.pool.name)
            self._metrics.replica_healthy.remove(self.pool.name, url)
            self._metrics.replica_outstanding.remove(self.pool.name, url)
            if self.pool.scheduling.enabled:
                self._metrics.replica_limit.remove(self.pool.name, url)
        self.replicas = [current.get(url) or self._new_replica(url) for url in wanted]
        self.scheduler.dispatch()  # a replica that joined has room

    @property
    def scaled_to_zero(self) -> bool:
        """A discovered pool whose name resolves to no address: waiting for a replica, not broken."""
        return self.discovered and not self.replicas

    def pick(
        self, exclude: set[Replica], key: bytes | None = None, room: Callable[[Replica], bool] | None = None
    ) -> tuple[Replica | None, Outcome | None]:
        """The replica for this attempt among those `room` admits (the scheduler's: below their limits), and
        (with an affinity key) how the choice relates to the key's own. Choosing changes nothing: the caller
        that uses the choice marks a half-open breaker's probe (`begin`)."""
        now = time.monotonic()
        if key is not None and self.pool.routing == "affinity" and self.replicas:
            return self._pick_affine(key, exclude, now, room)
        return self._least_outstanding(exclude, now, room), None

    def home(self, key: bytes | None, exclude: set[Replica]) -> Replica | None:
        """Where a conversation's caches are: the first replica of the key's affinity order that is up and not
        excluded (None without an affinity key)."""
        if key is None or self.pool.routing != "affinity":
            return None
        now = time.monotonic()
        return next((r for r in rendezvous_order(key, self.replicas) if r not in exclude and r.available(now)), None)

    def outcome_of(self, key: bytes, chosen: Replica) -> Outcome | None:
        """How a replica chosen elsewhere (by the scheduler, through `pick`) relates to the key's own."""
        if self.pool.routing != "affinity" or not self.replicas:
            return None
        own = rendezvous_order(key, self.replicas)[0]
        if chosen is own:
            return Outcome.AFFINE
        return Outcome.MOVED if not own.available(time.monotonic()) else Outcome.SPILLED

    @staticmethod
    def begin(replica: Replica) -> None:
        """A request goes to `replica` now: behind an open breaker it is the one probe (half-open)."""
        if replica.breaker_open:
            replica.probing = True

    def _least_outstanding(
        self, exclude: set[Replica], now: float, room: Callable[[Replica], bool] | None
    ) -> Replica | None:
        """The available replica with the fewest open requests; ties rotate so idle replicas share load."""
        best: Replica | None = None
        count = len(self.replicas)
        if not count:
            return None
        self._rotation = (self._rotation + 1) % count
        for offset in range(count):
            replica = self.replicas[(self._rotation + offset) % count]
            if replica in exclude or not replica.available(now) or (room is not None and not room(replica)):
                continue
            if best is None or replica.load < best.load:
                best = replica
        return best

    def _pick_affine(
        self, key: bytes, exclude: set[Replica], now: float, room: Callable[[Replica], bool] | None
    ) -> tuple[Replica | None, Outcome]:
        order = rendezvous_order(key, self.replicas)  # every member: a down one keeps its keys' places
        usable = [r for r in order if r not in exclude and r.available(now) and (room is None or room(r))]
        bound = load_bound([r.load for r in order if r.available(now)], self.pool.affinity_epsilon)
        chosen = next((r for r in usable if r.load + 1 <= bound), None)
        if chosen is None and usable:  # all over the bound (a burst): the least loaded, in the key's order
            chosen = min(usable, key=lambda r: r.load)
        own = order[0]
        if chosen is own:
            return chosen, Outcome.AFFINE
        return chosen, Outcome.MOVED if own in exclude or not own.available(now) else Outcome.SPILLED

    def soonest_available_in(self) -> float:
        """Seconds until some replica leaves cooldown (for Retry-After when all are cooling)."""
        now = time.monotonic()
        waits = [r.cooldown_until - now for r in self.replicas if r.healthy]
        return max(1.0, min(waits)) if waits else 5.0

    def acquire(self, replica: Replica) -> None:
        replica.outstanding += 1
        replica.outstanding_gauge.inc()

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        replica.outstanding_gauge.dec()

    def mark_down(self, replica: Replica) -> None:
        """A connect or mid-stream failure: stop routing here until a health check passes again."""
        replica.consecutive_failures += 1
        if replica.healthy:
            log.warning("replica %s of %s marked down", replica.base_url, replica.model)
        replica.healthy = False
        replica.healthy_gauge.set(0)

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
            self.scheduler.dispatch()  # its slots are open again to the work that waits
        replica.healthy_gauge.set(1)

    def healthy_count(self, among: list[Replica] | None = None) -> int:
        now = time.monotonic()
        return sum(r.available(now) for r in (self.replicas if among is None else among))


class Pools:
    """All model pools plus the background task that health-checks their replicas."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics, resolver: Resolver = system_resolver) -> None:
        self.settings = settings
        self.metrics = metrics
        self.resolver = resolver
        self.by_model = {
            pool.name: ReplicaSet(
                pool, metrics, breaker_failures=settings.breaker_failures, breaker_cooldown=settings.breaker_cooldown
            )
            for pool in settings.models
        }
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._load_probe: EngineLoadProbe | None = None
        self._shared: SharedCounters | None = None

    def get(self, model: str, namespace: str | None = None) -> ReplicaSet | None:
        """The pool serving `model`: a base model's own, or the one whose replicas serve that adapter — for an
        adapter loaded at runtime, only to its owner's namespace (None: any namespace's)."""
        found = self.by_model.get(model)
        if found is not None:
            return found
        for replica_set in self.by_model.values():
            if model in replica_set.static_adapters:
                return replica_set
            loaded = replica_set.dynamic_adapters.get(model)
            if loaded is not None and (namespace is None or loaded.owner == namespace):
                return replica_set
        return None

    async def start(self) -> None:
        """Discover once before the first request (a discovered pool starts with its replicas), then keep
        health-checking and re-discovering in the background.

        Health checks have their own small connection pool: with the request pool's connections all held by
        long streams, a check must not queue behind them, time out and mark a healthy replica down."""
        await self.discover_all()
        if self.by_model:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32, keepalive_timeout=30))
            self._task = asyncio.create_task(self._check_forever(self._session), name="replica-health")
            interval = min(rs.pool.scheduling.probe_interval for rs in self.by_model.values())
            self._load_probe = EngineLoadProbe(self.by_model.values, interval, self.settings.health_check_timeout)
            self._load_probe.start(self._session)
        shared = [rs.scheduler.counters for rs in self.by_model.values() if _shares_counters(rs.pool)]
        url = self.settings.rate_limits_redis_url
        if url and shared:
            self._shared = SharedCounters(url, shared, self.metrics.fairness_sync_errors)
            self._shared.start()

    async def stop(self) -> None:
        if self._shared is not None:
            await self._shared.stop()
        if self._load_probe is not None:
            await self._load_probe.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

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
            for replica_set in self.by_model.values():
                replica_set.scheduler.dispatch()  # cooldowns and breakers that ran out free slots without an event
            await asyncio.sleep(self.settings.health_check_interval)
            await self.discover_all()

    async def discover_all(self) -> None:
        """Re-resolve every pool's `discover` name; a DNS outage keeps the replicas last seen."""
        discovering = [rs for rs in self.by_model.values() if rs.pool.discover is not None]
        results = await asyncio.gather(*(self._resolve(rs) for rs in discovering))
        for replica_set, urls in zip(discovering, results, strict=True):
            if urls is not None:
                replica_set.adopt_discovered(urls)

    async def _resolve(self, replica_set: ReplicaSet) -> list[str] | None:
        assert replica_set.pool.discover is not None
        try:
            async with asyncio.timeout(self.settings.health_check_timeout):
                return await discover(replica_set.pool.discover, self.resolver)
        except (DiscoveryFailed, TimeoutError) as exc:
            self.metrics.discovery_errors.labels(replica_set.pool.name).inc()
            log.warning(
                "discovery for %s failed (%s); keeping its %d replicas",
                replica_set.pool.name,
                exc or "timeout",
                len(replica_set.replicas),
            )
            return None

    async def _check(self, session: aiohttp.ClientSession, replica_set: ReplicaSet, replica: Replica) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.health_check_timeout)
        try:
            with map_upstream_errors():
                async with session.get(f"{replica.base_url}/health", timeout=timeout) as response:
                    ok = response.status == 200
        except (TransportError, TimeoutError):
            ok = False
        if ok:
            replica_set.mark_up(replica)
            if replica_set.static_adapters or replica_set.dynamic_adapters:
                await sync_adapters(session, replica_set, replica, timeout)
        else:
            replica_set.mark_down(replica)


def _scheduler(replica_set: ReplicaSet, pool: ModelPool, metrics: GatewayMetrics) -> Scheduler[Replica]:
    name, scheduling = pool.name, pool.scheduling
    budgets = {band: pool.queue_timeout for band in BANDS}
    budgets[Band.FLEX] = scheduling.flex_queue_timeout
    bounds = QueueBounds(pool.max_queue, scheduling.max_queue_bytes, budgets, pool.max_inflight)
    queue_metrics = QueueMetrics(
        {band: metrics.queue_requests.labels(name, band.label) for band in BANDS},
        {band: metrics.queue_bytes.labels(name, band.label) for band in BANDS},
        {band: metrics.queue_wait.labels(name, band.label) for band in BANDS},
        metrics.pool_queued.labels(name),
    )
    counters = TenantCounters(metrics.tenant_tokens, name, metrics.tenant_virtual_tokens)
    return Scheduler(
        lambda: replica_set.replicas,
        bounds,
        counters,
        queue_metrics,
        enabled=scheduling.enabled,
        flex_reserve=scheduling.flex_reserve,
        reserve_idle=scheduling.flex_reserve_idle,
        spill_epsilon=pool.affinity_epsilon,
    )


def _shares_counters(pool: ModelPool) -> bool:
    return pool.scheduling.enabled and pool.scheduling.share_counters
