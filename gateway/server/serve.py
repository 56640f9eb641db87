"""Run the gateway under uvicorn: the app factory behind the hot-path dispatch, on a guarded listener."""

from __future__ import annotations

import logging
import resource

import uvicorn

from gateway.config import Settings
from gateway.server.app import create_app, hot_path
from gateway.server.connections import ConnectionLimits, guarded_protocol

log = logging.getLogger("gateway.server")
# Descriptors beside client connections: replica and media connections, index files, the metrics listener.
RESERVED_DESCRIPTORS = 512


def _descriptor_budget(settings: Settings) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the client-connection cap that then fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    wanted = settings.max_connections
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = int(soft) - settings.upstream_max_connections - settings.media.max_concurrent_fetches - RESERVED_DESCRIPTORS
    if room >= wanted:
        return wanted
    log.warning("open-file limit %d leaves room for %d client connections, not %d", soft, max(room, 64), wanted)
    return max(room, 64)


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    limits = ConnectionLimits(
        max_head_bytes=settings.max_head_bytes,
        head_timeout=settings.head_timeout,
        body_idle_timeout=settings.body_idle_timeout,
        max_connections=_descriptor_budget(settings),
    )
    uvicorn.run(
        hot_path(create_app(settings), settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(limits),
        timeout_keep_alive=int(max(1, settings.keepalive_timeout)),
        access_log=False,  # a per-request log line costs more than the rest of the proxy path
        proxy_headers=False,  # nothing here reads the client address; rewriting it cost ~1% per request
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout) or None,
    )
