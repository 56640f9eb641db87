"""The scheduler's order and bounds (gateway/scheduling/): bands, virtual token counters, the lift rule, weights,
a client that leaves while queued, budgets, and each replica's adaptive limit.
Against real vLLM: tests/e2e/test_fair_share_vllm.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gateway.errors import PermissionDenied, RateLimited, ServiceUnavailable
from gateway.metrics import GatewayMetrics
from gateway.scheduling.bands import BANDS, Band, band_for
from gateway.scheduling.fairness import TenantCounters
from gateway.scheduling.limits import AdaptiveLimit
from gateway.scheduling.scheduler import ClientGone, QueueBounds, QueueMetrics, Scheduler, Ticket
from gateway.upstream.engine_load import RUNNING, WAITING, engine_gauge


@dataclass(eq=False)
class Member:
    limit: AdaptiveLimit
    granted: int = 0
    up: bool = True

    def available(self, now: float) -> bool:
        return self.up


def _scheduler(
    members: list[Member], *, max_requests: int = 1000, max_bytes: int = 1 << 30, budget: float = 30.0
) -> Scheduler[Member]:
    metrics = GatewayMetrics()
    queue_metrics = QueueMetrics(
        {b: metrics.queue_requests.labels("m", b.label) for b in BANDS},
        {b: metrics.queue_bytes.labels("m", b.label) for b in BANDS},
        {b: metrics.queue_wait.labels("m", b.label) for b in BANDS},
    )
    bounds = QueueBounds(max_requests, max_bytes, dict.fromkeys(BANDS, budget))
    return Scheduler(lambda: members, bounds, TenantCounters(), queue_metrics, spill_epsilon=0.25)


def _member(limit: int = 1) -> Member:
    return Member(AdaptiveLimit(limit, 1, 1024))


def _first_with_room(members: list[Member]) -> Callable[[Callable[[Member], bool]], Member | None]:
    return lambda room: next((m for m in members if room(m)), None)


def _ticket(
    members: list[Member],
    tenant: str,
    band: Band = Band.DEFAULT,
    cost: float = 1.0,
    weight: float = 1.0,
    size: int = 10,
    output: float = 0.0,
    home: Member | None = None,
) -> Ticket[Member]:
    at_home = None if home is None else (lambda: home)
    return Ticket(tenant, weight, band, cost, size, _first_with_room(members), output, at_home)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_higher_band_always_goes_first() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    holder = await scheduler.acquire(_ticket(members, "h"))
    order: list[str] = []

    async def wait(tenant: str, band: Band) -> None:
        grant = await scheduler.acquire(_ticket(members, tenant, band))
        order.append(tenant)
        grant.release()

    tasks = [
        asyncio.create_task(wait("bulk", Band.FLEX)),
        asyncio.create_task(wait("chat", Band.DEFAULT)),
        asyncio.create_task(wait("vip", Band.PRIORITY)),
        asyncio.create_task(wait("chat2", Band.DEFAULT)),
    ]
    await _settle()
    assert scheduler.queued == 4 and order == []
    holder.release()
    await asyncio.gather(*tasks)
    assert order[0] == "vip" and order[-1] == "bulk", order
    assert scheduler.queued == 0 and members[0].granted == 0


async def _serve_backlog(scheduler: Scheduler[Member], tickets: list[Ticket[Member]], slots: int) -> dict[str, float]:
    """Every ticket waits behind `slots` held slots; then each dispatched request is released at once. Returns
    the cost served per tenant over the first half of the dispatches (while both tenants are still backlogged)."""
    members = scheduler.members()
    holders = [await scheduler.acquire(_ticket(list(members), "holder")) for _ in range(slots)]
    served: list[tuple[str, float]] = []

    async def wait(ticket: Ticket[Member]) -> None:
        grant = await scheduler.acquire(ticket)
        served.append((ticket.tenant, ticket.cost))
        await _settle()
        grant.release()

    tasks = [asyncio.create_task(wait(t)) for t in tickets]
    await _settle()
    for holder in holders:
        holder.release()
    await asyncio.gather(*tasks)
    half = served[: len(served) // 2]
    totals: dict[str, float] = {}
    for tenant, cost in half:
        totals[tenant] = totals.get(tenant, 0.0) + cost
    return totals


async def test_two_backlogged_tenants_get_equal_tokens_whatever_their_request_sizes() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    big = [_ticket(members, "big", cost=100.0) for _ in range(60)]
    small = [_ticket(members, "small", cost=10.0) for _ in range(600)]
    mixed = [t for pair in zip(big, small[:60], strict=True) for t in pair] + small[60:]
    totals = await _serve_backlog(scheduler, mixed, slots=1)
    share = totals["big"] / (totals["big"] + totals["small"])
    assert 0.45 <= share <= 0.55, totals  # by request count, big would have had 10x the tokens


async def test_weights_divide_the_tokens_two_to_one() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    heavy = [_ticket(members, "gold", cost=10.0, weight=2.0) for _ in range(300)]
    light = [_ticket(members, "free", cost=10.0) for _ in range(300)]
    totals = await _serve_backlog(scheduler, [t for p in zip(heavy, light, strict=True) for t in p], slots=1)
    ratio = totals["gold"] / totals["free"]
    assert 1.8 <= ratio <= 2.2, totals


async def test_output_tokens_count_against_the_tenant_as_they_stream() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    grant = await scheduler.acquire(_ticket(members, "a", cost=5.0))
    grant.charge_output(3)
    grant.charge_output(4)
    assert scheduler.counters.value("a") == 12.0
    grant.free()  # the replica is done; the client still reads
    assert members[0].granted == 0
    grant.release(prompt_tokens=9, completion_tokens=10)  # the usage report corrects both estimates
    assert scheduler.counters.value("a") == 19.0 and members[0].granted == 0


async def test_output_is_charged_as_reserved_when_dispatched_and_corrected_when_it_ends() -> None:
    """Four slots free at once, two tenants waiting with equal counters: the tenant of long requests is charged
    the 160 tokens its first one may generate as it goes, so the other three slots go to the short requests'
    tenant. Charged only as tokens stream back, each long request would look as cheap as a short one until it had
    run, and the long requests' tenant would take half the burst."""
    members = [_member(4)]
    scheduler = _scheduler(members)
    holders = [await scheduler.acquire(_ticket(members, "x")) for _ in range(4)]
    big = [asyncio.create_task(scheduler.acquire(_ticket(members, "big", output=160))) for _ in range(4)]
    small = [asyncio.create_task(scheduler.acquire(_ticket(members, "small", output=16))) for _ in range(4)]
    await _settle()
    for holder in holders:
        holder.release()
    await _settle()
    assert [t.done() for t in big] == [True, False, False, False] and all(t.done() for t in small[:3])
    long_one = big[0].result()
    assert scheduler.counters.value("big") == 161.0
    long_one.charge_output(150)  # what streamed so far: within the reservation, nothing more is charged
    assert scheduler.counters.value("big") == 161.0
    long_one.release(prompt_tokens=5, completion_tokens=20)  # it stopped early: the unused reservation returns
    await _settle()
    assert big[1].done(), "at 25 tokens, below the short tenant's 51, the long tenant has the freed slot"
    assert scheduler.counters.value("big") == 25.0 + 161.0
    for task in small[:3]:
        task.result().release()
    for task in [*big[1:], small[3]]:
        (await task).release()


async def test_a_tenant_that_was_idle_banks_no_credit() -> None:
    """The lift rule: a tenant joining the backlog starts at the smallest backlogged counter, so having been
    idle while another tenant was served does not buy it a run of dispatches ahead of everyone."""
    members = [_member(1)]
    scheduler = _scheduler(members)
    for _ in range(50):  # `busy` alone: its counter climbs to 500
        grant = await scheduler.acquire(_ticket(members, "busy", cost=10.0))
        grant.release()
    assert scheduler.counters.value("busy") == 500.0
    holder = await scheduler.acquire(_ticket(members, "busy", cost=10.0))
    order: list[str] = []

    async def wait(ticket: Ticket[Member]) -> None:
        grant = await scheduler.acquire(ticket)
        order.append(ticket.tenant)
        await _settle()
        grant.release()

    busy = [asyncio.create_task(wait(_ticket(members, "busy", cost=10.0))) for _ in range(10)]
    await _settle()
    late = [asyncio.create_task(wait(_ticket(members, "late", cost=10.0))) for _ in range(10)]
    await _settle()
    assert scheduler.counters.value("late") >= 500.0, "lifted to the backlog's smallest counter"
    holder.release()
    await asyncio.gather(*busy, *late)
    first_ten = order[:10]
    assert 3 <= first_ten.count("late") <= 7, order  # they alternate; without the lift `late` would take all ten


async def test_a_client_that_leaves_while_queued_takes_nothing() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    holder = await scheduler.acquire(_ticket(members, "a"))
    hung_up = asyncio.Event()

    async def gone() -> None:
        await hung_up.wait()

    waiting = asyncio.create_task(scheduler.acquire(_ticket(members, "b"), gone))
    nxt = asyncio.create_task(scheduler.acquire(_ticket(members, "c")))
    await _settle()
    assert scheduler.queued == 2
    hung_up.set()
    with pytest.raises(ClientGone):
        await waiting
    assert scheduler.queued == 1 and members[0].granted == 1
    holder.release()
    grant = await nxt
    assert grant.replica is members[0] and members[0].granted == 1
    grant.release()
    assert members[0].granted == 0 and scheduler.queued == 0


async def test_bounds_refuse_at_once_and_budgets_expire() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members, max_requests=2, max_bytes=100, budget=0.2)
    holder = await scheduler.acquire(_ticket(members, "a"))
    first = asyncio.create_task(scheduler.acquire(_ticket(members, "a", size=60)))
    await _settle()
    with pytest.raises(RateLimited):
        await scheduler.acquire(_ticket(members, "b", size=60))  # over the bytes bound
    second = asyncio.create_task(scheduler.acquire(_ticket(members, "b", size=10)))
    await _settle()
    with pytest.raises(RateLimited):
        await scheduler.acquire(_ticket(members, "c", size=1))  # over the count bound
    for task in (first, second):
        with pytest.raises(ServiceUnavailable) as refused:
            await task
        assert refused.value.headers["Retry-After"] == "2"
    assert scheduler.queued == 0
    holder.release()
    assert members[0].granted == 0


async def test_no_replica_up_answers_at_once_and_a_returning_one_takes_the_queue() -> None:
    members = [_member(1)]
    scheduler = _scheduler(members)
    members[0].up = False
    grant = await scheduler.acquire(_ticket(members, "a"))
    assert grant.replica is None  # the client's failover path answers why (503)
    members[0].up = True
    holder = await scheduler.acquire(_ticket(members, "a"))
    queued = asyncio.create_task(scheduler.acquire(_ticket(members, "b")))
    await _settle()
    members.append(_member(1))  # a replica joins (discovery): dispatch runs on the change
    scheduler.dispatch()
    assert (await queued).replica is members[1]
    holder.release()


async def test_a_request_pinned_to_a_full_replica_does_not_block_others() -> None:
    members = [_member(1), _member(1)]
    scheduler = _scheduler(members)
    on_first = await scheduler.acquire(_ticket(members, "a"))
    on_second = await scheduler.acquire(_ticket(members, "a"))
    pinned = Ticket("p", 1.0, Band.DEFAULT, 1.0, 1, lambda room: members[0] if room(members[0]) else None)
    pinned_task = asyncio.create_task(scheduler.acquire(pinned))
    other = asyncio.create_task(scheduler.acquire(_ticket(members, "q")))
    await _settle()
    on_second.release()
    assert (await other).replica is members[1] and not pinned_task.done()
    on_first.release()
    assert (await pinned_task).replica is members[0]


async def test_a_freed_slot_goes_to_a_request_whose_caches_are_there_before_one_that_would_move() -> None:
    """A waiting request whose home replica (its affinity, where its caches are) has the free slot goes before
    the queue's head, whose home is full; and a request the bounded-load rule let wait for its home waits for it
    even while another replica has room, as it would in its home's own queue without the scheduler."""
    home_a, home_b = _member(1), _member(1)
    members = [home_a, home_b]
    scheduler = _scheduler(members)
    on_a = await scheduler.acquire(_ticket(members, "x", home=home_a))
    on_b = await scheduler.acquire(_ticket(members, "x", home=home_b))
    assert (on_a.replica, on_b.replica) == (home_a, home_b)
    head = asyncio.create_task(scheduler.acquire(_ticket(members, "t", home=home_a)))
    second = asyncio.create_task(scheduler.acquire(_ticket(members, "t", home=home_b)))
    third = asyncio.create_task(scheduler.acquire(_ticket(members, "t", home=home_a)))
    await _settle()
    on_b.release()
    assert (await second).replica is home_b and not head.done(), "the head waits for its own replica"
    on_a.release()
    assert (await head).replica is home_a
    (await second).release()
    await _settle()
    assert not third.done() and home_b.granted == 0, "within the bound on arrival: it waits for a"
    (await head).release()
    assert (await third).replica is home_a
    (await third).release()


async def test_a_request_over_the_load_bound_or_owed_service_moves() -> None:
    """The bounded-load rule (1.25x the mean, counting requests on each replica and waiting for it) lets five
    requests wait for a full replica of four beside another full one; the sixth is over it on arrival and takes
    the other replica's next free slot. A tenant owed service (another tenant waits with a larger counter) moves
    too."""
    home_a, home_b = _member(4), _member(4)
    members = [home_a, home_b]
    scheduler = _scheduler(members)
    held = [await scheduler.acquire(_ticket(members, "x", home=m)) for m in (home_a,) * 4 + (home_b,) * 4]
    waiting = [asyncio.create_task(scheduler.acquire(_ticket(members, "t", home=home_a))) for _ in range(6)]
    await _settle()
    held[4].release()
    assert (await waiting[5]).replica is home_b and not any(task.done() for task in waiting[:5])

    mine = asyncio.create_task(scheduler.acquire(_ticket(members, "owed", home=home_a)))
    other = asyncio.create_task(scheduler.acquire(_ticket(members, "ahead", home=home_a)))
    await _settle()
    scheduler.counters.charge("ahead", 1000.0, 1.0)
    scheduler.counters.charge("t", 1000.0, 1.0)
    held[5].release()  # b frees a slot: `owed` waits behind tenants with larger counters
    assert (await mine).replica is home_b
    for grant in [*held[:4], *held[6:], await waiting[5], await mine]:
        grant.release()
    for task in [*waiting[:5], other]:
        (await task).release()


def test_band_for_maps_tiers_and_refuses_above_the_ceiling() -> None:
    assert band_for(None, "default", "default") is Band.DEFAULT
    assert band_for("auto", "flex", "default") is Band.FLEX
    assert band_for("flex", "default", "default") is Band.FLEX
    assert band_for("priority", "default", "priority") is Band.PRIORITY
    assert band_for("standard_only", "flex", "default") is Band.DEFAULT  # Anthropic's tier name
    with pytest.raises(PermissionDenied) as refused:
        band_for("priority", "default", "default")
    assert refused.value.param == "service_tier"
    with pytest.raises(PermissionDenied):
        band_for("default", "flex", "flex")


def test_the_limit_starts_small_doubles_then_backs_off_to_what_the_engine_ran() -> None:
    limit = AdaptiveLimit(4, 1, 64)
    limit.observe(0, holding=2)
    assert limit.value == 4, "not binding: no evidence for more"
    limit.observe(0, holding=4)
    assert limit.value == 8
    limit.observe(None, holding=8)  # no report: assumed unqueued
    assert limit.value == 16
    limit.observe(3, holding=16)  # the engine ran 13 of the 16
    assert limit.value == 13 and not limit.slow_start
    limit.observe(2, holding=16)
    assert limit.value == 13, "still draining the queue the cut answered: no second cut"
    limit.observe(0, holding=13, running=9)
    assert limit.value == 13, "the engine runs fewer than the limit allows: no evidence for more"
    limit.observe(0, holding=13, running=13)
    assert limit.value == 14, "additive after the first cut"
    limit.observe(9, holding=14)
    assert limit.value == 10, "never below BACKOFF of itself in one cut (several gateways see one queue)"


def test_the_limit_lets_the_engine_keep_its_target_queue() -> None:
    limit = AdaptiveLimit(4, 1, 64, queue_target=1)
    limit.observe(0, holding=4, running=2)
    assert limit.value == 4, "the engine runs fewer than the limit less its queue"
    limit.observe(0, holding=4, running=4)
    assert limit.value == 8
    limit.observe(4, holding=8, running=4)
    assert limit.value == 6 and limit.running_share == 4, "cut to what it ran plus the target; runs its batch"
    limit.observe(2, holding=6, running=4)
    assert limit.value == 5
    limit.observe(1, holding=5, running=4)
    assert limit.value == 5, "at the target: stable"


def test_the_limit_stays_within_floor_and_cap() -> None:
    limit = AdaptiveLimit(2, 2, 5)
    for _ in range(5):
        limit.observe(0, holding=limit.value)
    assert limit.value == 5
    for _ in range(10):
        limit.observe(50, holding=limit.value)
    assert limit.value == 2


def test_engine_gauges_sum_the_engines_and_ignore_look_alikes() -> None:
    exposition = (
        b"\n# HELP vllm:num_requests_waiting Number of requests waiting.\n"
        b'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        b'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\n'
        b'vllm:num_requests_waiting_by_reason{reason="capacity"} 40.0\n'
        b"vllm:num_requests_running 4.0\n"
    )
    assert engine_gauge(exposition, WAITING) == 5.0
    assert engine_gauge(exposition, RUNNING) == 4.0
    assert engine_gauge(b"\nvllm:num_requests_running 4.0\n", WAITING) is None
    assert engine_gauge(b"\nvllm:num_requests_waiting{} NaN\n", WAITING) is None


async def test_flex_leaves_its_reserve_for_interactive_arrivals() -> None:
    members = [_member(4)]
    scheduler = _scheduler(members)
    scheduler.flex_reserve = 1
    (await scheduler.acquire(_ticket(members, "chat"))).release()  # interactive work is about
    bulk = [await scheduler.acquire(_ticket(members, "bulk", Band.FLEX)) for _ in range(3)]
    fourth = asyncio.create_task(scheduler.acquire(_ticket(members, "bulk", Band.FLEX)))
    await _settle()
    assert not fourth.done() and members[0].granted == 3
    chat = await scheduler.acquire(_ticket(members, "chat"))
    assert chat.replica is members[0], "the reserved slot takes a default request at once"
    chat.release()
    bulk[0].release()
    assert (await fourth).replica is members[0]


def test_a_tenant_between_two_requests_keeps_its_counter() -> None:
    counters = TenantCounters()
    counters.charge("small", 10, 1.0)
    counters.charge("big", 500, 1.0)
    counters.left("small", now=100.0)
    counters.lift("small", ["big"], now=100.5)
    assert counters.value("small") == 10, "back within the grace: not idle, keeps what it is owed"
    counters.left("small", now=200.0)
    counters.lift("small", ["big"], now=202.0)
    assert counters.value("small") == 500, "idle past the grace: lifted"


def test_shared_counters_send_moves_and_lift_floors_and_keep_them_when_an_exchange_fails() -> None:
    """What one gateway sends to the others (gateway/scheduling/shared.py applies it in Redis as
    max(value, floor) + moved) and how the shared values come back."""
    counters = TenantCounters()
    counters.charge("a", 30, 1.0)
    counters.charge("b", 10, 2.0)
    counters.lift("c", ["a"], now=0.0)  # lifted to a's 30: sent as a floor, not as +30
    counters.charge("c", 4, 1.0)
    assert counters.take() == ({"a": 30, "b": 5, "c": 4}, {"c": 30})
    assert counters.take() == ({}, {}), "taken once"

    counters.charge("a", 2, 1.0)  # while the exchange is on its way
    counters.settle({"a": 130.0, "b": 5.0, "c": 34.0, "d": 7.0})  # another gateway served a and d
    assert [counters.value(t) for t in "abcd"] == [132, 5, 34, 7], "shared value plus what moved meanwhile"

    moved, floors = counters.take()
    counters.charge("b", 1, 1.0)
    counters.lift("d", ["a"], now=0.0)  # a lift made after the failed exchange replaces what it carried for d
    counters.keep(moved | {"d": 3.0}, floors | {"d": 50.0})
    assert counters.take() == ({"a": 2, "b": 1}, {"d": 132}), "the failed exchange's moves go with the next"


def test_flex_counts_on_the_batch_the_engine_runs_not_the_probing_limit() -> None:
    limit = AdaptiveLimit(4, 1, 64)
    limit.observe(0, holding=4, running=4)  # 8
    limit.observe(4, holding=8, running=4)  # full at 4: cut, and the batch is seen
    limit.observe(0, holding=6, running=4)
    assert limit.batch == 4 and limit.running_share == 4 and limit.value >= 5


async def test_no_weight_lets_a_band_pass_a_higher_one() -> None:
    """CASES G4: weights share a band; a key with the largest weight still waits behind the priority band."""
    members = [_member(1)]
    scheduler = _scheduler(members)
    holder = await scheduler.acquire(_ticket(members, "h"))
    heavy = [asyncio.create_task(scheduler.acquire(_ticket(members, "heavy", weight=100.0))) for _ in range(3)]
    await _settle()
    urgent = asyncio.create_task(scheduler.acquire(_ticket(members, "urgent", Band.PRIORITY, weight=0.01)))
    await _settle()
    holder.release()
    grant = await urgent
    assert grant.replica is members[0] and not any(task.done() for task in heavy)
    grant.release()
    for task in heavy:
        (await task).release()


async def test_after_a_lull_in_interactive_work_flex_takes_the_reserve_too() -> None:
    members = [_member(4)]
    scheduler = _scheduler(members)
    scheduler.flex_reserve, scheduler.reserve_idle = 1, 30.0
    alone = [await scheduler.acquire(_ticket(members, "bulk", Band.FLEX)) for _ in range(4)]
    assert members[0].granted == 4, "no interactive request yet: a batch alone fills the replica"
    chat = asyncio.create_task(scheduler.acquire(_ticket(members, "chat")))
    await _settle()
    assert not chat.done(), "the first one after the lull waits for a bulk request to finish"
    alone[0].release()
    (await chat).release()
    more = asyncio.create_task(scheduler.acquire(_ticket(members, "bulk", Band.FLEX)))
    await _settle()
    assert not more.done() and members[0].granted == 3, "from its arrival on, the reserve holds again"

    scheduler._interactive_at -= 31.0  # the lull: 31 s without an interactive request
    scheduler.dispatch()  # what the next change (a release, an arrival) runs
    assert (await more).replica is members[0], "after reserve_idle without interactive work, flex takes it"
    (await more).release()
    for grant in alone[1:]:
        grant.release()
