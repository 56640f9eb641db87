"""Per-key budgets shared by every gateway replica, kept in Redis.

Same budgets and headers as gateway/access/limits.py, but each check is one atomic Lua script on Redis, whose clock
(`TIME`) all replicas share. If Redis cannot be reached the replica falls back to its own in-process budgets
(availability over exactness: the wrapped local limiter answers) and counts
`gateway_ratelimit_backend_errors_total`; it tries Redis again on the next request.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.access.limits import KeyLimiter, budget_headers, too_many_in_flight
from gateway.config import RateLimits
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.access.limits")

# KEYS[1] the budget's bucket (hash: level, updated), KEYS[2] the key's in-flight counter.
# ARGV: capacity (-1: no budget), refill per second, amount, concurrency (-1: none), TTL seconds.
# Returns {code, remaining, wait}: code 1 granted, 0 over the budget, -1 over the concurrency.
SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local capacity, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local concurrency, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
if concurrency >= 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= concurrency then
  return {-1, '0', '0'}
end
local level = capacity
if capacity >= 0 then
  local state = redis.call('HMGET', KEYS[1], 'level', 'updated')
  if state[1] then
    level = math.min(capacity, tonumber(state[1]) + (now - tonumber(state[2])) * rate)
  end
  local granted = amount <= level
  if granted then level = level - amount end
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'updated', tostring(now))
  redis.call('EXPIRE', KEYS[1], 120)
  if not granted then return {0, tostring(level), tostring((amount - level) / rate)} end
end
if concurrency >= 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {1, tostring(level), '0'}
"""


IN_FLIGHT = "in-flight"


def _redis_key(key_id: str, kind: str) -> str:
    return f"vlm-gateway:{key_id}:{kind}"


class SharedKeyLimiter:
    """The budgets of `local` (its per-key limits, and its state when Redis is unreachable), kept in Redis."""

    def __init__(self, local: KeyLimiter, url: str, metrics: GatewayMetrics, *, in_flight_ttl: int) -> None:
        self.local = local
        # Short socket timeouts: a slow Redis must cost a request little before the local fallback answers.
        self._redis = Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        self._script = self._redis.register_script(SCRIPT)
        self._errors = metrics.ratelimit_backend_errors
        self._in_flight_ttl = in_flight_ttl
        self._local_admits: Tally[str] = Tally()  # admitted by the fallback: their `leave` is local too
        self._last_warning = 0.0

    def _fallback(self, error: RedisError) -> None:
        self._errors.inc()
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            log.warning(
                "Redis for shared rate limits unreachable (%s): this replica enforces its own", type(error).__name__
            )

    def update_keys(self, per_key: dict[str, RateLimits]) -> None:
        self.local.update_keys(per_key)

    async def _run(
        self, key_id: str, kind: str, per_minute: int | None, amount: float, concurrency: int | None
    ) -> tuple[int, float, float]:
        code, remaining, wait = await self._script(
            keys=[_redis_key(key_id, kind), _redis_key(key_id, IN_FLIGHT)],
            args=[
                per_minute if per_minute is not None else -1,
                (per_minute or 0) / 60,
                amount,
                concurrency if concurrency is not None else -1,
                self._in_flight_ttl,
            ],
        )
        return int(code), float(remaining), float(wait)

    async def admit(self, key_id: str) -> list[tuple[bytes, bytes]]:
        limits = self.local.limits(key_id)
        if limits.requests_per_minute is None and limits.concurrency is None:
            return []
        try:
            code, remaining, wait = await self._run(
                key_id, "requests", limits.requests_per_minute, 1, limits.concurrency
            )
        except RedisError as error:
            self._fallback(error)
            headers = self.local.admit_now(key_id)
            self._local_admits[key_id] += 1
            return headers
        if code < 0:
            raise too_many_in_flight(limits.concurrency or 0)
        if limits.requests_per_minute is None:
            return []
        return budget_headers("requests", limits.requests_per_minute, code == 1, remaining, wait)

    async def leave(self, key_id: str) -> None:
        if self._local_admits[key_id] > 0:
            self._local_admits[key_id] -= 1
            self.local.leave_now(key_id)
            return
        if self.local.limits(key_id).concurrency is None:
            return
        try:
            await self._redis.decr(_redis_key(key_id, IN_FLIGHT))
        except RedisError as error:
            self._fallback(error)  # the counter's TTL frees the slot later

    async def charge_tokens(self, key_id: str, tokens: int) -> list[tuple[bytes, bytes]]:
        per_minute = self.local.token_budget(key_id, tokens)
        if per_minute is None:
            return []
        try:
            code, remaining, wait = await self._run(key_id, "tokens", per_minute, tokens, None)
        except RedisError as error:
            self._fallback(error)
            return self.local.charge_tokens_now(key_id, tokens)
        return budget_headers("tokens", per_minute, code == 1, remaining, wait)

    async def close(self) -> None:
        await self._redis.aclose()
