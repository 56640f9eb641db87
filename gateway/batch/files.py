"""Stored files' bytes on disk, one file per id under `<batch.dir>/files`. Every call blocks (copies, fsync,
unlink): callers run them in a thread.

A file is written to a `.part` name, fsynced and renamed, and only then registered in the store; a deletion
unregisters first and unlinks after. Either way a crash can leave bytes no row names, never a row without its
bytes, and `sweep` (at start) removes such bytes: a deleted file's bytes do not outlive it on disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from gateway.batch.protocol import FILE_ID_RE
from gateway.durability import fsync_dir

PART = ".part"


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root / "files"

    def path(self, file_id: str) -> Path:
        if FILE_ID_RE.fullmatch(file_id) is None:  # ids are ours; anything else never names a path
            raise ValueError("not a file id")
        return self.root / file_id

    def store(self, source: BinaryIO, file_id: str) -> int:
        """Copy `source` to the file's place durably; returns its size."""
        return self._durably(file_id, lambda out: shutil.copyfileobj(source, out, 1024 * 1024))

    def write_lines(self, file_id: str, lines: Iterable[bytes]) -> int:
        """Write `lines` (each ending in a newline) as the file `file_id`, durably; returns its size."""
        return self._durably(file_id, lambda out: out.writelines(lines))

    def _durably(self, file_id: str, write: Callable[[BinaryIO], object]) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(file_id)
        part = final.with_name(final.name + PART)
        with part.open("wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        part.replace(final)
        fsync_dir(self.root)
        return size

    def remove(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)

    def sweep(self, known: set[str]) -> int:
        """Remove bytes that no stored file names (left by a crash mid-upload or mid-delete); returns how many."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for entry in self.root.iterdir():
            if entry.name not in known and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed
