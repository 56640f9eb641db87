"""What the search service needs from an index engine — a catalogue of collections, and per collection durable
writes, lookups and vector search within one namespace — and the types both engines speak (a collection's
document, a write, a hit).

Two engines implement it: FAISS in this process with its own WAL and snapshots (`faiss_backend.py`, the embedded
default) and Milvus, embedded as Milvus Lite or a server or cluster (`milvus_backend.py`). The service above them
(`service.py`) owns everything else — validation, embedding, tenancy, scopes, metrics — so both answer alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from pydantic import ValidationError

from gateway.search.config import IndexSpec
from gateway.search.filters import Condition

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as the API's collection names


@dataclass(frozen=True)
class CollectionMeta:
    name: str
    dim: int
    encoder: str | None  # the encoder whose vectors it holds; None for vector-only collections
    index: IndexSpec
    created: int
    owner: str | None = None  # the namespace whose admin created it; None (older collections): operators only

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "name": self.name,
                "dim": self.dim,
                "encoder": self.encoder,
                "index": self.index.model_dump(),
                "created": self.created,
                "owner": self.owner,
            }
        )

    @classmethod
    def load(cls, raw: bytes) -> CollectionMeta:
        """Parse and check a collection document; ValueError (with a reason fit for readiness) if malformed."""
        try:
            data = orjson.loads(raw)
            meta = cls(
                data["name"],
                data["dim"],
                data["encoder"],
                IndexSpec(**data["index"]),
                data["created"],
                data.get("owner"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError):
            raise ValueError("its collection document is malformed") from None
        valid = (
            isinstance(meta.name, str)
            and NAME_PATTERN.fullmatch(meta.name) is not None
            and isinstance(meta.dim, int)
            and 1 <= meta.dim <= 8192
            and (meta.encoder is None or isinstance(meta.encoder, str))
            and isinstance(meta.created, int)
            and (meta.owner is None or isinstance(meta.owner, str))
        )
        if not valid:
            raise ValueError("its collection document is malformed")
        return meta


@dataclass(slots=True)
class Hit:
    item_id: str
    score: float
    metadata: dict[str, Any]
    vector: np.ndarray | None  # None when a search did not ask for vectors
    display: bytes | None = None  # the image item's display copy, when one is stored


@dataclass(slots=True)
class Record:
    """One write to a collection, as both engines take it."""

    seq: int
    op: str  # "upsert" | "delete"
    namespace: str
    item_id: str
    metadata: dict[str, Any] | None = None
    vector: np.ndarray | None = None
    display: bytes | None = None  # an image item's display copy (JPEG), see gateway/search/display.py


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
