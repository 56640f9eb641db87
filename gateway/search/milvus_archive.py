"""`gateway index export|restore` against Milvus, in the FAISS archive format (gateway/search/archive.py), so a
collection moves between the engines both ways: FAISS -> archive -> Milvus, and Milvus -> archive -> FAISS.

With Milvus Lite (a file path) the gateway must be stopped first: Lite allows one process per database file.
"""

from __future__ import annotations

import asyncio
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.retrieval_settings import SearchSettings
from gateway.search.archive import export_collection, restore_collection
from gateway.search.backend import CollectionMeta, Record
from gateway.search.collection import META_NAME, Collection
from gateway.search.milvus_backend import MilvusBackend
from gateway.search.milvus_collection import MilvusCollection, display_of
from gateway.search.store import CollectionStore, ShardItems, Snapshot

BATCH = 1000


def export_from_milvus(settings: SearchSettings, name: str, archive: Path) -> int:
    return asyncio.run(_export(settings, name, archive))


def restore_into_milvus(settings: SearchSettings, archive: Path) -> tuple[str, int]:
    return asyncio.run(_restore(settings, archive))


async def _connected(settings: SearchSettings) -> MilvusBackend:
    backend = MilvusBackend(settings, GatewayMetrics())
    await backend.start()
    if backend.problems():
        await backend.stop()
        raise OSError(f"cannot reach Milvus at {settings.milvus_uri}: {backend.problems()[0]}")
    return backend


async def _export(settings: SearchSettings, name: str, archive: Path) -> int:
    backend = await _connected(settings)
    try:
        collection = await backend.lookup(name)
        if not isinstance(collection, MilvusCollection) or collection.state != "ready":
            raise FileNotFoundError(f"no collection '{name}' in Milvus at {settings.milvus_uri}")
        shards: dict[str, tuple[list[str], list[dict[str, Any]], list[np.ndarray], list[bytes | None]]] = {}
        async for rows in collection.rows(BATCH):
            for row in rows:
                ids, metadata, vectors, displays = shards.setdefault(row["namespace"], ([], [], [], []))
                ids.append(row["item_id"])
                metadata.append(orjson.loads(row["doc"]))
                vectors.append(np.asarray(row["vector"], np.float32))
                displays.append(display_of(row))
        meta = collection.meta
    except GatewayError as exc:
        raise OSError(exc.message) from None
    finally:
        await backend.stop()
    with tempfile.TemporaryDirectory() as staging:
        directory = Path(staging) / name
        directory.mkdir()
        (directory / META_NAME).write_bytes(meta.dump())
        snapshot = Snapshot(
            seq=sum(len(ids) for ids, *_ in shards.values()),
            shards={ns: ShardItems(ids, md, np.stack(vs), ds) for ns, (ids, md, vs, ds) in shards.items()},
        )
        CollectionStore(directory).write_snapshot(snapshot)
        CollectionStore(directory).close()
        return export_collection(Path(staging), name, archive)


async def _restore(settings: SearchSettings, archive: Path) -> tuple[str, int]:
    with tempfile.TemporaryDirectory() as staging:
        name = restore_collection(Path(staging), archive)  # checks the members and the collection document
        meta = CollectionMeta.load((Path(staging) / name / META_NAME).read_bytes())
        with ThreadPoolExecutor(1) as writer:
            loaded = Collection(Path(staging) / name, meta, writer)
            loaded.load()  # the snapshot, then the WAL on top, as a gateway would
            loaded.close()
        if loaded.state != "ready":
            raise ValueError(loaded.error or "the export cannot be loaded")
        backend = await _connected(settings)
        try:
            if await backend.lookup(name) is not None:
                raise FileExistsError(f"collection '{name}' already exists in Milvus at {settings.milvus_uri}")
            target = await backend.create(meta)
            restored = 0
            for namespace, shard in loaded.shards.items():
                items = shard.items()
                for start in range(0, len(items.ids), BATCH):
                    records = [
                        Record(0, "upsert", namespace, *item)
                        for item in zip(*(column[start : start + BATCH] for column in items), strict=True)
                    ]
                    await target.write(records)
                    restored += len(records)
            await target.snapshot()
            return name, restored
        except GatewayError as exc:
            raise OSError(exc.message) from None
        finally:
            await backend.stop()
