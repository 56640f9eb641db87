"""Copy a collection off the node and back: `gateway index export` / `gateway index restore`.

Safe while the gateway runs: the snapshot file is only ever replaced atomically, and the WAL is append-only with
checksummed records, so a copy taken mid-write restores to a prefix of acknowledged writes (a torn last record is
dropped at load).
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from gateway.search.backend import CollectionMeta
from gateway.search.collection import META_NAME
from gateway.search.store import SNAPSHOT_NAME, WAL_NAME

MEMBERS = (META_NAME, SNAPSHOT_NAME, WAL_NAME)


def export_collection(index_dir: Path, name: str, archive: Path) -> int:
    source = index_dir / name
    if not (source / META_NAME).is_file():
        raise FileNotFoundError(f"no collection '{name}' under {index_dir}")
    with tarfile.open(archive, "w:gz") as tar:
        for member in MEMBERS:  # metadata first, snapshot before WAL: the WAL copy is never older than it
            if (source / member).exists():
                tar.add(source / member, arcname=f"{name}/{member}")
    return archive.stat().st_size


def restore_collection(index_dir: Path, archive: Path) -> str:
    """Unpack into index_dir; refuses to overwrite an existing collection. Returns the collection's name."""
    with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory(dir=index_dir) as staging:
        names = {Path(m.name).parts[0] for m in tar.getmembers()}
        if len(names) != 1:
            raise ValueError("an export holds exactly one collection")
        name = names.pop()
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) != 2 or parts[1] not in MEMBERS or not member.isfile():
                raise ValueError(f"unexpected member in export: {member.name}")
        tar.extractall(staging, filter="data")
        meta = CollectionMeta.load((Path(staging) / name / META_NAME).read_bytes())  # ValueError if malformed
        if meta.name != name:
            raise ValueError("the export's collection document names another collection")
        target = index_dir / name
        if target.exists():
            raise FileExistsError(f"collection '{name}' already exists under {index_dir}")
        shutil.move(str(Path(staging) / name), target)
    return name
