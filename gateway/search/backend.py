"""What the search service needs from an index engine: a catalogue of collections, and per collection durable
writes, lookups and vector search within one namespace.

Two engines implement it: FAISS in this process with its own WAL and snapshots (`faiss_backend.py`, the embedded
default) and Milvus, embedded as Milvus Lite or a server or cluster (`milvus_backend.py`). The service above them
(`service.py`) owns everything else — validation, embedding, tenancy, scopes, metrics — so both answer alike.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from gateway.search.collection import CollectionMeta
from gateway.search.filters import Condition
from gateway.search.index import Hit
from gateway.search.store import Record


class StoredCollection(Protocol):
    meta: CollectionMeta
    state: str  # "ready", or why it is not served ("corrupt", "encoder_mismatch")
    error: str | None
    last_snapshot: float  # when it was last made durable in bulk (a FAISS snapshot, a Milvus flush)

    async def write(self, records: list[Record]) -> None:
        """Returns once every record is durable; raises (and acknowledges nothing) otherwise."""

    async def get(self, namespace: str, item_id: str) -> Hit | None: ...

    async def search(
        self,
        namespace: str,
        query: np.ndarray,
        top_k: int,
        conditions: list[Condition],
        with_vectors: bool,
        with_displays: bool = False,
    ) -> list[Hit]: ...

    async def count(self, namespace: str | None = None) -> int: ...

    async def snapshot(self) -> None: ...

    def wants_snapshot(self, every: int) -> bool:
        """Whether at least `every` writes came since the last snapshot (one is then taken in the background)."""

    def cached_count(self) -> int | None:
        """All namespaces' items, when known without a query (for the items gauge)."""

    def close(self) -> None: ...


class IndexBackend(Protocol):
    name: str  # "faiss" | "milvus", the `backend` label on metrics

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def lookup(self, name: str) -> StoredCollection | None: ...

    async def listing(self) -> list[StoredCollection]:
        """Every collection, asked of the engine (for Milvus, including those other gateways created)."""

    def known(self) -> list[StoredCollection]:
        """The collections this process holds or has looked up, without I/O (for readiness)."""

    def reserve(self, name: str) -> None:
        """Claim a name in this process before creating it; Conflict if a create of it is under way."""

    def release(self, name: str) -> None: ...

    async def collection_count(self) -> int:
        """Collections, counting those being created."""

    async def create(self, meta: CollectionMeta) -> StoredCollection:
        """Raises Conflict if the name is taken (in this process or, for Milvus, by another gateway)."""

    async def drop(self, collection: StoredCollection) -> None: ...

    def problems(self) -> list[str]:
        """Why the engine itself cannot serve (unreachable, not started), for readiness."""
