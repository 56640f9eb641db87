"""Job state: files, batches and per-line results in one SQLite database (WAL, synchronous=FULL), owned by one
thread.

A line is done when its result row is committed: the commit is durable (fsync of the WAL) before the executor
moves on, and a result is keyed by (batch, line) and inserted once, so after `kill -9` at any moment the executor
resumes with exactly the lines that have no row, and the output file written from the rows holds each custom_id
once. SQLite calls block, so every call runs on the store's own thread, off the event loop, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.batch.protocol import ACTIVE

T = TypeVar("T")
# Given the batch's results in line order (line, ok, record), writes its files and returns their rows by role:
# "output", "error" (None when it has none) and "unfinished", the lines written to the error file as expired.
OutputWriter = Callable[[Iterator[tuple[int, bool, bytes]]], dict[str, Any]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    owner TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_namespace ON files (namespace, seq);
CREATE INDEX IF NOT EXISTS files_by_owner ON files (owner);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    owner TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER,
    expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT,
    total INTEGER NOT NULL, completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    metadata TEXT, errors TEXT
);
CREATE INDEX IF NOT EXISTS batches_by_namespace ON batches (namespace, seq);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
"""
JSON_COLUMNS = ("metadata", "errors")
ACTIVE_SQL = "(" + ", ".join(f"'{status}'" for status in ACTIVE) + ")"


def _row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
    row = {column[0]: value for column, value in zip(cursor.description, values, strict=True)}
    for name in JSON_COLUMNS:
        if row.get(name) is not None:
            row[name] = orjson.loads(row[name])
    return row


class BatchStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-store")
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            db.row_factory = _row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            self._db = db
        return work(self._db)

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        def closing(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self._run(closing)
        self._thread.shutdown(wait=True)

    # -- files ------------------------------------------------------------------------------------------------

    async def add_file(self, row: dict[str, Any]) -> None:
        await self._run(lambda db: _insert(db, "files", row))

    async def file(self, file_id: str, namespace: str) -> dict[str, Any] | None:
        query = "SELECT * FROM files WHERE id=? AND namespace=?"
        return await self._run(lambda db: _one(db, query, file_id, namespace))

    async def files(self, namespace: str, limit: int, after: str | None, purpose: str | None) -> list[dict[str, Any]]:
        def listing(db: sqlite3.Connection) -> list[dict[str, Any]]:
            query, args = "SELECT * FROM files WHERE namespace=?", [namespace]
            if purpose is not None:
                query += " AND purpose=?"
                args.append(purpose)
            if after is not None:
                query += " AND seq < (SELECT seq FROM files WHERE id=? AND namespace=?)"
                args += [after, namespace]
            return db.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()

        return await self._run(listing)

    async def file_ids(self) -> set[str]:
        rows = await self._run(lambda db: db.execute("SELECT id FROM files").fetchall())
        return {row["id"] for row in rows}

    async def stored_bytes(self, owner: str) -> int:
        query = "SELECT COALESCE(SUM(bytes), 0) AS n FROM files WHERE owner=?"
        found = await self._run(lambda db: _one(db, query, owner))
        return int(found["n"]) if found else 0

    async def delete_file(self, file_id: str, namespace: str) -> bool:
        def deleting(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM files WHERE id=? AND namespace=?", (file_id, namespace)).rowcount > 0

        return await self._run(deleting)

    async def file_in_use(self, file_id: str) -> str | None:
        """The active batch reading `file_id` as its input, if any."""
        found = await self._run(
            lambda db: _one(
                db,
                f"SELECT id FROM batches WHERE input_file_id=? AND status IN {ACTIVE_SQL} LIMIT 1",  # noqa: S608
                file_id,
            )
        )
        return found["id"] if found else None

    # -- batches ----------------------------------------------------------------------------------------------

    async def add_batch(self, row: dict[str, Any]) -> None:
        await self._run(lambda db: _insert(db, "batches", row))

    async def batch(self, batch_id: str, namespace: str | None = None) -> dict[str, Any] | None:
        if namespace is None:
            return await self._run(lambda db: _one(db, "SELECT * FROM batches WHERE id=?", batch_id))
        return await self._run(
            lambda db: _one(db, "SELECT * FROM batches WHERE id=? AND namespace=?", batch_id, namespace)
        )

    async def batches(self, namespace: str, limit: int, after: str | None) -> list[dict[str, Any]]:
        def listing(db: sqlite3.Connection) -> list[dict[str, Any]]:
            query, args = "SELECT * FROM batches WHERE namespace=?", [namespace]
            if after is not None:
                query += " AND seq < (SELECT seq FROM batches WHERE id=? AND namespace=?)"
                args += [after, namespace]
            return db.execute(query + " ORDER BY seq DESC LIMIT ?", [*args, limit + 1]).fetchall()

        return await self._run(listing)

    async def open_batches(self, owner: str) -> int:
        found = await self._run(
            lambda db: _one(
                db,
                f"SELECT COUNT(*) AS n FROM batches WHERE owner=? AND status IN {ACTIVE_SQL}",  # noqa: S608
                owner,
            )
        )
        return int(found["n"]) if found else 0

    async def active(self) -> list[dict[str, Any]]:
        """Batches not yet in a final state, oldest first: what the executor (re)starts."""
        return await self._run(
            lambda db: db.execute(
                f"SELECT * FROM batches WHERE status IN {ACTIVE_SQL} ORDER BY seq"  # noqa: S608
            ).fetchall()
        )

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._run(
            lambda db: db.execute("SELECT status, COUNT(*) AS n FROM batches GROUP BY status").fetchall()
        )
        return {row["status"]: row["n"] for row in rows}

    async def move(
        self,
        batch_id: str,
        status: str,
        *,
        when: str | None = None,
        only_from: tuple[str, ...] = ACTIVE,
        **fields: Any,
    ) -> bool:
        """Set the batch's status (and the moment it reached it) if it is in one of `only_from`; False otherwise
        (a cancel that lost the race to completion changes nothing)."""
        values = {"status": status, **fields}
        if when is not None:
            values[when] = int(time.time())
        values = _encoded(values)
        assignments = ", ".join(f"{name}=?" for name in values)
        marks = ", ".join("?" for _ in only_from)

        def moving(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                f"UPDATE batches SET {assignments} WHERE id=? AND status IN ({marks})",  # noqa: S608 - our names
                [*values.values(), batch_id, *only_from],
            )
            return cursor.rowcount > 0

        return await self._run(moving)

    # -- results ----------------------------------------------------------------------------------------------

    async def record(self, batch_id: str, line: int, ok: bool, record: bytes) -> bool:
        """Commit one line's result (durable when this returns); False if the line already had one."""

        def recording(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                inserted = db.execute(
                    "INSERT OR IGNORE INTO results (batch_id, line, ok, record) VALUES (?, ?, ?, ?)",
                    (batch_id, line, int(ok), record),
                ).rowcount
                if inserted:
                    column = "completed" if ok else "failed"
                    db.execute(f"UPDATE batches SET {column}={column}+1 WHERE id=?", (batch_id,))  # noqa: S608
            return inserted > 0

        return await self._run(recording)

    async def done_lines(self, batch_id: str) -> set[int]:
        rows = await self._run(
            lambda db: db.execute("SELECT line FROM results WHERE batch_id=?", (batch_id,)).fetchall()
        )
        return {row["line"] for row in rows}

    async def finish(self, batch_id: str, status: str, when: str, write_outputs: OutputWriter) -> dict[str, Any]:
        """Write the output files from the batch's results (on the store's thread: O(lines) work, never on the
        event loop), then in one transaction register them, move the batch to its final state and drop the
        results. Redone after a crash before the commit, it rewrites the same files (their ids are the batch's)."""

        def finishing(db: sqlite3.Connection) -> dict[str, Any]:
            rows = db.execute("SELECT line, ok, record FROM results WHERE batch_id=? ORDER BY line", (batch_id,))
            written = write_outputs((row["line"], bool(row["ok"]), row["record"]) for row in rows)
            output, errors = written.get("output"), written.get("error")
            with _transaction(db):
                for file in (output, errors):
                    if file is not None:
                        db.execute("DELETE FROM files WHERE id=?", (file["id"],))
                        _insert(db, "files", file)
                db.execute(
                    f"UPDATE batches SET status=?, {when}=?, output_file_id=?, error_file_id=?, "  # noqa: S608
                    "failed=failed+? WHERE id=?",
                    (
                        status,
                        int(time.time()),
                        output["id"] if output else None,
                        errors["id"] if errors else None,
                        written.get("unfinished", 0),
                        batch_id,
                    ),
                )
                db.execute("DELETE FROM results WHERE batch_id=?", (batch_id,))
            found = _one(db, "SELECT * FROM batches WHERE id=?", batch_id)
            assert found is not None
            return found

        return await self._run(finishing)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (no upgrade from a read lock), committed or rolled back whole."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _encoded(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its JSON columns as JSON text, as they are stored."""
    return {k: (orjson.dumps(v).decode() if k in JSON_COLUMNS and v is not None else v) for k, v in row.items()}


def _insert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    values = _encoded(row)
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(values.values()))  # noqa: S608


def _one(db: sqlite3.Connection, query: str, *args: Any) -> dict[str, Any] | None:
    found: dict[str, Any] | None = db.execute(query, args).fetchone()
    return found
