"""Collections, items and search. Every call is scoped to the caller's namespace; the scope each route needs is
checked before it runs (gateway/access/scopes.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.access.context import context_of
from gateway.access.keys import Identity
from gateway.search.protocol import CreateCollection, ItemId, Name, SearchRequest, UpsertItems
from gateway.search.service import SearchService

router = APIRouter()


def _context(request: Request) -> tuple[SearchService, Identity]:
    return request.app.state.gateway.search, context_of(request.scope).identity


@router.post("/v1/collections", status_code=201)
async def create_collection(body: CreateCollection, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    return await search.create(body, identity.namespace)


@router.get("/v1/collections")
async def list_collections(request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    return {"object": "list", "data": await search.describe(identity.namespace)}


@router.delete("/v1/collections/{name}", status_code=204)
async def delete_collection(name: Name, request: Request) -> Response:
    search, identity = _context(request)
    await search.delete_collection(name, identity)
    return Response(status_code=204)


@router.post("/v1/collections/{name}/snapshot")
async def snapshot_collection(name: Name, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    await search.snapshot(name, identity)
    return {"object": "snapshot", "collection": name, "status": "written"}


@router.post("/v1/collections/{name}/items")
async def upsert_items(name: Name, body: UpsertItems, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    count = await search.upsert(name, identity.namespace, body.items)
    return {"object": "upsert", "collection": name, "upserted": count}


@router.get("/v1/collections/{name}/items/{item_id:path}")
async def get_item(name: Name, item_id: ItemId, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    return await search.get(name, identity.namespace, item_id)


@router.delete("/v1/collections/{name}/items/{item_id:path}")
async def delete_item(name: Name, item_id: ItemId, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    deleted = await search.delete_item(name, identity.namespace, item_id)
    return {"object": "delete", "id": item_id, "deleted": deleted}


@router.post("/v1/search")
async def search_items(body: SearchRequest, request: Request) -> dict[str, Any]:
    search, identity = _context(request)
    return await search.search(body, identity.namespace)
