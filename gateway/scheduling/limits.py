"""One replica's in-flight limit, adapted to what its engine says about its own queue.

The gateway can only order work it still holds: every request it lets through joins vLLM's first-come-first-served
queue. So each replica gets a limit that keeps its engine just saturated: its batch full and at most `queue_target`
requests waiting inside it (none by default; one would replace a finished sequence without a round trip to the
gateway, at the price of a newcomer waiting behind it). The rule is TCP's congestion
window, with vLLM's `vllm:num_requests_waiting` as the loss signal, read with `vllm:num_requests_running` from the
replica's `/metrics` every probe interval while the limit matters (gateway/upstream/engine_load.py):

- slow start: while the limit is binding (the replica holds as many requests as it may, and its engine runs all
  of them but the target queue) and the engine has no waiting request, each report doubles it; a limit the engine
  does not run up to (requests still on their way, or finished and still being read out to slow clients) is no
  evidence that it could run more;
- once the engine queues more than the target, the limit is cut to what the engine ran plus the target, never
  below `BACKOFF` of itself; a cut takes effect only when the replica holds no more than its new limit, so no
  second cut is made on the same queue while it drains;
- after the first cut it grows by one per report under the same conditions: additive increase, multiplicative
  decrease.

Several gateways in front of the same replicas read the same engine queue, so they back off together and
converge without talking to each other. A replica that never reports is assumed unqueued: its limit then grows to
the operator's cap, which is a pass-through bounded by that cap.
"""

from __future__ import annotations

import math

from prometheus_client import Gauge

BACKOFF = 0.75


class AdaptiveLimit:
    __slots__ = ("_gauge", "batch", "cap", "floor", "queue_target", "slow_start", "value")

    def __init__(self, initial: int, floor: int, cap: int, gauge: Gauge | None = None, queue_target: int = 0) -> None:
        self.floor = floor
        self.cap = cap
        self.queue_target = queue_target
        self.batch: int | None = None  # the most the engine ran while others waited in it: its batch, as seen
        self.value = max(floor, min(initial, cap))
        self.slow_start = True
        self._gauge = gauge
        self._publish()

    def observe(self, waiting: float | None, holding: int, running: float | None = None) -> None:
        """One report: `waiting` and `running` in the engine (None: the replica said nothing), `holding` the
        requests this gateway had on the replica when it asked."""
        target = self.queue_target
        if waiting is not None and waiting >= 1 and running is not None and running >= 1:
            self.batch = int(running)  # full: the engine runs all it can and queues the rest
        if waiting is not None and waiting > target:
            if holding > self.value:
                return  # the last cut has not taken effect yet: this queue is the one it answered
            fits = max(holding - math.ceil(waiting) + target, math.floor(self.value * BACKOFF))
            self.value = max(self.floor, min(self.value - 1, fits))
            self.slow_start = False
        elif (
            (waiting is not None and waiting >= 1)
            or holding < self.value
            or self.value >= self.cap
            or (running is not None and running < self.value - target)
        ):
            return  # at the target, or not binding: a report at partial load says nothing about more
        else:
            self.value = min(self.cap, self.value * 2 if self.slow_start else self.value + 1)
        self._publish()

    def _publish(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.value)

    @property
    def running_share(self) -> int:
        """The slots the engine runs: the limit less the queue it is allowed, and no more than the batch it was
        seen to run when full (the limit probes one above it). What flex work counts on, less its reserve."""
        share = self.value - self.queue_target
        if self.batch is not None:
            share = min(share, self.batch)
        return max(1, share)
