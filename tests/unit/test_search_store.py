"""The WAL and snapshot files on real disk: torn tails, damage, interrupted snapshots."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

from gateway.search.backend import Record
from gateway.search.store import (
    RECORD_HEADER,
    RECORD_MAGIC,
    SNAPSHOT_HEADER,
    SNAPSHOT_MAGIC,
    CollectionStore,
    CorruptIndex,
    ShardItems,
    Snapshot,
    encode_record,
)


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


def test_display_copies_ride_in_the_wal_record(tmp_path: Path) -> None:
    store = _store(tmp_path)
    picture = os.urandom(3000)
    written = _records(2)
    written[1].display = picture
    store.append(written)
    store.close()
    read = list(CollectionStore(tmp_path).replay())
    assert read[0].display is None and read[1].display == picture
    assert np.array_equal(read[1].vector, written[1].vector), "the display bytes do not bleed into the vector"


def test_files_written_before_display_copies_still_load(tmp_path: Path) -> None:
    """A WAL record and a snapshot in the earlier layout (no display fields) load with no display copies."""
    vector = np.arange(8, dtype="<f4")
    head = orjson.dumps({"seq": 1, "op": "upsert", "ns": "ns", "id": "old", "metadata": {"a": 1}})
    payload = head + b"\n" + vector.tobytes()
    (tmp_path / "wal.log").write_bytes(RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload)
    (record,) = CollectionStore(tmp_path).replay()
    assert record.item_id == "old" and record.display is None and np.array_equal(record.vector, vector)
    layout = {"seq": 1, "shards": {"ns": {"ids": ["old"], "metadata": [{}], "offset": 0, "rows": 1, "dim": 8}}}
    head = orjson.dumps(layout)
    body = SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, len(head)) + head + vector.tobytes()
    (tmp_path / "snapshot.bin").write_bytes(body + zlib.crc32(body).to_bytes(4, "little"))
    loaded = CollectionStore(tmp_path).read_snapshot().shards["ns"]
    assert loaded.ids == ["old"] and loaded.displays == [None] and np.array_equal(loaded.vectors[0], vector)


@pytest.mark.parametrize("cut", [1, 5, 11, 40])
def test_a_torn_last_record_is_cut_off(tmp_path: Path, cut: int) -> None:
    store = _store(tmp_path)
    store.append(_records(3))
    store.close()
    good_size = store.wal_path.stat().st_size
    tail = encode_record(_records(1, start=4)[0])
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
            "ns": ShardItems(
                [f"s{i}" for i in range(n)],
                [{"i": i} for i in range(n)],
                rng.normal(size=(n, 8)).astype(np.float32),
                [os.urandom(100 + i) if i % 3 == 0 else None for i in range(n)],
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
    ids, metadata, vectors, displays = loaded.shards["ns"]
    assert ids == original.shards["ns"].ids and metadata[3] == {"i": 3}
    assert np.array_equal(vectors, original.shards["ns"].vectors)
    assert displays == original.shards["ns"].displays, "display copies come back byte for byte, None where none"


def test_an_interrupted_snapshot_leaves_the_old_one_loadable(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_snapshot(_snapshot(7, 5))
    temporary = tmp_path / "snapshot.bin.tmp"
    temporary.write_bytes(b"GWSNAP01" + os.urandom(100))  # the crash came before the rename
    loaded = CollectionStore(tmp_path).read_snapshot()
    assert loaded.seq == 7 and len(loaded.shards["ns"].ids) == 5


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


async def test_a_collection_keeps_display_copies_through_the_wal_and_a_snapshot(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from gateway.search.backend import CollectionMeta
    from gateway.search.collection import Collection
    from gateway.search.config import IndexSpec

    meta = CollectionMeta("c", 8, None, IndexSpec(), 0, "ns")
    pictures = {f"id{i}": os.urandom(500 + i) for i in range(1, 5)}
    with ThreadPoolExecutor(1) as writer:
        collection = Collection.create(tmp_path / "c", meta, writer)
        records = _records(4)
        for record in records:
            record.display = pictures[record.item_id]
        await collection.write(records[:2])
        await collection.snapshot()
        await collection.write(records[2:])  # these two only in the WAL
        await collection.write([Record(0, "delete", "ns", "id1")])
        assert collection.shards["ns"].display_bytes == sum(len(pictures[f"id{i}"]) for i in (2, 3, 4))
        collection.close()
        reloaded = Collection(tmp_path / "c", meta, writer)
        reloaded.load()
        assert reloaded.state == "ready"
        for item_id in ("id2", "id3", "id4"):
            hit = await reloaded.get("ns", item_id)
            assert hit is not None and hit.display == pictures[item_id]
        assert await reloaded.get("ns", "id1") is None
        query = records[2].vector / np.linalg.norm(records[2].vector)
        found = await reloaded.search("ns", query, 1, [], False, with_displays=True)
        assert found[0].item_id == "id3" and found[0].display == pictures["id3"] and found[0].vector is None
        bare = await reloaded.search("ns", query, 1, [], False)
        assert bare[0].display is None, "only what was asked for, as the Milvus engine answers"
        reloaded.close()
