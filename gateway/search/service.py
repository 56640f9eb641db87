"""Collections in the configured engine (FAISS under `search.index_dir`, or Milvus), and the operations the routes
call.

Every item lives in the caller's namespace (from its API key): another key's items are invisible to search, get
and delete. Text and image items are embedded with the gateway's CLIP encoder; a collection records that
encoder, and one whose encoder differs from the running one is refused with a clear message rather than mixing
vector spaces.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import orjson

from gateway.access.keys import Identity
from gateway.embeddings.service import EmbeddingsService
from gateway.errors import Conflict, IndexUnavailable, InvalidRequest, NotFound, ServiceUnavailable, StorageFailed
from gateway.media.data_urls import data_url
from gateway.metrics import GatewayMetrics
from gateway.retrieval_settings import SearchSettings
from gateway.search.backend import CollectionMeta, IndexBackend, Record, StoredCollection
from gateway.search.display import display_copy
from gateway.search.faiss_backend import FaissBackend
from gateway.search.filters import parse_filter
from gateway.search.protocol import Content, CreateCollection, Item, SearchRequest
from gateway.tracing import OFF, Tracing

log = logging.getLogger("gateway.search")


def create_backend(settings: SearchSettings, metrics: GatewayMetrics) -> IndexBackend:
    if settings.backend == "milvus":
        from gateway.search.milvus_backend import MilvusBackend  # pymilvus loads only when chosen

        return MilvusBackend(settings, metrics)
    return FaissBackend(settings.index_dir)


def describe(collection: StoredCollection, items: int) -> dict[str, Any]:
    meta = collection.meta
    return {
        "name": meta.name,
        "dimensions": meta.dim,
        "encoder": meta.encoder,
        "index": meta.index.model_dump(),
        "created": meta.created,
        "items": items,
        "state": collection.state,
        "error": collection.error,
    }


class SearchService:
    def __init__(
        self,
        settings: SearchSettings,
        embeddings: EmbeddingsService,
        metrics: GatewayMetrics,
        tracing: Tracing = OFF,
        backend: IndexBackend | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.embeddings = embeddings
        self.metrics = metrics
        self.backend = backend or create_backend(settings, metrics)
        self._snapshotting: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        for collection in self.backend.known():
            self._update_gauges(collection)

    async def stop(self) -> None:
        """A final snapshot of every collection with unsnapshotted writes (SIGTERM path), then close."""
        for collection in self.backend.known():
            if collection.state == "ready" and collection.wants_snapshot(1):
                try:
                    await collection.snapshot()
                except (OSError, IndexUnavailable, NotFound):
                    log.exception("final snapshot of %s failed; its log still holds every write", collection.meta.name)
        await self.backend.stop()

    def problems(self) -> list[str]:
        known = self.backend.known()
        for collection in known:
            self._check_encoder(collection)  # known as soon as the encoder has loaded, not at first use
        return self.backend.problems() + [c.error or c.meta.name for c in known if c.state != "ready"]

    def _check_encoder(self, collection: StoredCollection) -> None:
        encoder = self.embeddings.encoder
        wanted = collection.meta.encoder
        if wanted is not None and encoder is not None and encoder.model_id != wanted:
            collection.state = "encoder_mismatch"
            collection.error = (
                f"collection '{collection.meta.name}' holds vectors of '{wanted}' but this gateway "
                f"runs '{encoder.model_id}'; it is not served"
            )

    # -- collections -----------------------------------------------------------------------------------------
    async def _get(self, name: str) -> StoredCollection:
        collection = await self.backend.lookup(name)
        if collection is None:
            raise NotFound(f"The collection '{name}' does not exist.", param="collection")
        return self._servable(collection)

    def _servable(self, collection: StoredCollection) -> StoredCollection:
        self._check_encoder(collection)
        if collection.state != "ready":
            raise ServiceUnavailable(collection.error or "The collection is not available.")
        return collection

    async def _administered(self, name: str, actor: Identity) -> StoredCollection:
        """A collection the actor may administer: one its namespace created, or any with the operator scope.
        Another namespace's collection reads as missing, as its items do."""
        collection = await self.backend.lookup(name)
        if collection is not None and ("operator" in actor.scopes or collection.meta.owner == actor.namespace):
            return collection
        raise NotFound(f"The collection '{name}' does not exist.", param="collection")

    async def create(self, request: CreateCollection, owner: str) -> dict[str, Any]:
        self.backend.reserve(request.name)  # before the first await: a concurrent create of the name is refused
        try:
            if await self.backend.lookup(request.name) is not None:
                raise Conflict(f"The collection '{request.name}' already exists.", param="name")
            if await self.backend.collection_count() > self.settings.max_collections:
                raise InvalidRequest(f"At most {self.settings.max_collections} collections.")
            encoder_id, dim = None, request.dimensions
            if dim is None:
                encoder = await self._encoder()
                encoder_id, dim = encoder.model_id, encoder.dim
            meta = CollectionMeta(request.name, dim, encoder_id, request.index, int(time.time()), owner)
            collection = await self.backend.create(meta)
        finally:
            self.backend.release(request.name)
        return describe(collection, 0)

    async def delete_collection(self, name: str, actor: Identity) -> None:
        await self.backend.drop(await self._administered(name, actor))

    async def describe(self, namespace: str) -> list[dict[str, Any]]:
        listed = await self.backend.listing()
        for collection in listed:
            self._check_encoder(collection)
        # Each namespace sees its own item counts only.
        counts = await asyncio.gather(*(self._count(c, namespace) for c in listed))
        return [describe(c, items) for c, items in zip(listed, counts, strict=True)]

    @staticmethod
    async def _count(collection: StoredCollection, namespace: str) -> int:
        return await collection.count(namespace) if collection.state == "ready" else 0

    async def snapshot(self, name: str, actor: Identity) -> None:
        await self._servable(await self._administered(name, actor)).snapshot()

    # -- items -----------------------------------------------------------------------------------------------
    async def _encoder(self) -> Any:
        if self.embeddings.encoder is None:
            await asyncio.wait_for(self.embeddings.wait_ready(), 120)
        if self.embeddings.encoder is None:
            raise ServiceUnavailable("The embedding model is not available.", headers={"Retry-After": "5"})
        return self.embeddings.encoder

    async def _vectors(
        self, collection: StoredCollection, contents: list[Content], params: list[str], displays: bool = False
    ) -> tuple[np.ndarray, list[bytes | None]]:
        """L2-normalised vectors for contents, embedding texts and images in one batch each; with `displays`,
        each embedded image's display copy too (None for the rest)."""
        out = np.zeros((len(contents), collection.meta.dim), np.float32)
        kept: list[bytes | None] = [None] * len(contents)
        to_embed: list[tuple[int, Any]] = []
        for i, content in enumerate(contents):
            if content.vector is not None:
                if len(content.vector) != collection.meta.dim:
                    raise InvalidRequest(
                        f"The vector must have {collection.meta.dim} dimensions.", param=f"{params[i]}.vector"
                    )
                out[i] = content.vector
            elif collection.meta.encoder is None:
                raise InvalidRequest("This collection holds vectors only; send `vector`.", param=params[i])
            else:
                to_embed.append(
                    (
                        i,
                        content.text
                        if content.text is not None
                        else {"type": "image_url", "image_url": {"url": content.image_url}},
                    )
                )
        if to_embed:
            encoder = await self._encoder()
            size, limit = self.settings.display_size, self.settings.display_max_bytes
            keep = (lambda image: display_copy(image, size, limit)) if displays and size else None
            vectors, made = await self.embeddings.embed_items(
                encoder, [item for _, item in to_embed], [params[i] for i, _ in to_embed], keep, size
            )
            out[[i for i, _ in to_embed]] = vectors
            for (i, _), display in zip(to_embed, made, strict=True):
                kept[i] = display
        norms = np.linalg.norm(out, axis=1)
        zero = np.flatnonzero(norms < 1e-12)
        if len(zero):
            raise InvalidRequest("A zero vector cannot be indexed or searched.", param=params[int(zero[0])])
        normalised: np.ndarray = out / norms[:, None]
        return normalised, kept

    async def upsert(self, name: str, namespace: str, items: list[Item]) -> int:
        collection = await self._get(name)
        if len(items) > self.settings.max_items_per_request:
            raise InvalidRequest(f"At most {self.settings.max_items_per_request} items per request.", param="items")
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            raise InvalidRequest("Item ids must be unique within one request.", param="items")
        for i, item in enumerate(items):
            try:
                encoded = orjson.dumps(item.metadata)
            except TypeError:  # e.g. an integer beyond 64 bits
                raise InvalidRequest(
                    "Metadata must be plain JSON with 64-bit numbers.", param=f"items[{i}].metadata"
                ) from None
            if len(encoded) > self.settings.max_metadata_bytes:
                raise InvalidRequest(
                    f"Metadata is limited to {self.settings.max_metadata_bytes} bytes.", param=f"items[{i}].metadata"
                )
        params = [f"items[{i}]" for i in range(len(items))]
        vectors, displays = await self._vectors(collection, list(items), params, displays=True)
        records = [
            Record(0, "upsert", namespace, item.id, item.metadata, vector, display)
            for item, vector, display in zip(items, vectors, displays, strict=True)
        ]
        await self._write(collection, records)
        return len(records)

    async def delete_item(self, name: str, namespace: str, item_id: str) -> bool:
        collection = await self._get(name)
        if await collection.get(namespace, item_id) is None:
            return False
        await self._write(collection, [Record(0, "delete", namespace, item_id)])
        return True

    async def _write(self, collection: StoredCollection, records: list[Record]) -> None:
        started = time.perf_counter()
        try:
            await collection.write(records)
        except IndexUnavailable:
            self.metrics.index_write_failures.labels(collection.meta.name).inc()
            raise
        except OSError as exc:
            log.error("WAL write to %s failed: %s", collection.meta.name, exc.strerror or exc)
            self.metrics.index_write_failures.labels(collection.meta.name).inc()
            raise StorageFailed() from None
        self.metrics.wal_fsync_seconds.observe(time.perf_counter() - started)
        self._update_gauges(collection)
        if collection.wants_snapshot(self.settings.snapshot_every) and collection.meta.name not in self._snapshotting:
            self._snapshotting.add(collection.meta.name)
            task = asyncio.create_task(self._background_snapshot(collection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _background_snapshot(self, collection: StoredCollection) -> None:
        try:
            await collection.snapshot()
            self._update_gauges(collection)
        except (OSError, IndexUnavailable, NotFound):
            log.exception("snapshot of %s failed; the WAL keeps every write", collection.meta.name)
        finally:
            self._snapshotting.discard(collection.meta.name)

    def _update_gauges(self, collection: StoredCollection) -> None:
        items = collection.cached_count()
        if items is not None:  # Milvus counts in the background (a count is a query there)
            self.metrics.index_items.labels(collection.meta.name).set(items)
        self.metrics.index_snapshot_timestamp.labels(collection.meta.name).set(collection.last_snapshot)

    async def get(self, name: str, namespace: str, item_id: str) -> dict[str, Any]:
        hit = await (await self._get(name)).get(namespace, item_id)
        if hit is None:
            raise NotFound(f"No item '{item_id}' in collection '{name}'.", param="id")
        vector = hit.vector.tolist() if hit.vector is not None else []
        item = {"object": "item", "id": hit.item_id, "metadata": hit.metadata, "vector": vector}
        if hit.display is not None:
            item["image_url"] = data_url(hit.display)
        return item

    async def search(self, request: SearchRequest, namespace: str) -> dict[str, Any]:
        collection = await self._get(request.collection)
        if request.top_k > self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be at most {self.settings.max_top_k}.", param="top_k")
        conditions = parse_filter(request.filter)
        query = (await self._vectors(collection, [request.query], ["query"]))[0][0]
        started = time.perf_counter()
        attributes = {
            "gateway.search.top_k": request.top_k,
            "gateway.search.filtered": bool(conditions),
            "gateway.search.backend": self.backend.name,
        }
        with self.tracing.span("gateway.search", attributes=attributes):
            hits = await collection.search(
                namespace, query, request.top_k, conditions, request.include_vectors, request.include_images
            )
        self.metrics.search_seconds.labels(collection.meta.name).observe(time.perf_counter() - started)
        data = []
        for hit in hits:
            row: dict[str, Any] = {
                "object": "search_result",
                "id": hit.item_id,
                "score": hit.score,
                "metadata": hit.metadata,
            }
            if request.include_vectors and hit.vector is not None:
                row["vector"] = hit.vector.tolist()
            if request.include_images and hit.display is not None:
                row["image_url"] = data_url(hit.display)
            data.append(row)
        return {"object": "list", "data": data, "collection": collection.meta.name, "model": collection.meta.encoder}
