"""Every metric the gateway exports, on one registry, all named `gateway_*`.

Label values come from closed sets (configured model names, route templates, replica URLs from config or DNS
discovery — a replica's series are removed when it leaves the pool —, fixed error kinds) so a client can never mint
new time series. Names never reuse the engine's `vllm:*` names, so a
dashboard summing both does not double-count.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

M = TypeVar("M", Counter, Gauge, Histogram)

# LLM requests run from milliseconds to many minutes; buckets reach 10 minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10, 30)

UNKNOWN_MODEL = "_unknown"

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route, model and HTTP status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request to the first streamed chunk.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "gateway_inter_token_latency_seconds",
            "Gap between successive chunks read from a replica's stream.",
            ["model"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens", "Prompt tokens, from the replica's usage report.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens", "Completion tokens, from the replica's usage report.", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being handled now.", ["route", "model"], registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Failures talking to a replica, by kind.", ["model", "kind"], registry=r
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries",
            "Requests re-sent to another replica before any byte reached the client.",
            ["model"],
            registry=r,
        )
        self.replica_healthy = Gauge(
            "gateway_replica_healthy",
            "1 when the replica passes health checks and is not cooling down.",
            ["model", "replica"],
            registry=r,
        )
        self.replica_outstanding = Gauge(
            "gateway_replica_outstanding_requests",
            "Requests the gateway has open on each replica.",
            ["model", "replica"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "gateway_routing_decisions",
            "Affinity routing: to the conversation's own replica (affine), past it for load (spilled) or for its "
            "health (moved).",
            ["model", "outcome"],
            registry=r,
        )
        self.discovery_errors = Counter(
            "gateway_discovery_errors",
            "Failed re-resolutions of a pool's discover name; the replicas last seen stay in use.",
            ["model"],
            registry=r,
        )
        self.ratelimit_backend_errors = Counter(
            "gateway_ratelimit_backend_errors",
            "Shared rate-limit checks that fell back to this replica's own budgets (Redis unreachable).",
            registry=r,
        )
        # Saturation per pool, summed over gateway pods by the autoscaler (helm/: KEDA triggers for vLLM).
        self.pool_queued = Gauge(
            "gateway_pool_queued_requests",
            "Requests waiting at the gateway for a slot on one of the pool's replicas, all bands.",
            ["model"],
            registry=r,
        )
        # The scheduler (gateway/scheduling/): bands are priority, default, flex; tenants come from configured keys.
        self.queue_requests = Gauge(
            "gateway_queue_requests", "Requests waiting at the gateway, by band.", ["model", "band"], registry=r
        )
        self.queue_bytes = Gauge(
            "gateway_queue_bytes",
            "Bytes of request bodies held by requests waiting at the gateway, by band.",
            ["model", "band"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited at the gateway for a replica slot (those dispatched at once are not counted).",
            ["model", "band"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.replica_limit = Gauge(
            "gateway_replica_inflight_limit",
            "The adaptive in-flight limit of each replica (grown while its engine has no queue, cut when it has).",
            ["model", "replica"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "gateway_tenant_tokens",
            "Tokens served per tenant (prompt and output, counted when each request ends).",
            ["model", "tenant"],
            registry=r,
        )
        self.tenant_virtual_tokens = Gauge(
            "gateway_tenant_virtual_tokens",
            "Each tenant's virtual token counter (tokens served / weight, shared across gateways when Redis is "
            "set): the smallest backlogged one is dispatched next.",
            ["model", "tenant"],
            registry=r,
        )
        self.fairness_sync_errors = Counter(
            "gateway_fairness_sync_errors",
            "Exchanges of tenant counters with Redis that failed (this gateway then orders by its own counts).",
            registry=r,
        )
        self.pool_visual_tokens = Gauge(
            "gateway_pool_visual_tokens_in_flight",
            "Estimated visual tokens of the requests now open on the pool's replicas.",
            ["model"],
            registry=r,
        )
        self.rejections = Counter(
            "gateway_rejected_requests",
            "Requests refused before reaching a replica, by reason.",
            ["route", "reason"],
            registry=r,
        )

        self.media_items = Counter(
            "gateway_media_items",
            "Images and videos prepared, by modality and source (data URL or remote).",
            ["modality", "source"],
            registry=r,
        )
        self.media_bytes = Counter(
            "gateway_media_bytes", "Bytes of media read, by modality and source.", ["modality", "source"], registry=r
        )
        self.media_prepare_seconds = Histogram(
            "gateway_media_prepare_seconds",
            "Fetch (or decode) plus check and resize of one media item.",
            ["modality", "source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.media_rejections = Counter(
            "gateway_media_rejections", "Media refused, by reason (the error code).", ["reason"], registry=r
        )
        self.media_cache_hits = Counter(
            "gateway_media_cache_hits", "Media served from the gateway's short-lived cache.", ["modality"], registry=r
        )
        self.media_visual_tokens = Histogram(
            "gateway_media_visual_tokens",
            "Estimated visual tokens per request with media.",
            buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072),
            registry=r,
        )

        self.embedding_queue = Gauge(
            "gateway_embedding_queue_items", "Items waiting for the CLIP encoder.", ["modality"], registry=r
        )
        self.embedding_queue_seconds = Histogram(
            "gateway_embedding_queue_seconds",
            "Time an item waited before its batch started.",
            ["modality"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.embedding_batch_size = Histogram(
            "gateway_embedding_batch_size",
            "Items per encoder forward pass.",
            ["modality"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.embedding_encode_seconds = Histogram(
            "gateway_embedding_encode_seconds",
            "Encoder time per batch.",
            ["modality"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.embedding_items = Counter(
            "gateway_embedding_items", "Items embedded, by modality.", ["modality"], registry=r
        )
        self.embedding_rejections = Counter(
            "gateway_embedding_rejections", "Embedding work refused or failed, by reason.", ["reason"], registry=r
        )

        self.index_items = Gauge(
            "gateway_index_items",
            "Items held by each search collection (all namespaces).",
            ["collection"],
            registry=r,
        )
        self.index_snapshot_timestamp = Gauge(
            "gateway_index_last_snapshot_timestamp_seconds",
            "When each collection was last snapshotted (snapshot age = time() - this).",
            ["collection"],
            registry=r,
        )
        self.wal_fsync_seconds = Histogram(
            "gateway_index_wal_fsync_seconds",
            "WAL append + fsync time per acknowledged write.",
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.index_write_failures = Counter(
            "gateway_index_write_failures",
            "Writes refused because the WAL could not be made durable.",
            ["collection"],
            registry=r,
        )
        self.index_backend_errors = Counter(
            "gateway_index_backend_errors",
            "Calls to the index engine that failed, by engine and kind (unavailable, timeout, rejected).",
            ["backend", "kind"],
            registry=r,
        )
        self.search_seconds = Histogram(
            "gateway_search_seconds",
            "Index search time per query (embedding excluded).",
            ["collection"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.batches = Gauge("gateway_batches", "Batches by status (OpenAI's statuses).", ["status"], registry=r)
        self.batch_lines = Counter(
            "gateway_batch_lines",
            "Batch lines finished, by model and outcome (completed, failed, expired). A line is also counted, as "
            "the request it is, in the route's metrics and in the flex band's queue metrics.",
            ["model", "outcome"],
            registry=r,
        )
        self.batch_lines_pending = Gauge(
            "gateway_batch_lines_pending", "Lines of running batches not yet done.", ["model"], registry=r
        )
        self.batch_line_retries = Counter(
            "gateway_batch_line_retries",
            "Line sends answered 429/503 (the key's budget or a full queue) or failing to connect, sent again later.",
            ["model"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def of(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, memoised: label sets are closed (routes, configured models, statuses), and the
        library's own lookup validates and locks on every call — a few percent of a proxied request's CPU."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child
