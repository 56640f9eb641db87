"""One Milvus collection as the search service sees any collection (gateway/search/backend.py): its rows, their
fields and the calls that read and write them. The connection, the catalogue and error mapping are the backend's
(gateway/search/milvus_backend.py), reached through `MilvusCalls`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import orjson

from gateway.errors import IndexUnavailable, InvalidRequest, NotFound
from gateway.metrics import GatewayMetrics
from gateway.retrieval_settings import SearchSettings
from gateway.search.backend import CollectionMeta, Hit, Record
from gateway.search.config import IndexSpec
from gateway.search.filters import MISSING, Condition, is_key_field, item_fields, milvus_expression, namespace_token

# Filterable keys per item: each is a dynamic field of ~55 bytes, and Milvus caps an item's dynamic JSON at 64 KiB.
MAX_KEYS = 1024
ITEM_FIELDS = ["item_id", "doc"]
# An image item's display copy: a dynamic field of base64 text (Milvus has no bytes scalar), so collections
# created before display copies existed hold them too, with no schema change.
DISPLAY_FIELD = "display"
MAX_DYNAMIC_BYTES = 65_536


class MilvusCalls(Protocol):
    """What a collection needs of the backend: its settings and metrics, and calls run with its deadline."""

    settings: SearchSettings
    metrics: GatewayMetrics

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def run(self, function: Any, *args: Any, pool: ThreadPoolExecutor | None = None, **kwargs: Any) -> Any: ...

    def forget(self, name: str) -> None: ...


class CollectionGone(Exception):
    """Milvus says the collection does not exist (another gateway dropped it)."""


class CollectionReleased(Exception):
    """Milvus holds the collection but has not loaded it (after a Milvus restart)."""


def milvus_name(prefix: str, name: str) -> str:
    """Milvus names allow [A-Za-z0-9_] only; the API's allow dots and dashes, so the name travels as hex."""
    return prefix + name.encode().hex()


def display_of(row: dict[str, Any]) -> bytes | None:
    encoded = row.get(DISPLAY_FIELD)
    return base64.b64decode(encoded) if isinstance(encoded, str) and encoded else None


def primary_key(namespace: str, item_id: str) -> str:
    return hashlib.blake2b(repr((namespace, item_id)).encode(), digest_size=16).hexdigest()


def search_params(spec: IndexSpec, top_k: int) -> dict[str, Any]:
    if spec.kind == "hnsw":
        return {"ef": max(spec.ef_search, top_k)}  # HNSW needs ef >= k
    if spec.kind == "ivf":
        return {"nprobe": min(spec.nprobe, spec.nlist or 128)}
    return {}


class MilvusCollection:
    """One collection in Milvus, as the search service sees any collection (gateway/search/backend.py)."""

    def __init__(self, backend: MilvusCalls, meta: CollectionMeta) -> None:
        self.backend = backend
        self.meta = meta
        self.milvus_name = milvus_name(backend.settings.milvus_collection_prefix, meta.name)
        self.state = "ready"
        self.error: str | None = None
        self.last_snapshot = time.time()
        self.items: int | None = None  # counted by the backend's watcher; a gauge, not an answer
        self._writes_since_flush = 0
        # Writes and flushes of one collection take turns: Milvus Lite 3.2 loses an acknowledged insert when a
        # flush runs alongside it and the process is then killed (seen here, kill -9 after concurrent flushes).
        self._writing = asyncio.Lock()

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return await self.backend.call(method, self.milvus_name, *args, **kwargs)
            except CollectionReleased:  # a restarted Milvus: load it, once, and ask again
                await self.backend.call("load_collection", self.milvus_name)
                return await self.backend.call(method, self.milvus_name, *args, **kwargs)
        except CollectionGone:
            self.backend.forget(self.meta.name)
            raise NotFound(f"The collection '{self.meta.name}' does not exist.", param="collection") from None

    async def write(self, records: list[Record]) -> None:
        rows, deletes = [], []
        for index, record in enumerate(records):
            if record.op == "delete":
                deletes.append(primary_key(record.namespace, record.item_id))
                continue
            metadata = record.metadata or {}
            fields = item_fields(metadata)
            if len(fields) > MAX_KEYS:
                raise InvalidRequest(
                    f"With the milvus backend an item holds at most {MAX_KEYS} metadata keys.",
                    param=f"items[{index}].metadata",
                )
            display = base64.b64encode(record.display).decode() if record.display else ""
            row: dict[str, Any] = {
                **fields,
                "pk": primary_key(record.namespace, record.item_id),
                "ns": namespace_token(record.namespace),
                "namespace": record.namespace,
                "item_id": record.item_id,
                "vector": record.vector,
                "doc": orjson.dumps(metadata).decode(),
                DISPLAY_FIELD: display,
            }
            if len(orjson.dumps(fields)) + len(display) > MAX_DYNAMIC_BYTES - 1024:
                raise InvalidRequest(
                    "With the milvus backend an image item's metadata keys and display copy must fit in 63 KiB; "
                    "use fewer metadata keys.",
                    param=f"items[{index}].metadata",
                )
            rows.append(row)
        async with self._writing:
            if rows:
                await self._overwrite_dropped_keys(rows)
                await self._call("upsert", rows)
            if deletes:
                await self._call("delete", ids=deletes)
            self._writes_since_flush += len(records)

    async def _overwrite_dropped_keys(self, rows: list[dict[str, Any]]) -> None:
        """A re-upserted item replaces the old one whole: keys the old version had are written as MISSING, since
        an upsert that merges (Milvus Lite's) would otherwise keep them matching filters."""
        previous = await self._call(
            "get",
            ids=[row["pk"] for row in rows],
            output_fields=["$meta"],
            consistency_level=self.backend.settings.milvus_consistency,
        )
        old_fields = {row["pk"]: row for row in previous}
        for row in rows:
            for name in old_fields.get(row["pk"], {}):
                if is_key_field(name) and name not in row:
                    row[name] = MISSING

    async def get(self, namespace: str, item_id: str) -> Hit | None:
        rows = await self._call(
            "get",
            ids=[primary_key(namespace, item_id)],
            output_fields=[*ITEM_FIELDS, "vector", DISPLAY_FIELD],
            consistency_level=self.backend.settings.milvus_consistency,
        )
        if not rows:
            return None
        row = rows[0]
        vector = np.asarray(row["vector"], np.float32)
        return Hit(row["item_id"], 1.0, orjson.loads(row["doc"]), vector, display_of(row))

    async def search(
        self,
        namespace: str,
        query: np.ndarray,
        top_k: int,
        conditions: list[Condition],
        with_vectors: bool,
        with_displays: bool = False,
    ) -> list[Hit]:
        expression = milvus_expression(conditions, namespace)
        if expression is None:
            return []
        fields = [*ITEM_FIELDS, *(["vector"] if with_vectors else []), *([DISPLAY_FIELD] if with_displays else [])]
        results = await self._call(
            "search",
            data=[query],
            limit=top_k,
            filter=expression,
            output_fields=fields,
            search_params={"metric_type": "IP", "params": search_params(self.meta.index, top_k)},
            consistency_level=self.backend.settings.milvus_consistency,
        )
        hits = []
        for found in results[0] if results else []:
            entity = found["entity"]
            vector = np.asarray(entity["vector"], np.float32) if with_vectors else None
            metadata = orjson.loads(entity["doc"])
            hits.append(Hit(entity["item_id"], float(found["distance"]), metadata, vector, display_of(entity)))
        return hits

    async def count(self, namespace: str | None = None) -> int:
        expression = "" if namespace is None else f'ns == "{namespace_token(namespace)}"'
        rows = await self._call(
            "query",
            filter=expression,
            output_fields=["count(*)"],
            consistency_level=self.backend.settings.milvus_consistency,
        )
        return int(rows[0]["count(*)"]) if rows else 0

    async def refresh_count(self) -> None:
        with contextlib.suppress(NotFound, IndexUnavailable):
            self.items = await self.count()
            self.backend.metrics.index_items.labels(self.meta.name).set(self.items)

    def cached_count(self) -> int | None:
        return self.items

    async def snapshot(self) -> None:
        """Milvus' flush: growing segments are sealed (and then indexed), so searches leave the slow path."""
        async with self._writing:
            await self._call("flush")
            self._writes_since_flush = 0
        self.last_snapshot = time.time()

    def wants_snapshot(self, every: int) -> bool:
        return self._writes_since_flush >= every

    async def rows(self, batch: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
        """Every item of every namespace, in batches (for `gateway index export`)."""
        iterator = await self._call(
            "query_iterator",
            batch_size=batch,
            filter="",
            output_fields=["namespace", *ITEM_FIELDS, "vector", DISPLAY_FIELD],
        )
        try:
            while rows := await self.backend.run(iterator.next):
                yield rows
        finally:
            iterator.close()

    def close(self) -> None:
        pass
