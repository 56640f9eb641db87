"""One model pool's scheduler: which waiting request goes next, and to which replica.

Each replica may hold as many requests as its adaptive limit allows (gateway/scheduling/limits.py); work beyond
that waits here, where it can still be ordered, instead of in vLLM's first-come-first-served queue. Dispatch is
by band first (strict: `flex` runs only while no `priority` or `default` request waits), then, inside the band, the
backlogged tenant with the smallest virtual token counter (gateway/scheduling/fairness.py). The chosen request
goes to the replica its `place` callback names among those with room — the pool's affinity order, so a
conversation still lands where its cache is when that replica has room.

Flex work never takes a replica's last `flex_reserve` slots while interactive work is about: requests are not
preempted once on a replica, so without that reserve an interactive request arriving during a bulk job would wait
for a bulk one to finish. After `reserve_idle` seconds without an interactive request the reserve goes to flex too
(a batch alone gets the whole pool); the first interactive request after such a lull may wait for one bulk request
to finish, and from its arrival on the reserve holds again.

Dispatch runs synchronously whenever something changes (a request arrives, a slot is released, a limit grows, a
replica comes back), so no task owns the queue and no wake-up is lost. The queue is bounded in requests and in the
bytes its requests hold; a request that waits past its band's budget gets 503 with Retry-After, and one whose
client hangs up while waiting leaves without anything reaching a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from prometheus_client import Gauge, Histogram

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.scheduling.bands import BANDS, Band
from gateway.scheduling.fairness import TenantCounters
from gateway.scheduling.limits import AdaptiveLimit
from gateway.tracing import OFF, Tracing

# Of a backlogged tenant's queue, how many requests dispatch looks at to find one that fits a free replica (the
# rest are behind a pinned or adapter-bound head): a bound on the work one dispatch does.
LOOKAHEAD = 8


class Member(Protocol):
    limit: AdaptiveLimit
    granted: int

    def available(self, now: float) -> bool: ...


R = TypeVar("R", bound=Member)
Place = Callable[[Callable[[R], bool]], R | None]


class ClientGone(Exception):
    """The client hung up while its request waited; nothing was sent anywhere."""


@dataclass(eq=False, slots=True)
class Ticket(Generic[R]):
    """A request asking for a slot: who it is charged to, in which band, what it costs and holds, where it fits."""

    tenant: str
    weight: float
    band: Band
    cost: float  # prompt tokens, charged when dispatched
    size: int  # bytes it holds while it waits
    place: Place[R]  # the replica it would go to among those `room` admits, or None
    output: float = 0.0  # output tokens it may generate (its max_tokens), charged when dispatched; see Grant
    home: Callable[[], R | None] | None = None  # the replica its caches are on (affinity), if it has one
    waits_for: R | None = field(default=None, repr=False)  # the home it waits for (within the load bound)
    granted: asyncio.Future[R | None] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class QueueMetrics:
    """The pool's children of the queue metrics, one per band (gateway/metrics.py)."""

    requests: dict[Band, Gauge]
    bytes: dict[Band, Gauge]
    wait: dict[Band, Histogram]
    total: Gauge | None = None  # all bands: the pool's autoscaling signal


@dataclass(frozen=True, slots=True)
class QueueBounds:
    max_requests: int
    max_bytes: int
    budgets: dict[Band, float]  # seconds a request of each band may wait
    max_total: int | None = None  # the operator's cap on the pool's requests in flight


class Grant(Generic[R]):
    """A request's slot on `replica` (None: no replica was up at all, so the caller's open says why), released
    once.

    Its output is charged to the tenant when it is dispatched, as the most it may generate (`Ticket.output`), and
    corrected to what it did generate when it ends. Charged only as tokens streamed back, a long request would look
    cheap for as long as it runs: measured on one replica, a tenant of 160-token requests took every slot that came
    free in a burst while its counter still showed only their prompts (10:1 sizes served 0.60 / 0.40). Tokens
    that stream back beyond the reservation are charged as they come."""

    __slots__ = ("_charged", "_released", "_scheduler", "_streamed", "_ticket", "replica")

    def __init__(self, scheduler: Scheduler[R] | None, ticket: Ticket[R], replica: R | None) -> None:
        self.replica = replica
        self._scheduler = scheduler
        self._ticket = ticket
        self._charged = ticket.output if scheduler is not None and replica is not None else 0.0
        self._streamed = 0
        self._released = False

    def charge_output(self, tokens: int) -> None:
        """Output tokens counted from the stream's events, charged once they pass what dispatch reserved."""
        if self._scheduler is None or not tokens:
            return
        self._streamed += tokens
        if self._streamed > self._charged:
            self._scheduler.counters.charge(self._ticket.tenant, self._streamed - self._charged, self._ticket.weight)
            self._charged = self._streamed

    def free(self) -> None:
        """Give the replica's slot back (once): the replica has finished, though the client may still be reading."""
        if self._released:
            return
        self._released = True
        if self._scheduler is not None and self.replica is not None:
            self._scheduler.returned(self.replica)

    def release(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """The request is over: the replica's usage report, when it sent one, corrects the prompt's estimate (the
        chat template's tokens are not in it) and the output (else the stream's event count stands for it); what
        was reserved and not generated is given back. The slot is given back if it was not yet."""
        scheduler, ticket = self._scheduler, self._ticket
        if scheduler is not None and self.replica is not None:
            prompt = prompt_tokens or ticket.cost
            output = completion_tokens or self._streamed
            counters = scheduler.counters
            counters.charge(ticket.tenant, prompt - ticket.cost + output - self._charged, ticket.weight)
            counters.served(ticket.tenant, prompt + output)
            self._charged = output
        self.free()


class Scheduler(Generic[R]):
    def __init__(
        self,
        members: Callable[[], Sequence[R]],
        bounds: QueueBounds,
        counters: TenantCounters,
        metrics: QueueMetrics,
        *,
        enabled: bool = True,
        flex_reserve: int = 0,
        reserve_idle: float = math.inf,
        spill_epsilon: float = 0.25,
    ) -> None:
        self.members = members
        self.spill_epsilon = spill_epsilon
        self.flex_reserve = flex_reserve
        self.reserve_idle = reserve_idle
        self._interactive_at = -math.inf  # when an interactive request last arrived
        self.bounds = bounds
        self.counters = counters
        self.metrics = metrics
        self.enabled = enabled
        self.in_flight = 0
        self._queues: dict[Band, dict[str, deque[Ticket[R]]]] = {band: {} for band in BANDS}
        self._queued = dict.fromkeys(BANDS, 0)
        self._bytes = dict.fromkeys(BANDS, 0)
        self._backlog: dict[str, int] = {}  # tenant -> requests waiting, all bands
        self._homed: dict[R, int] = {}  # replica -> requests waiting for it as their home

    @property
    def queued(self) -> int:
        return sum(self._queued.values())

    def room(self, member: R) -> bool:
        return member.granted < member.limit.value and member.available(time.monotonic())

    def flex_room(self, member: R) -> bool:
        """Flex work leaves `flex_reserve` of the slots the engine runs free (and no request waiting in it; a
        limit of one stays usable): a request of a higher band that arrives then starts at once instead of waiting
        for a flex request to finish."""
        now = time.monotonic()
        reserve = self.flex_reserve if now - self._interactive_at < self.reserve_idle else 0
        running = member.limit.running_share
        return member.granted < max(1, running - reserve) and member.available(now)

    def _room_for(self, band: Band) -> Callable[[R], bool]:
        return self.flex_room if band is Band.FLEX else self.room

    async def acquire(
        self, ticket: Ticket[R], client_gone: Callable[[], Awaitable[object]] | None = None, tracing: Tracing = OFF
    ) -> Grant[R]:
        """A slot for `ticket`, at once if nothing of its band or above waits and a replica has room, else in its
        turn. Raises RateLimited (queue full), ServiceUnavailable (waited past the budget) or ClientGone."""
        if not self.enabled:
            return Grant(None, ticket, None)
        self._arrive(ticket)
        if not self._waiting_from(ticket.band) and self._below_total():
            placed = self._placed((ticket,), self._room_for(ticket.band), owed=False, arriving=True)
            if placed is not None:
                return self._grant(ticket, placed[1])
            if ticket.place(_any) is None:
                return Grant(self, ticket, None)  # nothing is up at all: waiting would not help
        with tracing.span("gateway.queue", attributes={"gateway.queue.band": ticket.band.label}):
            return await self._wait(ticket, client_gone)

    def returned(self, member: R) -> None:
        member.granted -= 1
        self.in_flight -= 1
        self.dispatch()

    def observe(self, member: R, waiting: float | None, running: float | None = None) -> None:
        """The engine's queue and batch as a replica reported them: adapt its limit, and dispatch if it grew."""
        before = member.limit.value
        member.limit.observe(waiting, member.granted, running)
        if member.limit.value > before:
            self.dispatch()

    def wants_report(self, member: R) -> bool:
        """Whether the replica's engine queue matters now: its limit is binding, or work waits here."""
        return member.granted >= member.limit.value or self.queued > 0

    def dispatch(self) -> None:
        """Grant waiting requests, in order, while replicas have room."""
        while self.queued and self._below_total():
            chosen = self._next()
            if chosen is None:
                return
            ticket, replica = chosen
            self._leave(ticket)
            assert ticket.granted is not None
            if replica is None:
                ticket.granted.set_result(None)
            else:
                self._take(ticket, replica)
                ticket.granted.set_result(replica)

    # -- the order -------------------------------------------------------------------------------------------

    def _next(self) -> tuple[Ticket[R], R | None] | None:
        members = self.members()
        now = time.monotonic()
        if not any(m.available(now) for m in members):
            # Nothing is up: waiting requests go on at once, to be answered 503 by the client's failover path.
            return self._first_waiting()
        if not any(m.granted < m.limit.value and m.available(now) for m in members):
            return None
        for band in BANDS:
            tenants = self._queues[band]
            if not tenants:
                continue
            room = self._room_for(band)
            for rank, tenant in enumerate(sorted(tenants, key=self.counters.value)):
                owed = rank == 0 and len(tenants) > 1  # behind another backlogged tenant's service
                placed = self._placed(itertools.islice(tenants[tenant], LOOKAHEAD), room, owed=owed)
                if placed is not None:
                    return placed
            return None  # strict bands: nothing lower runs while this band waits
        return None

    def _placed(
        self, waiting: Iterable[Ticket[R]], room: Callable[[R], bool], *, owed: bool, arriving: bool = False
    ) -> tuple[Ticket[R], R] | None:
        """Which of one tenant's waiting requests goes now, and where. The first whose home replica (where its
        caches are) has room goes there. Otherwise one moves to a replica with room — the pool's routing picks it
        — if its tenant is owed service (another tenant waits in the band, with a larger counter: fairness
        first), or it does not wait for its home: the home was over the bounded-load rule when it arrived.

        That rule is routing's without the scheduler (`spill_epsilon` over the mean, counting the requests on
        each replica and those waiting for it), decided once on arrival as routing decides once: a request it
        admits waits for its home as it would in that replica's own queue. Measured (bench_affinity.py, replicas
        of two slots, prefix-cache hit rate against routing without the scheduler): moving the queue's head
        wherever a slot came free, -0.03 to -0.04; judging the bound again at every freed slot, when the replica
        that freed it looked idle, as much; deciding on arrival, +0.016 (even traffic) and -0.019 (skewed)."""
        moved: tuple[Ticket[R], R] | None = None
        for ticket in waiting:
            home = ticket.home() if ticket.home is not None else None
            if home is not None and room(home):
                return ticket, home
            if moved is not None:
                continue
            waits = home is not None and (self._admits(home) if arriving else ticket.waits_for is home)
            if owed or not waits:
                replica = ticket.place(room)
                if replica is not None:
                    if home is None:
                        return ticket, replica  # no caches to keep: first come, first placed
                    moved = (ticket, replica)
        return moved

    def _admits(self, home: R) -> bool:
        """Whether `home` may take one more request under the bounded-load rule."""
        now = time.monotonic()
        demand = {m: m.granted + self._homed.get(m, 0) for m in self.members() if m.available(now)}
        if home not in demand:
            return False
        bound = math.ceil((1 + self.spill_epsilon) * (sum(demand.values()) + 1) / len(demand))
        return demand[home] + 1 <= max(1, bound)

    def _first_waiting(self) -> tuple[Ticket[R], None] | None:
        for band in BANDS:
            for waiting in self._queues[band].values():
                return waiting[0], None
        return None

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def _arrive(self, ticket: Ticket[R]) -> None:
        if ticket.band is not Band.FLEX:
            self._interactive_at = time.monotonic()
        if not self._backlog.get(ticket.tenant):
            self.counters.lift(ticket.tenant, self._backlog)

    def _waiting_from(self, band: Band) -> bool:
        return any(self._queued[b] for b in BANDS if b <= band)

    def _below_total(self) -> bool:
        return self.bounds.max_total is None or self.in_flight < self.bounds.max_total

    def _take(self, ticket: Ticket[R], replica: R) -> None:
        replica.granted += 1
        self.in_flight += 1
        self.counters.charge(ticket.tenant, ticket.cost + ticket.output, ticket.weight)

    def _grant(self, ticket: Ticket[R], replica: R) -> Grant[R]:
        self._take(ticket, replica)
        return Grant(self, ticket, replica)

    async def _wait(self, ticket: Ticket[R], client_gone: Callable[[], Awaitable[object]] | None) -> Grant[R]:
        bounds = self.bounds
        if self.queued >= bounds.max_requests or sum(self._bytes.values()) + ticket.size > bounds.max_bytes:
            raise RateLimited("Too many requests waiting for this model; retry shortly.", headers={"Retry-After": "1"})
        granted: asyncio.Future[R | None] = asyncio.get_running_loop().create_future()
        ticket.granted = granted
        self._enqueue(ticket)
        started = time.perf_counter()
        watcher = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        grant: Grant[R] | None = None
        try:
            self.dispatch()  # the new request may be the one to go (a replica had room, but others waited)
            waits: set[asyncio.Future[object]] = {granted}  # type: ignore[arg-type]
            if watcher is not None:
                waits.add(watcher)
            await asyncio.wait(waits, timeout=bounds.budgets[ticket.band], return_when=asyncio.FIRST_COMPLETED)
            if watcher is not None and watcher.done():
                raise ClientGone()
            if not granted.done():
                raise ServiceUnavailable(
                    "The request waited too long for a free slot; retry shortly.", headers={"Retry-After": "2"}
                )
            grant = Grant(self, ticket, granted.result())
            return grant
        finally:
            if not granted.done():
                self._leave(ticket)
                granted.cancel()
            elif grant is None:
                self._give_back(granted.result())  # granted as it hung up or was cancelled: hand the slot on
            if watcher is not None and not watcher.done():
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self.metrics.wait[ticket.band].observe(time.perf_counter() - started)

    def _give_back(self, replica: R | None) -> None:
        if replica is not None:
            self.returned(replica)

    def _enqueue(self, ticket: Ticket[R]) -> None:
        if ticket.home is not None and (home := ticket.home()) is not None and self._admits(home):
            ticket.waits_for = home
            self._homed[home] = self._homed.get(home, 0) + 1
        band = ticket.band
        self._queues[band].setdefault(ticket.tenant, deque()).append(ticket)
        self._backlog[ticket.tenant] = self._backlog.get(ticket.tenant, 0) + 1
        self._count(band, 1, ticket.size)

    def _leave(self, ticket: Ticket[R]) -> None:
        if (home := ticket.waits_for) is not None:
            ticket.waits_for = None
            if self._homed[home] > 1:
                self._homed[home] -= 1
            else:
                del self._homed[home]
        band, tenant = ticket.band, ticket.tenant
        waiting = self._queues[band][tenant]
        waiting.remove(ticket)
        if not waiting:
            del self._queues[band][tenant]
        left = self._backlog[tenant] - 1
        if left:
            self._backlog[tenant] = left
        else:
            del self._backlog[tenant]
            self.counters.left(tenant)
        self._count(band, -1, -ticket.size)

    def _count(self, band: Band, requests: int, size: int) -> None:
        self._queued[band] += requests
        self._bytes[band] += size
        metrics = self.metrics
        metrics.requests[band].set(self._queued[band])
        metrics.bytes[band].set(self._bytes[band])
        if metrics.total is not None:
            metrics.total.set(self.queued)


def _any(_: object) -> bool:
    return True
