"""`POST /v1/embeddings`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from gateway.embeddings.protocol import EmbeddingRequest
from gateway.embeddings.service import EmbeddingsService
from gateway.provided import Provided


def router(service: Provided[EmbeddingsService]) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest) -> Response:
        return Response(await service().embed(body), media_type="application/json")

    return routes
