"""The one pooled HTTP client to vLLM replicas, and failover up to the first byte.

aiohttp rather than httpx on this path: on this machine a FastAPI gateway relaying through httpx's AsyncClient
managed ~440 req/s on one core against ~4,100 through aiohttp (see README, "Why these libraries").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
from opentelemetry.trace import SpanKind

from gateway.config import Settings, Timeouts
from gateway.errors import (
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
)
from gateway.metrics import GatewayMetrics
from gateway.tracing import OFF, Tracing, failed
from gateway.upstream.errors import TransportError, TransportTimeout, map_upstream_errors, read_bounded
from gateway.upstream.lease import Lease, Verdict
from gateway.upstream.pool import Replica, ReplicaSet

log = logging.getLogger("gateway.upstream")

MAX_UPSTREAM_MESSAGE = 2048
# An upstream message passes on only if it reads as a plain sentence: nothing that looks like a traceback, a
# Python repr, a memory address, a file path, or a network address of the replica or anything behind it.
INTERNAL_DETAIL = re.compile(
    r"Traceback|File \"|\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}|<[A-Za-z_][\w.]* object|\w+Error\(|\w+Exception\("
    r"|(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]*|[A-Za-z]:\\|\.py\b|https?://|\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F:]+\]"
    r"|\blocalhost\b"
)
RETRYABLE_STATUSES = (429, 503)


def create_session(settings: Settings) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections,
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    # Timeouts are per request (each pool has its own); the session-level one is off.
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


@functools.lru_cache(maxsize=32)
def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """aiohttp's per-request timeout (connect only; the rest are asyncio deadlines here), made once per value."""
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds)


@dataclass(slots=True)
class OpenedUpstream:
    """A replica that answered 200 (its lease, still held) and the first chunk of its body (empty if none)."""

    lease: Lease
    response: aiohttp.ClientResponse
    first_chunk: bytes

    @property
    def replica(self) -> Replica:
        return self.lease.replica


def _retry_after(response: aiohttp.ClientResponse, default: float) -> float:
    value = response.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), 3600.0)
    except ValueError:
        return default


async def upstream_client_error(response: aiohttp.ClientResponse) -> GatewayError:
    """An upstream 4xx keeps its status; its message is kept only if it is a plain, short OpenAI-style one that
    shows nothing internal (else the generic message stands in)."""
    message: str | None = None
    try:
        raw = await read_bounded(response, 64 * 1024)
        payload = orjson.loads(raw) if raw is not None else None
        candidate = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        if isinstance(candidate, str) and not INTERNAL_DETAIL.search(candidate[:MAX_UPSTREAM_MESSAGE]):
            message = candidate[:MAX_UPSTREAM_MESSAGE]
    except (orjson.JSONDecodeError, TransportError, TimeoutError, AttributeError):
        pass
    error = error_for_status(response.status, message or "The model server rejected the request.")
    if message and "maximum context length" in message:
        error.code = "context_length_exceeded"
    return error


def _failover_reason(exc: BaseException) -> str:
    """What a failed attempt's span records: the class of failure, never its message."""
    if isinstance(exc, _ReplicaUnreachable):
        return "unreachable"
    if isinstance(exc, _ReplicaSaturated):
        return f"saturated_{exc.status}"
    if isinstance(exc, GatewayError):
        return exc.code or exc.type
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__


class RetryBudget:
    """Each request earns `ratio` of a retry (up to `burst` banked); each retry spends one. Under a wide outage
    this keeps failover from multiplying the load on the replicas that are left."""

    def __init__(self, ratio: float, burst: int) -> None:
        self.ratio = ratio
        self.burst = burst
        self.balance = float(burst)

    def earn(self) -> None:
        self.balance = min(self.burst, self.balance + self.ratio)

    def spend(self) -> bool:
        if self.balance >= 1:
            self.balance -= 1
            return True
        return False


class UpstreamClient:
    def __init__(
        self, session: aiohttp.ClientSession, settings: Settings, metrics: GatewayMetrics, tracing: Tracing = OFF
    ) -> None:
        self.session = session
        self.settings = settings
        self.metrics = metrics
        self.tracing = tracing
        self.retry_budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_burst)

    async def open(
        self,
        replicas: ReplicaSet,
        path: str,
        body: bytes | Callable[[Replica], bytes],
        request_id: str,
        key: bytes | None = None,
        *,
        only: Callable[[Replica], bool] | None = None,
        first: Replica | None = None,
        method: str = "POST",
    ) -> OpenedUpstream:
        """Send the request, failing over to another replica until one yields its status and first chunk.

        Failover happens only here, before anything reached the client: connect errors and resets try the next
        replica; a 429/503 cools the replica down and is retried once elsewhere. The opened replica's lease is
        the caller's to settle once the relay is done. `only` narrows the replicas that may answer (those serving
        an adapter, the one holding a stored response); `body` may be made per replica (ids that name it);
        `first` is the replica the pool's scheduler granted a slot on, tried before any other.
        """
        model = replicas.pool.name
        tried: set[Replica] = set()
        ineligible = {r for r in replicas.replicas if not only(r)} if only is not None else set()
        saturated_retry_used = False
        last_error: GatewayError | None = None
        self.retry_budget.earn()
        while True:
            replica: Replica | None
            if first is not None and not tried:
                replica, outcome = first, replicas.outcome_of(key, first) if key is not None else None
            else:
                replica, outcome = replicas.pick(tried | ineligible if ineligible else tried, key)
            if replica is None:
                break
            replicas.begin(replica)
            if outcome is not None and not tried:
                self.metrics.of(self.metrics.routing_decisions, model, outcome.value).inc()
            if tried:
                if not self.retry_budget.spend():
                    self.metrics.upstream_errors.labels(model, "retry_budget_exhausted").inc()
                    replica.probing = False
                    break
                self.metrics.upstream_retries.labels(model).inc()
            tried.add(replica)
            lease = Lease.acquire(replicas, replica)
            try:
                payload = body if isinstance(body, bytes) else body(replica)
                return await self._attempt(lease, len(tried), method, path, payload, request_id)
            except _ReplicaUnreachable as exc:
                lease.settle(Verdict.UNREACHABLE)
                self.metrics.upstream_errors.labels(model, "connect").inc()
                log.warning("replica %s unreachable (%s); trying another", replica.base_url, exc.reason)
                last_error = ServiceUnavailable(
                    f"No replica of model '{model}' accepted the connection.", headers={"Retry-After": "1"}
                )
            except _ReplicaSaturated as exc:
                lease.settle(Verdict.SATURATED, cooldown=exc.retry_after or self.settings.replica_cooldown)
                self.metrics.upstream_errors.labels(model, "status_429" if exc.status == 429 else "status_5xx").inc()
                error_cls = RateLimited if exc.status == 429 else ServiceUnavailable
                last_error = error_cls(
                    f"Every replica of model '{model}' is saturated; retry later.",
                    headers={"Retry-After": str(max(1, round(exc.retry_after or 1)))},
                )
                if saturated_retry_used:
                    raise last_error from None
                saturated_retry_used = True
            except (UpstreamError, UpstreamTimeout):
                lease.settle(Verdict.FAILED)
                raise
            except GatewayError:  # an upstream 4xx: the replica answered properly
                lease.settle(Verdict.SUCCEEDED)
                raise
            except BaseException:  # cancelled (the client left): the probe, if any, decided nothing
                lease.settle(Verdict.ABANDONED)
                raise
        if replicas.scaled_to_zero:  # no replica to try at all, so there is no last_error either
            message = f"Model '{model}' has no replica running (scaled to zero); one is starting, retry shortly."
        else:
            message = f"No healthy replica is available for model '{model}'."
        raise last_error or ServiceUnavailable(
            message, headers={"Retry-After": str(round(replicas.soonest_available_in()))}
        )

    async def _attempt(
        self, lease: Lease, number: int, method: str, path: str, body: bytes, request_id: str
    ) -> OpenedUpstream:
        """One replica tried, as its own span (its failure class recorded: the failover reason)."""
        attributes = {"gateway.replica": lease.replica.base_url, "gateway.attempt": number}
        with self.tracing.span("gateway.upstream.attempt", kind=SpanKind.CLIENT, attributes=attributes) as span:
            try:
                return await self._open_one(lease, method, path, body, request_id, lease.replicas.pool.timeouts)
            except BaseException as exc:
                failed(span, _failover_reason(exc))
                raise

    async def _open_one(
        self, lease: Lease, method: str, path: str, body: bytes, request_id: str, timeouts: Timeouts
    ) -> OpenedUpstream:
        replica = lease.replica
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        self.tracing.inject(headers)  # this attempt's span is vLLM's parent
        per_request = _connect_timeout(timeouts.connect)
        url = replica.base_url + path
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeouts.first_token):
                with map_upstream_errors():
                    response = await self.session.request(
                        method, url, data=body or None, headers=headers, timeout=per_request
                    )
                if response.status in RETRYABLE_STATUSES:
                    retry_after = _retry_after(response, 0.0)
                    response.release()
                    raise _ReplicaSaturated(response.status, retry_after)
                if response.status >= 500:
                    self.metrics.upstream_errors.labels(replica.model, "status_5xx").inc()
                    response.release()
                    raise UpstreamError()
                if response.status >= 400:
                    self.metrics.upstream_errors.labels(replica.model, "status_4xx").inc()
                    error = await upstream_client_error(response)
                    response.release()
                    raise error
                with map_upstream_errors():
                    first_chunk = await response.content.readany()
        except (TimeoutError, TransportTimeout):
            if response is not None:
                response.close()
            self.metrics.upstream_errors.labels(replica.model, "timeout_first_token").inc()
            raise UpstreamTimeout("The model server did not start answering in time.") from None
        except TransportError as exc:
            if response is not None:
                response.close()
            # Nothing has reached the client yet, so trying another replica is safe.
            raise _ReplicaUnreachable(exc.reason) from None
        return OpenedUpstream(lease, response, first_chunk)


class _ReplicaUnreachable(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _ReplicaSaturated(Exception):
    def __init__(self, status: int, retry_after: float) -> None:
        self.status = status
        self.retry_after = retry_after
