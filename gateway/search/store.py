"""Durability for one collection: a checksummed write-ahead log and atomic snapshots.

An acknowledged write is in the WAL and fsynced before the acknowledgement. A snapshot is written to a temporary
file, fsynced, renamed over the old one and the directory fsynced, so a crash leaves either the old snapshot or
the new one, never half of one; the WAL is then started afresh. At start-up the snapshot is loaded and the WAL
replayed on top. A torn last WAL record (a crash mid-append) fails its checksum and is cut off; damage anywhere
else, or a snapshot whose checksum fails, is reported as corruption rather than served as an empty index.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from gateway.durability import fsync_dir
from gateway.search.backend import Record

RECORD_HEADER = struct.Struct("<2sII")  # magic, payload length, crc32(payload)
RECORD_MAGIC = b"GW"
SNAPSHOT_MAGIC = b"GWSNAP01"
SNAPSHOT_HEADER = struct.Struct("<8sQ")  # magic, json length
WAL_NAME, SNAPSHOT_NAME = "wal.log", "snapshot.bin"


class CorruptIndex(Exception):
    """The collection's files are damaged beyond a torn final record."""


def encode_record(record: Record) -> bytes:
    """One WAL record: header (magic, length, checksum), then the fields as JSON, the vector, the display copy."""
    fields = {
        "seq": record.seq,
        "op": record.op,
        "ns": record.namespace,
        "id": record.item_id,
        "metadata": record.metadata,
    }
    if record.display:
        fields["display"] = len(record.display)  # its bytes follow the vector's
    head = orjson.dumps(fields)
    vector = record.vector.astype("<f4").tobytes() if record.vector is not None else b""
    payload = head + b"\n" + vector + (record.display or b"")
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_record(payload: bytes) -> Record:
    head, _, raw = payload.partition(b"\n")
    fields = orjson.loads(head)
    display = None
    if size := fields.get("display"):  # absent in records written before display copies existed
        raw, display = raw[:-size], raw[-size:]
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32) if raw else None
    return Record(fields["seq"], fields["op"], fields["ns"], fields["id"], fields["metadata"], vector, display)


class ShardItems(NamedTuple):
    """One namespace's live items in row order: what a snapshot stores."""

    ids: list[str]
    metadata: list[dict[str, Any]]
    vectors: np.ndarray  # [n, dim]
    displays: list[bytes | None]


@dataclass
class Snapshot:
    seq: int = 0
    # namespace -> its live items
    shards: dict[str, ShardItems] = field(default_factory=dict)


class CollectionStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.wal_path = directory / WAL_NAME
        self.snapshot_path = directory / SNAPSHOT_NAME
        self._wal: Any = None

    # -- WAL -------------------------------------------------------------------------------------------------
    def open_wal(self) -> None:
        self._wal = open(self.wal_path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the collection

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None

    def append(self, records: list[Record]) -> None:
        """Write and fsync; on any I/O error the log is cut back to where it was, and the error propagates."""
        assert self._wal is not None
        start = self._wal.tell()
        data = memoryview(b"".join(encode_record(record) for record in records))
        try:
            written = 0
            while written < len(data):
                # An unbuffered write may stop short (a full disk, a file-size limit) without raising.
                count = self._wal.write(data[written:])
                if not count:
                    raise OSError(errno.ENOSPC, "short write to the WAL")
                written += count
            os.fsync(self._wal.fileno())
        except OSError:
            try:
                self._wal.truncate(start)
                self._wal.seek(start)
            except OSError:
                pass
            raise

    def replay(self) -> Iterator[Record]:
        """Records in the WAL; a torn tail is truncated away, damage before it raises CorruptIndex."""
        if not self.wal_path.exists():
            return
        data = self.wal_path.read_bytes()
        offset = 0
        while offset < len(data):
            header_end = offset + RECORD_HEADER.size
            if header_end > len(data):
                break
            magic, length, crc = RECORD_HEADER.unpack_from(data, offset)
            payload = data[header_end : header_end + length]
            if magic != RECORD_MAGIC or len(payload) < length or zlib.crc32(payload) != crc:
                break
            yield decode_record(payload)
            offset = header_end + length
        if offset < len(data):
            if _any_valid_record_after(data, offset + 1):
                raise CorruptIndex(f"its write-ahead log has a damaged record at byte {offset} followed by valid ones")
            with open(self.wal_path, "r+b") as wal:
                wal.truncate(offset)
                os.fsync(wal.fileno())

    # -- snapshots -------------------------------------------------------------------------------------------
    def write_snapshot(self, snapshot: Snapshot) -> None:
        """Atomically replace the snapshot, then start an empty WAL (its records are all in the snapshot)."""
        layout: dict[str, Any] = {"seq": snapshot.seq, "shards": {}}
        blobs: list[bytes] = []
        offset = 0
        for namespace, items in snapshot.shards.items():
            blob = np.ascontiguousarray(items.vectors, dtype="<f4").tobytes()
            shard: dict[str, Any] = {
                "ids": items.ids,
                "metadata": items.metadata,
                "offset": offset,
                "rows": len(items.ids),
                "dim": int(items.vectors.shape[1]) if len(items.ids) else 0,
            }
            blobs.append(blob)
            offset += len(blob)
            if any(items.displays):  # their bytes follow the vectors; each row's length, 0 for none
                shard["displays"] = [len(d or b"") for d in items.displays]
                blobs.extend(d for d in items.displays if d)
                offset += sum(shard["displays"])
            layout["shards"][namespace] = shard
        head = orjson.dumps(layout)
        body = SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, len(head)) + head + b"".join(blobs)
        temporary = self.directory / (SNAPSHOT_NAME + ".tmp")
        with open(temporary, "wb") as out:
            out.write(body)
            out.write(struct.pack("<I", zlib.crc32(body)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.snapshot_path)
        fsync_dir(self.directory)
        self.close()
        fresh = self.directory / (WAL_NAME + ".tmp")
        with open(fresh, "wb") as out:
            os.fsync(out.fileno())
        os.replace(fresh, self.wal_path)
        fsync_dir(self.directory)
        self.open_wal()

    def read_snapshot(self) -> Snapshot:
        if not self.snapshot_path.exists():
            return Snapshot()
        data = self.snapshot_path.read_bytes()
        if len(data) < SNAPSHOT_HEADER.size + 4:
            raise CorruptIndex("its snapshot is truncated")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        magic, head_length = SNAPSHOT_HEADER.unpack_from(body)
        if magic != SNAPSHOT_MAGIC or zlib.crc32(body) != crc:
            raise CorruptIndex("its snapshot fails its checksum")
        layout = orjson.loads(body[SNAPSHOT_HEADER.size : SNAPSHOT_HEADER.size + head_length])
        blobs = memoryview(body)[SNAPSHOT_HEADER.size + head_length :]
        snapshot = Snapshot(seq=layout["seq"])
        for namespace, shard in layout["shards"].items():
            rows, dim, start = shard["rows"], shard["dim"], shard["offset"]
            end = start + rows * dim * 4
            vectors = np.frombuffer(blobs[start:end], dtype="<f4").reshape(rows, dim)
            displays: list[bytes | None] = []
            for size in shard.get("displays") or [0] * rows:  # none in snapshots older than display copies
                displays.append(bytes(blobs[end : end + size]) if size else None)
                end += size
            snapshot.shards[namespace] = ShardItems(
                shard["ids"], shard["metadata"], vectors.astype(np.float32), displays
            )
        return snapshot


def _any_valid_record_after(data: bytes, start: int) -> bool:
    at = data.find(RECORD_MAGIC, start)
    while at != -1:
        if at + RECORD_HEADER.size <= len(data):
            _, length, crc = RECORD_HEADER.unpack_from(data, at)
            payload = data[at + RECORD_HEADER.size : at + RECORD_HEADER.size + length]
            if len(payload) == length and zlib.crc32(payload) == crc:
                return True
        at = data.find(RECORD_MAGIC, at + 1)
    return False
