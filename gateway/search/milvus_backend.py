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
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from gateway.errors import Conflict, IndexUnavailable, InvalidRequest, NotFound
from gateway.metrics import GatewayMetrics
from gateway.retrieval_settings import MILVUS_MAX_DOCUMENT, SearchSettings
from gateway.search.backend import CollectionMeta, StoredCollection
from gateway.search.config import IndexSpec
from gateway.search.milvus_collection import (
    CollectionGone,
    CollectionReleased,
    MilvusCollection,
    milvus_name,
)
from gateway.search.milvus_lite import LiteServer, is_lite_path

log = logging.getLogger("gateway.search")
META_PROPERTY = "gateway.meta"
COLLECTION_NOT_FOUND = 100  # pymilvus' error codes; any other code is Milvus refusing one request
COLLECTION_NOT_LOADED = 101
CONNECTION_FAILED = 2


def index_params(spec: IndexSpec) -> tuple[str, dict[str, Any]]:
    """The collection's index kind as Milvus builds it (min_rows_for_ann is FAISS's; Milvus indexes per segment)."""
    if spec.kind == "hnsw":
        return "HNSW", {"M": spec.m, "efConstruction": spec.ef_construction}
    if spec.kind == "ivf":
        return "IVF_FLAT", {"nlist": spec.nlist or 128}
    return "FLAT", {}


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
                self._client = await self.run(connect)
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
    async def run(self, function: Any, *args: Any, pool: ThreadPoolExecutor | None = None, **kwargs: Any) -> Any:
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
            return await self.run(
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
