"""The embedded engine: FAISS collections in this process, one directory each under `search.index_dir`, written
by one writer thread (gateway/search/collection.py holds the WAL and snapshot discipline)."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.errors import Conflict
from gateway.search.backend import CollectionMeta, StoredCollection
from gateway.search.collection import META_NAME, Collection
from gateway.search.config import IndexSpec


def _reason(exc: Exception) -> str:
    """Why a collection cannot load, without file paths (readiness and API errors show no file names)."""
    if isinstance(exc, OSError):
        return exc.strerror or "I/O error"
    return str(exc)


class FaissBackend:
    name = "faiss"

    def __init__(self, index_dir: Path) -> None:
        self.index_dir = index_dir
        self.collections: dict[str, Collection] = {}
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="index-writer")
        self._creating: set[str] = set()

    async def start(self) -> None:
        root = self.index_dir
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

    async def stop(self) -> None:
        for collection in self.collections.values():
            collection.close()
        self._writer.shutdown(wait=True)

    async def lookup(self, name: str) -> StoredCollection | None:
        return self.collections.get(name)

    async def listing(self) -> list[StoredCollection]:
        return list(self.collections.values())

    def known(self) -> list[StoredCollection]:
        return list(self.collections.values())

    def reserve(self, name: str) -> None:
        """Claim a name before the first await: two concurrent creates of one name must not both reach the
        directory (the second would remove the first one's files as crash leftovers)."""
        if name in self.collections or name in self._creating:
            raise Conflict(f"The collection '{name}' already exists.", param="name")
        self._creating.add(name)

    async def collection_count(self) -> int:
        return len(self.collections) + len(self._creating)

    async def create(self, meta: CollectionMeta) -> StoredCollection:
        directory = self.index_dir / meta.name
        if directory.exists():  # leftovers of a deletion interrupted by a crash
            shutil.rmtree(directory)
        collection = await asyncio.get_running_loop().run_in_executor(
            self._writer, Collection.create, directory, meta, self._writer
        )
        self.collections[meta.name] = collection
        return collection

    def release(self, name: str) -> None:
        self._creating.discard(name)

    async def drop(self, collection: StoredCollection) -> None:
        assert isinstance(collection, Collection)
        del self.collections[collection.meta.name]
        collection.close()
        await asyncio.get_running_loop().run_in_executor(self._writer, shutil.rmtree, collection.directory)

    def problems(self) -> list[str]:
        return []
