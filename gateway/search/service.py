"""Collections on disk under `search.index_dir`, and the operations the routes call.

Every item lives in the caller's namespace (from its API key): another key's items are invisible to search, get
and delete. Text and image items are embedded with the gateway's CLIP encoder; a collection records that
encoder, and one whose encoder differs from the running one is refused with a clear message rather than mixing
vector spaces.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson

from gateway.access.keys import Identity
from gateway.config import SearchSettings
from gateway.embeddings.service import EmbeddingsService
from gateway.errors import Conflict, InvalidRequest, NotFound, ServiceUnavailable, StorageFailed
from gateway.metrics import GatewayMetrics
from gateway.search.collection import META_NAME, Collection, CollectionMeta
from gateway.search.config import IndexSpec
from gateway.search.index import Filter
from gateway.search.protocol import Content, CreateCollection, Item, SearchRequest
from gateway.search.store import Record
from gateway.tracing import OFF, Tracing

log = logging.getLogger("gateway.search")


def _reason(exc: Exception) -> str:
    """Why a collection cannot load, without file paths (readiness and API errors show no file names)."""
    if isinstance(exc, OSError):
        return exc.strerror or "I/O error"
    return str(exc)


def compile_filter(spec: dict[str, Any] | None) -> Filter | None:
    """A predicate on metadata: each key equals its value, or is one of {"in": [values]}. Membership is a set
    lookup (the request model bounds the lists), and values compare as JSON does: `true` is not `1`."""
    if not spec:
        return None
    conditions: list[tuple[str, frozenset[tuple[str, Any]]]] = []
    for key, value in spec.items():
        if isinstance(value, dict):
            if set(value) != {"in"}:
                raise InvalidRequest(f"filter.{key} must be a value or {{'in': [values]}}.", param=f"filter.{key}")
            allowed = value["in"]
        else:
            allowed = [value]
        conditions.append((key, frozenset(_typed(v) for v in allowed)))

    def matches(metadata: dict[str, Any]) -> bool:
        for key, allowed in conditions:
            value = metadata.get(key)
            if isinstance(value, dict | list) or _typed(value) not in allowed:
                return False
        return True

    return matches


def _typed(value: Any) -> tuple[str, Any]:
    """A hashable key that keeps JSON's types apart (Python's `True == 1` and `1 == 1.0` would merge them)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)  # 1 and 1.0 are one JSON number, and equal (with equal hashes) in Python too
    return (type(value).__name__, value)


class SearchService:
    def __init__(
        self, settings: SearchSettings, embeddings: EmbeddingsService, metrics: GatewayMetrics, tracing: Tracing = OFF
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.embeddings = embeddings
        self.metrics = metrics
        self.collections: dict[str, Collection] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        self._snapshotting: set[str] = set()
        self._creating: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        root = self.settings.index_dir
        root.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        for directory in sorted(p for p in root.iterdir() if (p / META_NAME).is_file()):
            try:
                meta = CollectionMeta.load((directory / META_NAME).read_bytes())
            except (ValueError, OSError) as exc:
                # One bad document (say, a restored archive) must not stop the gateway: readiness names it.
                meta = CollectionMeta(directory.name, 1, None, IndexSpec(), 0)
                collection = Collection(directory, meta, self._writer)
                collection.fail(f"collection '{directory.name}' cannot be loaded: {_reason(exc)}")
                self.collections[directory.name] = collection
                continue
            collection = Collection(directory, meta, self._writer)
            await loop.run_in_executor(self._writer, collection.load)
            self.collections[meta.name] = collection
            self._update_gauges(collection)

    async def stop(self) -> None:
        """A final snapshot of every collection with unsnapshotted writes (SIGTERM path), then close."""
        for collection in self.collections.values():
            if collection.state == "ready" and collection.records_since_snapshot:
                try:
                    await collection.snapshot()
                except OSError:
                    log.exception("final snapshot of %s failed; its WAL still holds every write", collection.meta.name)
            collection.close()
        self._writer.shutdown(wait=True)

    def problems(self) -> list[str]:
        for collection in self.collections.values():
            self._check_encoder(collection)  # known as soon as the encoder has loaded, not at first use
        return [c.error or c.meta.name for c in self.collections.values() if c.state != "ready"]

    def _check_encoder(self, collection: Collection) -> None:
        encoder = self.embeddings.encoder
        wanted = collection.meta.encoder
        if wanted is not None and encoder is not None and encoder.model_id != wanted:
            collection.state = "encoder_mismatch"
            collection.error = (
                f"collection '{collection.meta.name}' holds vectors of '{wanted}' but this gateway "
                f"runs '{encoder.model_id}'; it is not served"
            )

    # -- collections -----------------------------------------------------------------------------------------
    def _get(self, name: str) -> Collection:
        collection = self.collections.get(name)
        if collection is None:
            raise NotFound(f"The collection '{name}' does not exist.", param="collection")
        self._check_encoder(collection)
        if collection.state != "ready":
            raise ServiceUnavailable(collection.error or "The collection is not available.")
        return collection

    def _administered(self, name: str, actor: Identity) -> Collection:
        """A collection the actor may administer: one its namespace created, or any with the operator scope.
        Another namespace's collection reads as missing, as its items do."""
        collection = self.collections.get(name)
        if collection is not None and ("operator" in actor.scopes or collection.meta.owner == actor.namespace):
            return collection
        raise NotFound(f"The collection '{name}' does not exist.", param="collection")

    async def create(self, request: CreateCollection, owner: str) -> dict[str, Any]:
        # The name is claimed before the first await: two concurrent creates of one name must not both reach the
        # directory (the second would remove the first one's files as crash leftovers).
        if request.name in self.collections or request.name in self._creating:
            raise Conflict(f"The collection '{request.name}' already exists.", param="name")
        if len(self.collections) + len(self._creating) >= self.settings.max_collections:
            raise InvalidRequest(f"At most {self.settings.max_collections} collections.")
        self._creating.add(request.name)
        try:
            encoder_id, dim = None, request.dimensions
            if dim is None:
                encoder = await self._encoder()
                encoder_id, dim = encoder.model_id, encoder.dim
            meta = CollectionMeta(request.name, dim, encoder_id, request.index, int(time.time()), owner)
            directory = self.settings.index_dir / request.name
            if directory.exists():  # leftovers of a deletion interrupted by a crash
                shutil.rmtree(directory)
            collection = await asyncio.get_running_loop().run_in_executor(
                self._writer, Collection.create, directory, meta, self._writer
            )
            self.collections[request.name] = collection
        finally:
            self._creating.discard(request.name)
        return collection.describe()

    async def delete_collection(self, name: str, actor: Identity) -> None:
        collection = self._administered(name, actor)
        del self.collections[name]
        collection.close()
        await asyncio.get_running_loop().run_in_executor(self._writer, shutil.rmtree, collection.directory)

    def describe(self, namespace: str) -> list[dict[str, Any]]:
        out = []
        for collection in self.collections.values():
            self._check_encoder(collection)
            info = collection.describe()
            shard = collection.shards.get(namespace)
            info["items"] = len(shard) if shard is not None else 0  # other tenants' counts are not shown
            out.append(info)
        return out

    async def snapshot(self, name: str, actor: Identity) -> None:
        self._administered(name, actor)
        await self._get(name).snapshot()

    # -- items -----------------------------------------------------------------------------------------------
    async def _encoder(self) -> Any:
        if self.embeddings.encoder is None:
            await asyncio.wait_for(self.embeddings.wait_ready(), 120)
        if self.embeddings.encoder is None:
            raise ServiceUnavailable("The embedding model is not available.", headers={"Retry-After": "5"})
        return self.embeddings.encoder

    async def _vectors(self, collection: Collection, contents: list[Content], params: list[str]) -> np.ndarray:
        """L2-normalised vectors for contents, embedding texts and images in one batch each."""
        out = np.zeros((len(contents), collection.meta.dim), np.float32)
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
            vectors = await self.embeddings.embed_items(
                encoder, [item for _, item in to_embed], [params[i] for i, _ in to_embed]
            )
            out[[i for i, _ in to_embed]] = vectors
        norms = np.linalg.norm(out, axis=1)
        zero = np.flatnonzero(norms < 1e-12)
        if len(zero):
            raise InvalidRequest("A zero vector cannot be indexed or searched.", param=params[int(zero[0])])
        normalised: np.ndarray = out / norms[:, None]
        return normalised

    async def upsert(self, name: str, namespace: str, items: list[Item]) -> int:
        collection = self._get(name)
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
        vectors = await self._vectors(collection, list(items), [f"items[{i}]" for i in range(len(items))])
        records = [
            Record(0, "upsert", namespace, item.id, item.metadata, vector)
            for item, vector in zip(items, vectors, strict=True)
        ]
        await self._write(collection, records)
        return len(records)

    async def delete_item(self, name: str, namespace: str, item_id: str) -> bool:
        collection = self._get(name)
        if await asyncio.to_thread(collection.get, namespace, item_id) is None:  # the shard lock: off the loop
            return False
        await self._write(collection, [Record(0, "delete", namespace, item_id)])
        return True

    async def _write(self, collection: Collection, records: list[Record]) -> None:
        started = time.perf_counter()
        try:
            await collection.write(records)
        except OSError as exc:
            log.error("WAL write to %s failed: %s", collection.meta.name, exc.strerror or exc)
            self.metrics.index_write_failures.labels(collection.meta.name).inc()
            raise StorageFailed() from None
        self.metrics.wal_fsync_seconds.observe(time.perf_counter() - started)
        self._update_gauges(collection)
        if (
            collection.records_since_snapshot >= self.settings.snapshot_every
            and collection.meta.name not in self._snapshotting
        ):
            self._snapshotting.add(collection.meta.name)
            task = asyncio.create_task(self._background_snapshot(collection))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _background_snapshot(self, collection: Collection) -> None:
        try:
            await collection.snapshot()
            self._update_gauges(collection)
        except OSError:
            log.exception("snapshot of %s failed; the WAL keeps every write", collection.meta.name)
        finally:
            self._snapshotting.discard(collection.meta.name)

    def _update_gauges(self, collection: Collection) -> None:
        self.metrics.index_items.labels(collection.meta.name).set(collection.count())
        self.metrics.index_snapshot_timestamp.labels(collection.meta.name).set(collection.last_snapshot)

    async def get(self, name: str, namespace: str, item_id: str) -> dict[str, Any]:
        hit = await asyncio.to_thread(self._get(name).get, namespace, item_id)  # the shard lock: off the loop
        if hit is None:
            raise NotFound(f"No item '{item_id}' in collection '{name}'.", param="id")
        return {"object": "item", "id": hit.item_id, "metadata": hit.metadata, "vector": hit.vector.tolist()}

    async def search(self, request: SearchRequest, namespace: str) -> dict[str, Any]:
        collection = self._get(request.collection)
        if request.top_k > self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be at most {self.settings.max_top_k}.", param="top_k")
        where = compile_filter(request.filter)
        query = (await self._vectors(collection, [request.query], ["query"]))[0]
        started = time.perf_counter()
        attributes = {"gateway.search.top_k": request.top_k, "gateway.search.filtered": where is not None}
        with self.tracing.span("gateway.search", attributes=attributes):
            hits = await asyncio.to_thread(collection.search, namespace, query, request.top_k, where)
        self.metrics.search_seconds.labels(collection.meta.name).observe(time.perf_counter() - started)
        data = []
        for hit in hits:
            row: dict[str, Any] = {
                "object": "search_result",
                "id": hit.item_id,
                "score": hit.score,
                "metadata": hit.metadata,
            }
            if request.include_vectors:
                row["vector"] = hit.vector.tolist()
            data.append(row)
        return {"object": "list", "data": data, "collection": collection.meta.name, "model": collection.meta.encoder}
