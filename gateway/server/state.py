"""Everything the lifespan creates, held on `app.state.gateway`; no module globals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.access.admission import Admission
from gateway.access.limits import Limiter
from gateway.config import Settings
from gateway.embeddings.service import EmbeddingsService
from gateway.media.service import MediaPreparer
from gateway.metrics import GatewayMetrics
from gateway.responses.ids import ResponseIds
from gateway.search.service import SearchService
from gateway.tracing import Tracing
from gateway.upstream.client import UpstreamClient
from gateway.upstream.pool import Pools


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    metrics: GatewayMetrics
    pools: Pools
    upstream: UpstreamClient
    media: MediaPreparer
    embeddings: EmbeddingsService
    search: SearchService
    admission: Admission
    limiter: Limiter
    response_ids: ResponseIds
    tracing: Tracing
    started_at: int = field(default_factory=lambda: int(time.time()))
