"""Milvus as the index engine: Milvus Lite started as this gateway's child for a file path, or a Milvus server or
cluster for an http(s) URI, through the same pymilvus client.

Milvus owns durability here: a write is acknowledged once Milvus acknowledged it. The catalogue lives in Milvus
(each collection's `CollectionMeta` is a collection property), so gateway replicas sharing one cluster see each
other's collections; this process only caches what it has looked up.

Each item is one row: a digest of (namespace, id) as the primary key, the namespace's digest as the partition key,
the id, the vector, the metadata as a JSON document, and as dynamic fields the digests that filters match
(gateway/search/filters.py).
pymilvus blocks, so every call runs on a bounded thread pool with a deadline; `_calling` is the one place its
exceptions become the gateway's errors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import orjson

from gateway.config import MILVUS_MAX_DOCUMENT, SearchSettings
from gateway.errors import Conflict, IndexUnavailable, InvalidRequest, NotFound
from gateway.metrics import GatewayMetrics
from gateway.search.backend import StoredCollection
from gateway.search.collection import CollectionMeta
from gateway.search.config import IndexSpec
from gateway.search.filters import MISSING, Condition, is_key_field, item_fields, milvus_expression, namespace_token
from gateway.search.index import Hit
from gateway.search.milvus_lite import LiteServer, is_lite_path
from gateway.search.store import Record

log = logging.getLogger("gateway.search")
META_PROPERTY = "gateway.meta"
# Filterable keys per item: each is a dynamic field of ~55 bytes, and Milvus caps an item's dynamic JSON at 64 KiB.
MAX_KEYS = 1024
ITEM_FIELDS = ["item_id", "doc"]
# An image item's display copy: a dynamic field of base64 text (Milvus has no bytes scalar), so collections
# created before display copies existed hold them too, with no schema change.
DISPLAY_FIELD = "display"
MAX_DYNAMIC_BYTES = 65_536
COLLECTION_NOT_FOUND = 100  # pymilvus' error codes; any other code is Milvus refusing one request
COLLECTION_NOT_LOADED = 101
CONNECTION_FAILED = 2


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


def index_params(spec: IndexSpec) -> tuple[str, dict[str, Any]]:
    """The collection's index kind as Milvus builds it (min_rows_for_ann is FAISS's; Milvus indexes per segment)."""
    if spec.kind == "hnsw":
        return "HNSW", {"M": spec.m, "efConstruction": spec.ef_construction}
    if spec.kind == "ivf":
        return "IVF_FLAT", {"nlist": spec.nlist or 128}
    return "FLAT", {}


def search_params(spec: IndexSpec, top_k: int) -> dict[str, Any]:
    if spec.kind == "hnsw":
        return {"ef": max(spec.ef_search, top_k)}  # HNSW needs ef >= k
    if spec.kind == "ivf":
        return {"nprobe": min(spec.nprobe, spec.nlist or 128)}
    return {}


class MilvusBackend:
    name = "milvus"

    def __init__(self, settings: SearchSettings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.uri = settings.milvus_uri
        self.lite = LiteServer(Path(self.uri).expanduser()) if is_lite_path(self.uri) else None
        # Searches get their own threads: a burst of slow filtered searches must not queue a write or a GET.
        self._searches = ThreadPoolExecutor(settings.milvus_threads, thread_name_prefix="milvus-search")
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="milvus")
        self._client: Any = None
        self._problem: str | None = "the vector database has not been reached yet"
        self._known: dict[str, MilvusCollection] = {}
        self._creating: set[str] = set()
        self._watch: asyncio.Task[None] | None = None

    # -- lifecycle and health --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.lite is not None:
            self.lite.start()
        await self._connect()
        self._watch = asyncio.create_task(self._watch_forever(), name="milvus-watch")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self._pool, client.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._searches.shutdown(wait=False, cancel_futures=True)
        if self.lite is not None:
            self.lite.stop()

    def problems(self) -> list[str]:
        return [f"search backend milvus: {self._problem}"] if self._problem else []

    async def _connect(self) -> None:
        """A fresh client (a fresh gRPC channel, free of a dead one's reconnect backoff), kept if it answers."""
        from pymilvus import MilvusClient

        for name in ("pymilvus", "pymilvus.milvus_client"):  # set on its import: each failed RPC, with a traceback
            logging.getLogger(name).setLevel(logging.CRITICAL)
        uri = self.lite.uri if self.lite is not None else self.uri
        token = self.settings.milvus_token.get_secret_value() if self.settings.milvus_token else ""
        timeout = self.settings.milvus_timeout

        def connect() -> Any:
            client = MilvusClient(uri=uri, token=token, timeout=timeout)
            client.list_collections(timeout=timeout)
            return client

        deadline = 30.0 if self.lite is not None else timeout  # a starting Lite takes a moment to listen
        started = time.monotonic()
        while True:
            try:
                self._client = await self._run(connect)
                self._problem = None
                log.info("search backend milvus: connected")
                return
            except Exception as exc:  # any failure to connect reads as "unreachable", logged once by _mark_down
                if time.monotonic() - started > deadline:
                    self._mark_down(f"unreachable ({type(exc).__name__})")
                    return
                await asyncio.sleep(0.2)

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0 if self._problem else 5.0)
            if self.lite is not None and not self.lite.alive():
                code = self.lite.process.poll() if self.lite.process is not None else None
                log.warning("Milvus Lite exited (code %s); starting it again", code)
                self._mark_down("Milvus Lite exited; restarting it")
                self.lite.start()
            if self._problem:
                await self._connect()
                continue
            with contextlib.suppress(IndexUnavailable):
                await self.call("list_collections")
                for collection in list(self._known.values()):
                    await collection.refresh_count()

    def _mark_down(self, reason: str) -> None:
        if self._problem is None:
            log.error("search backend milvus: %s", reason)
        self._problem = reason
        self._client = None

    # -- calls -----------------------------------------------------------------------------------------------
    async def _run(self, function: Any, *args: Any, pool: ThreadPoolExecutor | None = None, **kwargs: Any) -> Any:
        """On a pool, with the deadline kept here too: a call pymilvus lets hang frees its caller anyway."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool or self._pool, functools.partial(function, *args, **kwargs))
        return await asyncio.wait_for(future, self.settings.milvus_timeout + 1)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._client
        if client is None:
            raise IndexUnavailable()
        pool = self._searches if method == "search" else self._pool
        with self._calling():
            return await self._run(
                getattr(client, method), *args, pool=pool, timeout=self.settings.milvus_timeout, **kwargs
            )

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """The one translation of pymilvus' failures: a missing collection, a request Milvus refused, or an engine
        that cannot be reached or does not answer in time (then readiness says so until the watcher reconnects)."""
        import grpc
        from pymilvus.exceptions import MilvusException

        try:
            yield
        except MilvusException as exc:
            if exc.code == COLLECTION_NOT_FOUND:
                raise CollectionGone() from None
            if exc.code == COLLECTION_NOT_LOADED:
                raise CollectionReleased() from None
            if exc.code == CONNECTION_FAILED:
                self._failed("unavailable", f"unreachable (code {exc.code})")
            self.metrics.index_backend_errors.labels(self.name, "rejected").inc()
            log.warning("search backend milvus refused a call: %s", exc.message)
            raise IndexUnavailable("The vector database refused the request; nothing was acknowledged.") from None
        except grpc.RpcError as exc:  # pymilvus lets a deadline or a broken channel through as grpc's own error
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._failed("timeout", "calls time out")
            self._failed("unavailable", f"unreachable ({code.name if code else type(exc).__name__})")
        except TimeoutError:
            self._failed("timeout", "calls time out")

    def _failed(self, kind: str, reason: str) -> NoReturn:
        self.metrics.index_backend_errors.labels(self.name, kind).inc()
        self._mark_down(reason)
        raise IndexUnavailable() from None

    # -- the catalogue -----------------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        return milvus_name(self.settings.milvus_collection_prefix, name)

    async def lookup(self, name: str) -> StoredCollection | None:
        known = self._known.get(name)
        if known is not None:
            return known
        try:
            described = await self.call("describe_collection", self._name(name))
        except CollectionGone:
            return None
        collection = await self._adopt(name, described)
        return collection

    async def _adopt(self, name: str, described: dict[str, Any]) -> MilvusCollection:
        raw = (described.get("properties") or {}).get(META_PROPERTY, "")
        try:
            meta = CollectionMeta.load(raw.encode())
            if meta.name != name:
                raise ValueError("its collection document names another collection")
        except ValueError as exc:
            collection = MilvusCollection(self, CollectionMeta(name, 1, None, IndexSpec(), 0))
            collection.state, collection.error = "corrupt", f"collection '{name}' cannot be loaded: {exc}"
        else:
            collection = MilvusCollection(self, meta)
            try:
                await self.call("load_collection", collection.milvus_name)  # searchable from here on
            except CollectionGone:
                raise NotFound(f"The collection '{name}' does not exist.", param="collection") from None
            await collection.refresh_count()
        self._known[name] = collection
        return collection

    async def listing(self) -> list[StoredCollection]:
        prefix = self.settings.milvus_collection_prefix
        names = []
        for milvus in await self.call("list_collections"):
            if milvus.startswith(prefix):
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    names.append(bytes.fromhex(milvus[len(prefix) :]).decode())
        for gone in set(self._known) - set(names):
            del self._known[gone]  # dropped through another gateway
        found = await asyncio.gather(*(self.lookup(name) for name in names), return_exceptions=True)
        listed: list[StoredCollection] = []
        for result in found:
            if isinstance(result, IndexUnavailable):
                raise result
            if result is not None and not isinstance(result, BaseException):
                listed.append(result)
        return listed

    def known(self) -> list[StoredCollection]:
        return list(self._known.values())

    def reserve(self, name: str) -> None:
        if name in self._creating:
            raise Conflict(f"The collection '{name}' already exists.", param="name")
        self._creating.add(name)

    def release(self, name: str) -> None:
        self._creating.discard(name)

    async def collection_count(self) -> int:
        return len(await self.listing()) + len(self._creating)

    async def create(self, meta: CollectionMeta) -> StoredCollection:
        from pymilvus import DataType

        client = self._client
        if client is None:
            raise IndexUnavailable()
        target = self._name(meta.name)
        if await self.call("has_collection", target):
            raise Conflict(f"The collection '{meta.name}' already exists.", param="name")
        schema = client.create_schema(auto_id=False, enable_dynamic_field=True)  # the filterable fields
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=32)
        schema.add_field("ns", DataType.VARCHAR, max_length=32, is_partition_key=True)
        schema.add_field("namespace", DataType.VARCHAR, max_length=512)  # as written, for export only
        schema.add_field("item_id", DataType.VARCHAR, max_length=1024)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=meta.dim)
        schema.add_field("doc", DataType.VARCHAR, max_length=MILVUS_MAX_DOCUMENT)
        kind, params = index_params(meta.index)
        indexes = client.prepare_index_params()
        indexes.add_index("vector", index_type=kind, metric_type="IP", params=params)
        try:
            await self.call(
                "create_collection",
                target,
                schema=schema,
                index_params=indexes,
                consistency_level=self.settings.milvus_consistency,
                properties={META_PROPERTY: meta.dump().decode()},
            )
        except IndexUnavailable:
            if self._problem is None:  # Milvus answered, and refused
                if await self.call("has_collection", target):  # another gateway created it meanwhile
                    raise Conflict(f"The collection '{meta.name}' already exists.", param="name") from None
                raise InvalidRequest(
                    f"This Milvus cannot build the '{meta.index.kind}' index ({kind}); choose another index kind.",
                    param="index.kind",
                ) from None
            raise
        collection = MilvusCollection(self, meta)
        self._known[meta.name] = collection
        return collection

    async def drop(self, collection: StoredCollection) -> None:
        assert isinstance(collection, MilvusCollection)
        with contextlib.suppress(CollectionGone):
            await self.call("drop_collection", collection.milvus_name)
        self._known.pop(collection.meta.name, None)

    def forget(self, name: str) -> None:
        self._known.pop(name, None)


class MilvusCollection:
    """One collection in Milvus, as the search service sees any collection (gateway/search/backend.py)."""

    def __init__(self, backend: MilvusBackend, meta: CollectionMeta) -> None:
        self.backend = backend
        self.meta = meta
        self.milvus_name = backend._name(meta.name)
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
            while rows := await self.backend._run(iterator.next):
                yield rows
        finally:
            iterator.close()

    def close(self) -> None:
        pass
