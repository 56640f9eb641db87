"""Collections, items and search. Every call is scoped to the caller's namespace; scopes gate what it may do."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.auth import Identity
from gateway.protocol.search import CreateCollection, ItemId, Name, SearchRequest, UpsertItems
from gateway.search.service import SearchService

router = APIRouter()


def _context(request: Request, scope: str) -> tuple[SearchService, Identity]:
    identity: Identity = request.scope["state"]["identity"]
    identity.require(scope)  # type: ignore[arg-type]
    return request.app.state.gateway.search, identity


@router.post("/v1/collections", status_code=201)
async def create_collection(body: CreateCollection, request: Request) -> dict[str, Any]:
    search, _ = _context(request, "admin")
    return await search.create(body)


@router.get("/v1/collections")
async def list_collections(request: Request) -> dict[str, Any]:
    search, identity = _context(request, "read")
    return {"object": "list", "data": search.describe(identity.namespace)}


@router.delete("/v1/collections/{name}", status_code=204)
async def delete_collection(name: Name, request: Request) -> Response:
    search, _ = _context(request, "admin")
    await search.delete_collection(name)
    return Response(status_code=204)


@router.post("/v1/collections/{name}/snapshot")
async def snapshot_collection(name: Name, request: Request) -> dict[str, Any]:
    search, _ = _context(request, "admin")
    await search.snapshot(name)
    return {"object": "snapshot", "collection": name, "status": "written"}


@router.post("/v1/collections/{name}/items")
async def upsert_items(name: Name, body: UpsertItems, request: Request) -> dict[str, Any]:
    search, identity = _context(request, "write")
    count = await search.upsert(name, identity.namespace, body.items)
    return {"object": "upsert", "collection": name, "upserted": count}


@router.get("/v1/collections/{name}/items/{item_id}")
async def get_item(name: Name, item_id: ItemId, request: Request) -> dict[str, Any]:
    search, identity = _context(request, "read")
    return search.get(name, identity.namespace, item_id)


@router.delete("/v1/collections/{name}/items/{item_id}")
async def delete_item(name: Name, item_id: ItemId, request: Request) -> dict[str, Any]:
    search, identity = _context(request, "write")
    deleted = await search.delete_item(name, identity.namespace, item_id)
    return {"object": "delete", "id": item_id, "deleted": deleted}


@router.post("/v1/search")
async def search_items(body: SearchRequest, request: Request) -> dict[str, Any]:
    search, identity = _context(request, "read")
    return await search.search(body, identity.namespace)
