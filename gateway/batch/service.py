"""Files and batches as a caller sees them: every call scoped to the caller's namespace (another namespace's id is a
404 exactly like a missing one), bounded per key, and refused for a line's own credential (a batch cannot start
batches)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from gateway.access.keys import Identity
from gateway.batch.executor import BatchExecutor
from gateway.batch.files import FileStorage
from gateway.batch.lines import ModelCheck, check_input
from gateway.batch.protocol import (
    BATCH_ID_RE,
    FILE_ID_RE,
    MAX_FILENAME,
    CreateBatch,
    ListPage,
    batch_object,
    file_object,
    new_batch_id,
    new_file_id,
    page,
    window_seconds,
)
from gateway.batch.store import BatchStore
from gateway.config import BatchSettings
from gateway.errors import InvalidRequest, NotFound, PermissionDenied, RateLimited, ServiceUnavailable

PURPOSES = ("batch",)  # what may be uploaded; outputs are "batch_output"
LOCK = ".lock"
log = logging.getLogger("gateway.batch")


def _no_file(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id[:64]}", param="id")


def _no_batch(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id[:64]}", param="id")


def _hold(path: Path) -> IO[bytes] | None:
    """An exclusive lock on `path` for as long as the returned file stays open; None if another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    held = path.open("ab")
    try:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        return None
    return held


class BatchService:
    def __init__(
        self,
        settings: BatchSettings,
        store: BatchStore,
        storage: FileStorage,
        executor: BatchExecutor,
        model_check: CallersCheck,
        max_line_bytes: int,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.executor = executor
        self.model_check = model_check
        self.max_line_bytes = max_line_bytes
        self._lock: IO[bytes] | None = None
        self._unavailable = "Batches are not started yet."

    def _caller(self, identity: Identity) -> Identity:
        if self._lock is None:
            raise ServiceUnavailable(self._unavailable)
        if identity.batch is not None:
            raise PermissionDenied("A batch line cannot use the Files or Batches API.")
        return identity

    async def start(self) -> None:
        """Take `batch.dir` for this process, then resume its batches. Two executors on one directory would run
        every line twice: a second gateway pointed at it serves no batches (503) and says why. So does a gateway
        whose directory cannot be written (a read-only root file system): the rest of the gateway serves on."""
        directory = self.settings.dir
        try:
            self._lock = await asyncio.to_thread(_hold, directory / LOCK)
            if self._lock is None:
                self._unavailable = "Batches are run by another gateway process on this batch.dir."
                log.error("batch.dir %s is held by another gateway process: this one serves no batches", directory)
                return
            await self.store.open()
        except (OSError, sqlite3.Error) as exc:
            self._release()
            self._unavailable = "Batches are not available: this gateway cannot write its batch.dir."
            log.error("batch.dir %s cannot be used (%s): this gateway serves no batches", directory, exc)
            return
        known = await self.store.file_ids()
        await asyncio.to_thread(self.storage.sweep, known)
        await self.executor.start()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def stop(self) -> None:
        if self._lock is None:
            return
        await self.executor.stop()
        await self.store.close()
        self._release()

    # -- files ------------------------------------------------------------------------------------------------

    async def upload(
        self, identity: Identity, source: BinaryIO, size: int, filename: str, purpose: str
    ) -> dict[str, Any]:
        caller = self._caller(identity)
        if purpose not in PURPOSES:
            raise InvalidRequest("purpose must be 'batch'.", param="purpose")
        if size > self.settings.max_file_bytes:
            raise InvalidRequest(f"A file holds at most {self.settings.max_file_bytes} bytes.", param="file")
        if await self.store.stored_bytes(caller.key_digest) + size > self.settings.max_stored_bytes_per_key:
            raise InvalidRequest(
                f"This key's stored files would exceed {self.settings.max_stored_bytes_per_key} bytes; delete some.",
                param="file",
                code="storage_limit_exceeded",
            )
        file_id = new_file_id()
        stored = await asyncio.to_thread(self.storage.store, source, file_id)
        row = {
            "id": file_id,
            "namespace": caller.namespace,
            "owner": caller.key_digest,
            "purpose": purpose,
            "filename": _printable(filename)[:MAX_FILENAME] or "upload.jsonl",
            "bytes": stored,
            "created_at": int(time.time()),
        }
        await self.store.add_file(row)
        return file_object(row)

    async def _file(self, identity: Identity, file_id: str) -> dict[str, Any]:
        namespace = self._caller(identity).namespace
        found = await self.store.file(file_id, namespace) if FILE_ID_RE.fullmatch(file_id) else None
        if found is None:
            raise _no_file(file_id)
        return found

    async def file(self, identity: Identity, file_id: str) -> dict[str, Any]:
        return file_object(await self._file(identity, file_id))

    async def files(self, identity: Identity, listing: ListPage, purpose: str | None) -> dict[str, Any]:
        rows = await self.store.files(self._caller(identity).namespace, listing.limit, listing.after, purpose)
        return page([file_object(row) for row in rows], listing.limit)

    async def content(self, identity: Identity, file_id: str) -> Path:
        return self.storage.path((await self._file(identity, file_id))["id"])

    async def delete_file(self, identity: Identity, file_id: str) -> dict[str, Any]:
        found = await self._file(identity, file_id)
        user = await self.store.file_in_use(found["id"])
        if user is not None:
            raise InvalidRequest(f"The file is the input of {user}, which is still running.", code="file_in_use")
        if not await self.store.delete_file(found["id"], found["namespace"]):
            raise _no_file(file_id)
        await asyncio.to_thread(self.storage.remove, found["id"])
        return {"id": found["id"], "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------------------------------

    async def create(self, identity: Identity, request: CreateBatch) -> dict[str, Any]:
        caller = self._caller(identity)
        window = window_seconds(request.completion_window)
        if window is None:
            raise InvalidRequest(
                "completion_window must be '24h' or shorter ('30m', '90s').", param="completion_window"
            )
        source = await self._file(caller, request.input_file_id)
        if source["purpose"] != "batch":
            raise InvalidRequest("The input file's purpose must be 'batch'.", param="input_file_id")
        if await self.store.open_batches(caller.key_digest) >= self.settings.max_open_batches_per_key:
            raise RateLimited(
                f"This key already has {self.settings.max_open_batches_per_key} batches running; wait for one.",
                headers={"Retry-After": "60"},
            )
        summary = await asyncio.to_thread(
            check_input,
            self.storage.path(source["id"]),
            request.endpoint,
            max_lines=self.settings.max_lines,
            max_line_bytes=self.max_line_bytes,
            model_check=self.model_check(caller),
        )
        now = int(time.time())
        row: dict[str, Any] = {
            "id": new_batch_id(),
            "namespace": caller.namespace,
            "owner": caller.key_digest,
            "endpoint": request.endpoint,
            "model": summary.model,
            "input_file_id": source["id"],
            "completion_window": request.completion_window,
            "status": "validating",
            "created_at": now,
            "expires_at": now + window,
            "total": summary.lines,
            "metadata": request.metadata,
        }
        await self.store.add_batch(row)
        created = await self.store.batch(row["id"])
        assert created is not None
        self.executor.launch(created)
        return batch_object(created)

    async def _batch(self, identity: Identity, batch_id: str) -> dict[str, Any]:
        namespace = self._caller(identity).namespace
        found = await self.store.batch(batch_id, namespace) if BATCH_ID_RE.fullmatch(batch_id) else None
        if found is None:
            raise _no_batch(batch_id)
        return found

    async def batch(self, identity: Identity, batch_id: str) -> dict[str, Any]:
        return batch_object(await self._batch(identity, batch_id))

    async def batches(self, identity: Identity, listing: ListPage) -> dict[str, Any]:
        rows = await self.store.batches(self._caller(identity).namespace, listing.limit, listing.after)
        return page([batch_object(row) for row in rows], listing.limit)

    async def cancel(self, identity: Identity, batch_id: str) -> dict[str, Any]:
        found = await self._batch(identity, batch_id)
        if found["status"] not in ("cancelling", "cancelled"):
            moved = await self.store.move(
                found["id"], "cancelling", when="cancelling_at", only_from=("validating", "in_progress")
            )
            if not moved:
                raise InvalidRequest(f"A batch that is {found['status']} cannot be cancelled.", param="id")
            self.executor.cancel(found["id"])
        return await self.batch(identity, batch_id)


def _printable(name: str) -> str:
    return "".join(c for c in name if c.isprintable() and c not in "/\\")


ServedTo = Callable[[str, str | None], bool]  # (model, the namespace whose adapters the caller sees) -> served
CallersCheck = Callable[[Identity], ModelCheck]


def models_check(served: ServedTo | None, embeddings_model: str | None) -> CallersCheck:
    """What a caller's batch may name: a model this gateway serves it on that endpoint — a pool's model, an
    adapter of its configuration, or one loaded at runtime by the caller's namespace, as the online path decides
    (`served` None: any; the tier that receives the lines checks them as it would online)."""

    def for_caller(identity: Identity) -> ModelCheck:
        def check(endpoint: str, model: str) -> str | None:
            if endpoint == "/v1/embeddings":
                if embeddings_model is not None and model != embeddings_model:
                    return f"model {model[:100]!r} is not served on /v1/embeddings."
                return None
            if served is not None and not served(model, identity.sees_adapters_of):
                return f"model {model[:100]!r} is not served here."
            return None

        return check

    return for_caller
