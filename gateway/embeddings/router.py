from __future__ import annotations

from fastapi import APIRouter, Request, Response

from gateway.embeddings.protocol import EmbeddingRequest
from gateway.server.state import GatewayState

router = APIRouter()


@router.post("/v1/embeddings")
async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
    gateway: GatewayState = request.app.state.gateway
    return Response(await gateway.embeddings.embed(body), media_type="application/json")
