"""One namespace's items in one collection: vectors, ids, metadata, and an optional FAISS accelerator.

Rows are appended; an upsert of a known id retires its old row, a delete retires the row. Exact search scores
every live row (inner product on L2-normalised vectors = cosine). An HNSW or IVF index, when the collection asks
for one, covers a frozen prefix of rows and is rebuilt in a background thread; rows added since are searched
exactly (the "delta"), so a search never waits for a build and never sees a half-built index: the new one is
swapped in under the lock once complete.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.search.backend import Hit
from gateway.search.config import IndexSpec
from gateway.search.filters import Predicate
from gateway.search.store import ShardItems


class Shard:
    def __init__(self, dim: int, spec: IndexSpec) -> None:
        self.dim = dim
        self.spec = spec
        self._lock = threading.RLock()
        self._vectors = np.zeros((64, dim), np.float32)
        self._alive = np.zeros(64, bool)
        self._ids: list[str] = []
        self._metadata: list[dict[str, Any]] = []
        self._displays: list[bytes | None] = []  # display copies of image items (bounded per item in bytes)
        self.display_bytes = 0  # of live rows' display copies
        self._rows: dict[str, int] = {}
        self._dead = 0  # retired rows, counted as they retire (summing the mask per query costs ~0.5 ms at 1M)
        self._ann: Any = None
        self._ann_rows = 0  # rows [0, _ann_rows) are covered by _ann
        self._building = False

    def __len__(self) -> int:
        return len(self._rows)

    # -- writes (the collection's single writer calls these) -----------------------------------------------
    def upsert(self, item_id: str, vector: np.ndarray, metadata: dict[str, Any], display: bytes | None = None) -> None:
        with self._lock:
            old = self._rows.get(item_id)
            if old is not None:
                self._retire(old)
            row = len(self._ids)
            if row == len(self._alive):
                self._vectors = np.concatenate([self._vectors, np.zeros_like(self._vectors)])
                self._alive = np.concatenate([self._alive, np.zeros_like(self._alive)])
            self._vectors[row] = vector
            self._alive[row] = True
            self._ids.append(item_id)
            self._metadata.append(metadata)
            self._displays.append(display)
            self.display_bytes += len(display or b"")
            self._rows[item_id] = row
        self._maybe_rebuild()

    def delete(self, item_id: str) -> bool:
        with self._lock:
            row = self._rows.pop(item_id, None)
            if row is None:
                return False
            self._retire(row)
            return True

    def _retire(self, row: int) -> None:
        """A retired row keeps its vector slot (rows are never rewritten) but not its display copy."""
        self._alive[row] = False
        self._dead += 1
        self.display_bytes -= len(self._displays[row] or b"")
        self._displays[row] = None

    # -- reads ---------------------------------------------------------------------------------------------
    def get(self, item_id: str) -> Hit | None:
        with self._lock:
            row = self._rows.get(item_id)
            if row is None:
                return None
            return Hit(item_id, 1.0, self._metadata[row], self._vectors[row].copy(), self._displays[row])

    def items(self) -> ShardItems:
        """Live items in row order (what a snapshot stores)."""
        with self._lock:
            rows = sorted(self._rows.values())
            return ShardItems(
                [self._ids[r] for r in rows],
                [self._metadata[r] for r in rows],
                self._vectors[rows].copy(),
                [self._displays[r] for r in rows],
            )

    def search(self, query: np.ndarray, top_k: int, where: Predicate | None) -> list[Hit]:
        """Scores rows [0, count) as of the call. Only references and the liveness mask are taken under the lock:
        rows below `count` are never rewritten (an upsert appends, growing swaps in a new array), so the filter
        and the scoring run without it and a slow filter never holds up writers or readers."""
        with self._lock:
            count = len(self._ids)
            if count == 0 or not self._rows:
                return []
            view = _View(self._vectors, self._alive[:count].copy(), self._ids, self._metadata, self._displays, count)
            ann, ann_rows, dead = self._ann, self._ann_rows, self._dead
        mask = view.alive
        if where is not None:
            metadata = view.metadata
            mask &= np.fromiter((where(metadata[r]) for r in range(count)), bool, count)
        if ann is not None and where is None:
            rows, scores = _ann_candidates(view, ann, ann_rows, dead, query, top_k, mask)
        else:
            rows, scores = _exact(view.vectors, query, top_k, mask, 0, count)
        return [
            Hit(view.ids[r], float(s), view.metadata[r], view.vectors[r].copy(), view.displays[r])
            for r, s in zip(rows, scores, strict=True)
        ]

    # -- the accelerator -----------------------------------------------------------------------------------
    def _maybe_rebuild(self) -> None:
        if self.spec.kind == "flat" or self._building:
            return
        count = len(self._ids)
        if count < self.spec.min_rows_for_ann or count - self._ann_rows < max(1, self._ann_rows // 10):
            return
        self._building = True
        threading.Thread(target=self._rebuild, name="faiss-build", daemon=True).start()

    def _rebuild(self) -> None:
        try:
            with self._lock:
                covered = len(self._ids)
                vectors = self._vectors[:covered].copy()
            index = self.spec.build(self.dim, vectors)  # slow part, outside the lock
            with self._lock:
                self._ann, self._ann_rows = index, covered
        finally:
            self._building = False
        self._maybe_rebuild()


@dataclass(slots=True)
class _View:
    """What one search reads: the arrays and lists as they were under the lock, and its own liveness mask."""

    vectors: np.ndarray
    alive: np.ndarray
    ids: list[str]
    metadata: list[dict[str, Any]]
    displays: list[bytes | None]
    count: int


def _exact(
    vectors: np.ndarray, query: np.ndarray, top_k: int, mask: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors[start:stop] @ query
    scores[~mask[start:stop]] = -np.inf
    k = min(top_k, int(mask[start:stop].sum()))
    if k == 0:
        return np.zeros(0, int), np.zeros(0, np.float32)
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best])]
    return best + start, scores[best]


def _ann_candidates(
    view: _View, ann: Any, covered: int, dead: int, query: np.ndarray, top_k: int, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    fetch = min(covered, top_k + min(dead, covered) + 8)  # enough to survive retired rows
    scores, rows = ann.search(query.reshape(1, -1), fetch)
    keep = (rows[0] >= 0) & mask[np.clip(rows[0], 0, None)]
    ann_rows, ann_scores = rows[0][keep], scores[0][keep]
    delta_rows, delta_scores = _exact(view.vectors, query, top_k, mask, covered, view.count)
    all_rows = np.concatenate([ann_rows, delta_rows])
    all_scores = np.concatenate([ann_scores, delta_scores])
    order = np.argsort(-all_scores)[:top_k]
    return all_rows[order], all_scores[order]
