"""Liveness, readiness and the Prometheus exposition.

Liveness never depends on replicas, so a vLLM outage cannot trigger a restart storm of gateways; readiness says
which models can be served right now.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from gateway.metrics import CONTENT_TYPE
from gateway.server.state import GatewayState

router = APIRouter()


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    ready_now, body = readiness(request.app.state.gateway)
    return JSONResponse(body, status_code=200 if ready_now else 503)


def readiness(gateway: GatewayState) -> tuple[bool, dict[str, object]]:
    """Whether this process can serve now, and the report that says what (served on both ports)."""
    models = {
        name: {
            "healthy_replicas": replicas.healthy_count(),
            "replicas": len(replicas.replicas),
            "scaled_to_zero": replicas.scaled_to_zero,
        }
        for name, replicas in gateway.pools.by_model.items()
    }
    servable = [name for name, counts in models.items() if counts["healthy_replicas"]]
    # A pool scaled to zero is waiting for its autoscaler, which the 503s this pod answers help to wake:
    # failing readiness would take the pod out of its Service and stop those requests from arriving at all.
    waking = any(counts["scaled_to_zero"] for counts in models.values())
    embeddings = gateway.embeddings.status()
    if embeddings["state"] == "ready":
        servable.append(embeddings["model"])
    problems = gateway.search.problems()  # a corrupt index fails readiness loudly instead of serving empty
    ready_now = not problems and (bool(servable) or waking or (not models and embeddings["state"] == "disabled"))
    if gateway.admission.draining:
        ready_now, problems = False, [*problems, "draining: shutting down"]
    if gateway.admission.under_pressure:  # shedding: new work gets 503 until memory falls back under the mark
        ready_now, problems = False, [*problems, "memory pressure: shedding new work"]
    body: dict[str, object] = {
        "problems": problems,
        "status": "ready" if ready_now else "unavailable",
        "servable_models": servable,
        "models": models,
        "embeddings": embeddings,
    }
    return ready_now, body


async def metrics_endpoint(request: Request) -> Response:
    gateway: GatewayState = request.app.state.gateway
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)
