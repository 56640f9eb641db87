"""Tenant counters shared by the gateways in front of the same pools, through the Redis the per-key budgets use.

Each gateway orders only the requests waiting in it. With the counters shared, a tenant's place in that order
counts the tokens it was served through every gateway: a tenant whose traffic lands mostly on gateway B no longer
also gets an equal part of gateway A's slots while another tenant waits only at A.

The scheduler decides at every dispatch, synchronously, so it never waits on Redis: it reads and moves its local
counters (gateway/scheduling/fairness.py). One task per process exchanges them every `interval` seconds, one atomic
script per pool: it sends what each counter moved here since the last exchange (charges added, a lift applied as a
floor, so two gateways lifting one tenant lift it once) and gets every shared value back. Between exchanges a
counter is its shared value plus this gateway's own moves, so the counters of two gateways differ by at most what
each dispatched in one interval.

If Redis cannot be reached the moves are kept (one number per tenant) and sent with the next exchange that
succeeds; ordering goes on with the local counters, and `gateway_fairness_sync_errors_total` counts the failures.
An exchange that timed out may still have been applied: its moves are then counted twice, one interval's at most,
which costs a tenant a little of its share rather than letting any tenant's service go uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.scheduling.fairness import Moves, TenantCounters

log = logging.getLogger("gateway.scheduling")

INTERVAL = 0.5
TTL = 7 * 86400  # a pool no gateway has served for a week starts its counters again from zero

# KEYS[1] the pool's counters (hash: tenant -> virtual tokens). ARGV[1] the TTL, then per tenant three values:
# its name, what it moved, the floor a lift set ('' when none). Returns the whole hash.
SCRIPT = """
for i = 2, #ARGV, 3 do
  local value = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if ARGV[i + 2] ~= '' then value = math.max(value, tonumber(ARGV[i + 2])) end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g', value + tonumber(ARGV[i + 1])))
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""


def redis_key(model: str) -> str:
    return f"vlm-gateway:fair:{model}"


class SharedCounters:
    """The task that exchanges `pools`' tenant counters with Redis at `url` every `interval` seconds."""

    def __init__(
        self, url: str, pools: Iterable[TenantCounters], errors: Counter, *, interval: float = INTERVAL
    ) -> None:
        # Short socket timeouts: an exchange that hangs holds back the next one, not any request.
        self._redis = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._script = self._redis.register_script(SCRIPT)
        self._pools = list(pools)
        self._errors = errors
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._last_warning = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._exchange_forever(), name="shared-tenant-counters")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _exchange_forever(self) -> None:
        while True:
            await self.exchange()
            await asyncio.sleep(self._interval)

    async def exchange(self) -> None:
        """One exchange for every pool: its moves sent, its shared values settled."""
        for counters in self._pools:
            moved, floors = counters.take()
            try:
                shared = await self._send(counters.model, moved, floors)
            except RedisError as error:
                counters.keep(moved, floors)
                self._failed(error)
            else:
                counters.settle(shared)

    async def _send(self, model: str, moved: Moves, floors: Moves) -> Moves:
        args: list[str | float] = [TTL]
        for tenant in moved.keys() | floors.keys():
            floor = floors.get(tenant)
            args += [tenant, moved.get(tenant, 0.0), "" if floor is None else repr(floor)]
        reply = await self._script(keys=[redis_key(model)], args=args)
        return {reply[i].decode(): float(reply[i + 1]) for i in range(0, len(reply), 2)}

    def _failed(self, error: RedisError) -> None:
        self._errors.inc()
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning(
                "Redis for shared tenant counters unreachable (%s): this gateway orders by its own counts",
                type(error).__name__,
            )
