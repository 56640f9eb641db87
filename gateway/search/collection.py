"""A durable FAISS collection: per-namespace shards in memory, one writer, every acknowledged write in the WAL first.

It is the FAISS engine's `StoredCollection` (gateway/search/backend.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from gateway.durability import fsync_dir
from gateway.search.backend import CollectionMeta, Hit, Record
from gateway.search.filters import Condition, predicate
from gateway.search.index import Shard
from gateway.search.store import CollectionStore, CorruptIndex, Snapshot

log = logging.getLogger("gateway.search")
META_NAME = "collection.json"


class Collection:
    def __init__(self, directory: Path, meta: CollectionMeta, writer: ThreadPoolExecutor) -> None:
        self.directory = directory
        self.meta = meta
        self.store = CollectionStore(directory)
        self.shards: dict[str, Shard] = {}
        self.seq = 0
        self.records_since_snapshot = 0
        self.last_snapshot = time.time()
        self.state = "ready"
        self.error: str | None = None
        self._writer = writer  # the one thread that touches this collection's files
        self._lock = asyncio.Lock()

    @classmethod
    def create(cls, directory: Path, meta: CollectionMeta, writer: ThreadPoolExecutor) -> Collection:
        directory.mkdir(parents=True)
        temporary = directory / (META_NAME + ".tmp")
        temporary.write_bytes(meta.dump())
        temporary.replace(directory / META_NAME)
        fsync_dir(directory)
        fsync_dir(directory.parent)
        collection = cls(directory, meta, writer)
        collection.store.open_wal()
        return collection

    def load(self) -> None:
        """Snapshot, then the WAL on top. Runs in the writer thread at start-up."""
        try:
            snapshot = self.store.read_snapshot()
            for namespace, items in snapshot.shards.items():
                shard = self._shard(namespace)
                for item_id, meta, vector, display in zip(*items, strict=True):
                    shard.upsert(item_id, vector, meta, display)
            self.seq = snapshot.seq
            replayed = 0
            for record in self.store.replay():
                if record.seq > self.seq:
                    self._apply(record)
                    self.seq = record.seq
                    replayed += 1
            self.records_since_snapshot = replayed
            if self.store.snapshot_path.exists():
                self.last_snapshot = self.store.snapshot_path.stat().st_mtime
        except (CorruptIndex, ValueError, KeyError) as exc:
            self.fail(f"collection '{self.meta.name}' cannot be loaded: {exc}")
            return
        except OSError as exc:  # the reason without the path: readiness and API errors show no file names
            log.error("collection %s: %s", self.meta.name, exc)
            self.fail(f"collection '{self.meta.name}' cannot be loaded: {exc.strerror or 'I/O error'}")
            return
        self.store.open_wal()
        log.info("collection %s: %d items, %d WAL records replayed", self.meta.name, self.count_all(), replayed)

    def fail(self, reason: str) -> None:
        self.state, self.error = "corrupt", reason
        log.error("%s", reason)

    def _shard(self, namespace: str) -> Shard:
        shard = self.shards.get(namespace)
        if shard is None:
            shard = self.shards[namespace] = Shard(self.meta.dim, self.meta.index)
        return shard

    def _apply(self, record: Record) -> None:
        if record.op == "upsert":
            assert record.vector is not None
            self._shard(record.namespace).upsert(record.item_id, record.vector, record.metadata or {}, record.display)
        else:
            shard = self.shards.get(record.namespace)
            if shard is not None:
                shard.delete(record.item_id)

    def count_all(self) -> int:
        return sum(len(shard) for shard in self.shards.values())

    async def write(self, records: list[Record]) -> None:
        """Sequence, then log + fsync + apply in the writer thread. Returns only once the records are durable.
        Applying there too keeps the shard locks (which a long search holds) off the event loop."""
        async with self._lock:
            first = self.seq + 1
            for offset, record in enumerate(records):
                record.seq = first + offset
            await asyncio.get_running_loop().run_in_executor(self._writer, self._append_and_apply, records)

    def _append_and_apply(self, records: list[Record]) -> None:
        self.store.append(records)  # raises before anything is applied or counted
        self.seq += len(records)
        for record in records:
            self._apply(record)
        self.records_since_snapshot += len(records)

    async def snapshot(self) -> None:
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write_snapshot)

    def _write_snapshot(self) -> None:
        shards = {ns: shard.items() for ns, shard in self.shards.items() if len(shard)}
        self.store.write_snapshot(Snapshot(seq=self.seq, shards=shards))
        self.records_since_snapshot = 0
        self.last_snapshot = time.time()

    def wants_snapshot(self, every: int) -> bool:
        return self.records_since_snapshot >= every

    def cached_count(self) -> int | None:
        return self.count_all()

    async def get(self, namespace: str, item_id: str) -> Hit | None:
        return await asyncio.to_thread(self._get, namespace, item_id)  # the shard lock: off the event loop

    def _get(self, namespace: str, item_id: str) -> Hit | None:
        shard = self.shards.get(namespace)
        return shard.get(item_id) if shard is not None else None

    async def search(
        self,
        namespace: str,
        query: np.ndarray,
        top_k: int,
        conditions: list[Condition],
        with_vectors: bool,
        with_displays: bool = False,
    ) -> list[Hit]:
        shard = self.shards.get(namespace)
        if shard is None:
            return []
        hits = await asyncio.to_thread(shard.search, query, top_k, predicate(conditions))
        if with_vectors and with_displays:
            return hits
        # The rows hold both in memory; the contract hands back only what was asked for, as Milvus does.
        return [
            dataclasses.replace(
                hit, vector=hit.vector if with_vectors else None, display=hit.display if with_displays else None
            )
            for hit in hits
        ]

    async def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return self.count_all()
        shard = self.shards.get(namespace)
        return len(shard) if shard is not None else 0

    def close(self) -> None:
        self.store.close()
