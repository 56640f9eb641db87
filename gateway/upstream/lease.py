"""One request's hold on one replica: acquired when the replica is tried, settled once with what happened.

The bookkeeping rules (what marks a replica down, feeds its breaker, cools it or clears it) live here alone, so
failover in the client and the end of a relay cannot disagree about them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.upstream.pool import Replica, ReplicaSet


class Verdict(enum.Enum):
    SUCCEEDED = "succeeded"  # answered, including a 4xx: the replica did its job
    FAILED = "failed"  # a 5xx or a timeout: counts towards the breaker
    UNREACHABLE = "unreachable"  # refused, reset or broke mid-stream: down until a health check passes
    SATURATED = "saturated"  # 429/503: alive but busy, skipped for a while
    ABANDONED = "abandoned"  # the caller left (cancelled): a probe, if it was one, decided nothing


@dataclass(eq=False, slots=True)
class Lease:
    replicas: ReplicaSet
    replica: Replica
    settled: bool = False

    @classmethod
    def acquire(cls, replicas: ReplicaSet, replica: Replica) -> Lease:
        replicas.acquire(replica)
        return cls(replicas, replica)

    def settle(self, verdict: Verdict, *, cooldown: float = 0.0) -> None:
        """Record the verdict and release the replica; later calls do nothing (so `finally` may call it too)."""
        if self.settled:
            return
        self.settled = True
        replicas, replica = self.replicas, self.replica
        replicas.release(replica)
        if verdict is Verdict.SUCCEEDED:
            replicas.record_success(replica)
        elif verdict is Verdict.FAILED:
            replicas.record_failure(replica)
        elif verdict is Verdict.UNREACHABLE:
            replicas.mark_down(replica)
        elif verdict is Verdict.SATURATED:
            replicas.cool_down(replica, cooldown)
        else:
            replica.probing = False
