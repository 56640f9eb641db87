"""What makes a write survive a crash, written once for every store that needs it (search WAL and snapshots,
batch files)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """A file created, renamed or removed in `path` is durable only once the directory itself is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
