"""Virtual token counters: fairness between tenants counted in tokens served, not requests.

The rule is the Virtual Token Counter of "Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024): each
tenant's counter grows by the tokens it is served, divided by its weight; the next request dispatched is the
backlogged tenant's with the smallest counter. A request is charged when it is dispatched — its prompt (text
estimate plus visual tokens) and the most it may generate (its max_tokens) — and corrected to what it was served
when it ends (gateway/scheduling/scheduler.py, Grant), the variant of VTC that charges a predicted length.

A tenant that becomes backlogged is first lifted to the smallest counter among backlogged tenants (or, with none, to
the counter of the tenant that left the backlog last), so time spent idle banks no credit to spend in a burst
later. A tenant whose backlog emptied less than `LIFT_GRACE` seconds before is not idle but between two requests
(a client sending the next one as the last one ends): it keeps its counter, or each short gap would forfeit what it
is owed (measured: 10:1 request sizes served 0.59 / 0.41 with closed-loop clients on a loaded host, the short
requests' tenant losing its credit at every gap).

Tenants come from the configured keys only (a key's namespace, else the key itself), so the map is bounded.

Several gateways in front of one pool can share the counters through Redis (gateway/scheduling/shared.py): the
scheduler still reads and moves only these local numbers, synchronously; what they moved since the last exchange is
kept here (`take`), sent, and the shared values come back (`settle`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge

LIFT_GRACE = 1.0


Moves = dict[str, float]


class TenantCounters:
    def __init__(self, served: Counter | None = None, model: str = "", virtual: Gauge | None = None) -> None:
        self.counters: dict[str, float] = {}
        self._last_left = 0.0
        self._left_at: dict[str, float] = {}
        self._served = served
        self._virtual = virtual
        self.model = model
        # Since the last exchange with the other gateways: each tenant's charges after its last lift, and the
        # floor that lift set. A lift is sent as a floor, not as the difference it made, so two gateways lifting
        # one tenant lift it once.
        self._moved: Moves = {}
        self._floors: Moves = {}

    def value(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def lift(self, tenant: str, backlogged: Iterable[str], now: float | None = None) -> None:
        """`tenant` becomes backlogged: raise it to the smallest backlogged counter (or the last one to leave),
        unless it left the backlog within the grace."""
        left_at = self._left_at.get(tenant)
        if left_at is not None and (time.monotonic() if now is None else now) - left_at < LIFT_GRACE:
            return
        floor = min((self.counters.get(other, 0.0) for other in backlogged if other != tenant), default=None)
        if floor is None:
            floor = self._last_left
        if self.counters.get(tenant, 0.0) < floor:
            self._set(tenant, floor)
            self._floors[tenant] = floor
            self._moved.pop(tenant, None)

    def left(self, tenant: str, now: float | None = None) -> None:
        """`tenant`'s backlog emptied: its counter is where a newly backlogged tenant starts when no other waits."""
        self._last_left = self.counters.get(tenant, 0.0)
        self._left_at[tenant] = time.monotonic() if now is None else now

    def charge(self, tenant: str, tokens: float, weight: float) -> None:
        """Move `tenant`'s counter by `tokens` / `weight` (negative: a reservation given back)."""
        if tokens:
            self._set(tenant, self.counters.get(tenant, 0.0) + tokens / weight)
            self._moved[tenant] = self._moved.get(tenant, 0.0) + tokens / weight

    def _set(self, tenant: str, value: float) -> None:
        self.counters[tenant] = value
        if self._virtual is not None:
            self._virtual.labels(self.model, tenant).set(value)

    def served(self, tenant: str, tokens: float) -> None:
        """Tokens a finished request of `tenant` was served (the metric, unweighted and never an estimate ahead)."""
        if self._served is not None and tokens > 0:
            self._served.labels(self.model, tenant).inc(tokens)

    def take(self) -> tuple[Moves, Moves]:
        """What the counters moved since the last exchange (charges, lift floors), to send; forgotten here."""
        moved, floors = self._moved, self._floors
        self._moved, self._floors = {}, {}
        return moved, floors

    def settle(self, shared: Moves) -> None:
        """The shared values after this gateway's last moves were applied: each counter becomes its shared value
        plus what moved here while the exchange was on its way."""
        for tenant, value in shared.items():
            self._set(tenant, max(value, self._floors.get(tenant, value)) + self._moved.get(tenant, 0.0))

    def keep(self, moved: Moves, floors: Moves) -> None:
        """An exchange failed: its moves go with the next one (a lift made since replaces them, as it did here)."""
        for tenant in moved.keys() | floors.keys():
            if tenant in self._floors:
                continue
            if tenant in floors:
                self._floors[tenant] = floors[tenant]
            self._moved[tenant] = moved.get(tenant, 0.0) + self._moved.get(tenant, 0.0)
