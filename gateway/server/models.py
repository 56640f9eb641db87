"""`GET /v1/models`: OpenAI's list shape, plus what each model can take and how many replicas serve it."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from gateway.access.context import context_of
from gateway.server.state import GatewayState


class ReplicaCounts(BaseModel):
    healthy: int
    total: int


class Capabilities(BaseModel):
    vision: bool
    limit_mm_per_prompt: dict[str, int] | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    replicas: ReplicaCounts | None = None
    embeddings: bool = False
    dimensions: int | None = None
    input_modalities: list[str] | None = None
    state: str | None = None
    routing: str | None = None  # "affinity" or "least_outstanding"
    routes: list[str] | None = None  # the API routes (hence dialects: OpenAI's, Anthropic's) that serve it


GENERATION_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]
EMBEDDING_ROUTES = ["/v1/embeddings", "/v1/search"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-gateway"
    parent: str | None = None  # an adapter's base model, as vLLM lists it
    capabilities: Capabilities


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    gateway: GatewayState = request.app.state.gateway
    identity = context_of(request.scope).identity
    sees = identity.sees_adapters_of
    cards = []
    for name, replicas in gateway.pools.by_model.items():
        pool = replicas.pool
        limits = dict(pool.limit_mm_per_prompt)
        for served in (name, *replicas.adapter_names(sees)):
            serving = [r for r in replicas.replicas if replicas.serves(r, served)]
            capabilities = Capabilities(
                vision=any(limits.values()),
                limit_mm_per_prompt=limits,
                max_model_len=pool.max_model_len,
                quantization=pool.quantization,
                replicas=ReplicaCounts(healthy=replicas.healthy_count(serving), total=len(serving)),
                routing=pool.routing,
                routes=GENERATION_ROUTES,
            )
            parent = None if served == name else name
            cards.append(ModelCard(id=served, created=gateway.started_at, parent=parent, capabilities=capabilities))
    embedder = gateway.embeddings
    if embedder.enabled:
        encoder = embedder.encoder
        capabilities = Capabilities(
            vision=True,
            embeddings=True,
            dimensions=encoder.dim if encoder else None,
            input_modalities=["text", "image"],
            state=embedder.status()["state"],
            routes=EMBEDDING_ROUTES,
        )
        cards.append(
            ModelCard(id=embedder.settings.model_name(), created=gateway.started_at, capabilities=capabilities)
        )
    return ModelList(data=cards)
