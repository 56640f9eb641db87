"""The WAL and snapshot files on real disk: torn tails, damage, interrupted snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from gateway.search.store import CollectionStore, CorruptIndex, Record, Snapshot


def _records(n: int, start: int = 1) -> list[Record]:
    rng = np.random.default_rng(start)
    return [
        Record(start + i, "upsert", "ns", f"id{start + i}", {"i": start + i}, rng.normal(size=8).astype(np.float32))
        for i in range(n)
    ]


def _store(tmp_path: Path) -> CollectionStore:
    store = CollectionStore(tmp_path)
    store.open_wal()
    return store


def test_records_round_trip(tmp_path: Path) -> None:
    store = _store(tmp_path)
    written = [*_records(5), Record(6, "delete", "ns", "id2")]
    store.append(written)
    store.close()
    read = list(CollectionStore(tmp_path).replay())
    assert [(r.seq, r.op, r.item_id, r.metadata) for r in read] == [
        (r.seq, r.op, r.item_id, r.metadata) for r in written
    ]
    assert np.array_equal(read[0].vector, written[0].vector) and read[-1].vector is None


@pytest.mark.parametrize("cut", [1, 5, 11, 40])
def test_a_torn_last_record_is_cut_off(tmp_path: Path, cut: int) -> None:
    store = _store(tmp_path)
    store.append(_records(3))
    store.close()
    good_size = store.wal_path.stat().st_size
    tail = _records(1, start=4)[0].encode()
    with open(store.wal_path, "ab") as wal:
        wal.write(tail[:cut])  # a crash in the middle of an append
    assert [r.seq for r in CollectionStore(tmp_path).replay()] == [1, 2, 3]
    assert store.wal_path.stat().st_size == good_size, "the torn bytes are truncated away"


def test_damage_before_valid_records_is_corruption(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append(_records(3))
    store.close()
    data = bytearray(store.wal_path.read_bytes())
    data[20] ^= 0xFF  # flip a byte inside the first record
    store.wal_path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndex):
        list(CollectionStore(tmp_path).replay())


def _snapshot(seq: int, n: int) -> Snapshot:
    rng = np.random.default_rng(seq)
    return Snapshot(
        seq=seq,
        shards={
            "ns": (
                [f"s{i}" for i in range(n)],
                [{"i": i} for i in range(n)],
                rng.normal(size=(n, 8)).astype(np.float32),
            )
        },
    )


def test_snapshot_round_trip_and_wal_reset(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.append(_records(4))
    original = _snapshot(4, 10)
    store.write_snapshot(original)
    assert store.wal_path.stat().st_size == 0
    loaded = CollectionStore(tmp_path).read_snapshot()
    assert loaded.seq == 4
    ids, metadata, vectors = loaded.shards["ns"]
    assert ids == original.shards["ns"][0] and metadata[3] == {"i": 3}
    assert np.array_equal(vectors, original.shards["ns"][2])


def test_an_interrupted_snapshot_leaves_the_old_one_loadable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_snapshot(_snapshot(7, 5))
    temporary = tmp_path / "snapshot.bin.tmp"
    temporary.write_bytes(b"GWSNAP01" + os.urandom(100))  # the crash came before the rename
    loaded = CollectionStore(tmp_path).read_snapshot()
    assert loaded.seq == 7 and len(loaded.shards["ns"][0]) == 5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_snapshot_is_refused_not_served_empty(tmp_path: Path, damage: str) -> None:
    store = _store(tmp_path)
    store.write_snapshot(_snapshot(3, 20))
    data = bytearray(store.snapshot_path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    store.snapshot_path.write_bytes(bytes(data))
    with pytest.raises(CorruptIndex):
        CollectionStore(tmp_path).read_snapshot()
