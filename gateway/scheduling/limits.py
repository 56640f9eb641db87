"""One replica's in-flight limit, adapted to what its engine says about its own queue.

The gateway can only order work it still holds: every request it lets through joins vLLM's first-come-first-served
queue. So each replica gets a limit that keeps its engine just saturated and no more. The rule is TCP's congestion
window, with vLLM's `vllm:num_requests_waiting` as the loss signal, read from the replica's `/metrics` every probe
interval while the limit matters (gateway/upstream/engine_load.py):

- slow start: while the limit is binding (the replica holds as many requests as it may, and its engine runs at
  least that many) and the engine reports no waiting request, each report doubles it; a limit the engine is not
  running up to (requests still on their way, or finished and still being read out to slow clients) is no
  evidence that it could run more;
- once the engine reports a queue, the limit is cut to what the engine was running (what this gateway held less
  what waited), never below `BACKOFF` of itself; a cut takes effect only when the replica holds no more than its
  new limit, so no second cut is made on the same queue while it drains;
- after the first cut it grows by one per report while binding and unqueued: additive increase, multiplicative
  decrease, which keeps the engine's own queue near empty and its batch full.

Several gateways in front of the same replicas read the same engine queue, so they back off together and
converge without talking to each other. A replica that never reports is assumed unqueued: its limit then grows to
the operator's cap, which is a pass-through bounded by that cap.
"""

from __future__ import annotations

import math

from prometheus_client import Gauge

BACKOFF = 0.75


class AdaptiveLimit:
    __slots__ = ("_gauge", "cap", "floor", "slow_start", "value")

    def __init__(self, initial: int, floor: int, cap: int, gauge: Gauge | None = None) -> None:
        self.floor = floor
        self.cap = cap
        self.value = max(floor, min(initial, cap))
        self.slow_start = True
        self._gauge = gauge
        self._publish()

    def observe(self, waiting: float | None, holding: int, running: float | None = None) -> None:
        """One report: `waiting` and `running` in the engine (None: the replica said nothing), `holding` the
        requests this gateway had on the replica when it asked."""
        if waiting is not None and waiting >= 1:
            if holding > self.value:
                return  # the last cut has not taken effect yet: this queue is the one it answered
            fits = max(holding - math.ceil(waiting), math.floor(self.value * BACKOFF))
            self.value = max(self.floor, min(self.value - 1, fits))
            self.slow_start = False
        elif holding < self.value or self.value >= self.cap or (running is not None and running < self.value):
            return  # not binding: a report at partial load says nothing about more
        else:
            self.value = min(self.cap, self.value * 2 if self.slow_start else self.value + 1)
        self._publish()

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.value)
