"""/metrics on its own port, served from prometheus_client's thread so scrapes never queue behind requests."""

from __future__ import annotations

from typing import Any

from prometheus_client import start_http_server

from gateway.metrics import GatewayMetrics


class MetricsServer:
    def __init__(self, metrics: GatewayMetrics, host: str, port: int | None) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: Any = None

    def start(self) -> None:
        if self._port is not None:
            self._server, _thread = start_http_server(self._port, addr=self._host, registry=self._metrics.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
