"""`/v1/files` and `/v1/batches`, as OpenAI serves them; the service does the work."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from gateway.access.context import context_of
from gateway.access.keys import Identity
from gateway.batch.protocol import CreateBatch, ListPage
from gateway.batch.service import BatchService
from gateway.errors import InvalidRequest
from gateway.provided import Provided

Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=64)]
MAX_FORM_FIELDS = 4  # file, purpose, and room for a client's extras


def _identity(request: Request) -> Identity:
    identity: Identity = context_of(request.scope).identity
    return identity


def router(service: Provided[BatchService]) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v1/files")
    async def upload_file(request: Request) -> dict[str, Any]:
        # Starlette spools the part to a temporary file past 1 MiB; other fields are capped at 1 MiB each.
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile) or upload.size is None:
                raise InvalidRequest("Send the file as multipart/form-data field 'file'.", param="file")
            if not isinstance(purpose, str):
                raise InvalidRequest("purpose is required ('batch').", param="purpose")
            return await service().upload(_identity(request), upload.file, upload.size, upload.filename or "", purpose)

    @routes.get("/v1/files")
    async def list_files(
        request: Request, limit: Limit = 100, after: Cursor = None, purpose: Cursor = None
    ) -> dict[str, Any]:
        return await service().files(_identity(request), ListPage(limit, after), purpose)

    @routes.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
        return await service().file(_identity(request), file_id)

    @routes.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> FileResponse:
        # Read in chunks by Starlette, off the event loop: a 200 MB file is never held in memory.
        path = await service().content(_identity(request), file_id)
        return FileResponse(path, media_type="application/jsonl")

    @routes.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
        return await service().delete_file(_identity(request), file_id)

    @routes.post("/v1/batches")
    async def create_batch(body: CreateBatch, request: Request) -> dict[str, Any]:
        return await service().create(_identity(request), body)

    @routes.get("/v1/batches")
    async def list_batches(request: Request, limit: Limit = 20, after: Cursor = None) -> dict[str, Any]:
        return await service().batches(_identity(request), ListPage(limit, after))

    @routes.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return await service().batch(_identity(request), batch_id)

    @routes.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
        return await service().cancel(_identity(request), batch_id)

    return routes
