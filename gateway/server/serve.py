"""Run the gateway under uvicorn: the app factory behind the hot-path dispatch, on a guarded listener."""

from __future__ import annotations

import logging
import resource

import orjson
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


# Fields the access log adds to its records (gateway/server/middleware.py), written out by the JSON format.
ACCESS_FIELDS = ("method", "route", "status", "duration_ms", "request_id", "trace_id", "key_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the access log's fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({name: getattr(record, name) for name in ACCESS_FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def serve(settings: Settings) -> None:
    configure_logging(settings)
    limits = ConnectionLimits(
        max_head_bytes=settings.max_head_bytes,
        head_timeout=settings.head_timeout,
        body_idle_timeout=settings.body_idle_timeout,
        max_connections=_descriptor_budget(settings),
        min_body_rate=settings.min_body_rate,
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
        log_config=None,  # uvicorn's own lines go through the handler above (JSON too, when asked)
        timeout_graceful_shutdown=int(settings.drain_timeout) or None,
    )
