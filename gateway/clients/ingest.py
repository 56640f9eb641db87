"""`gateway index add DIR_OR_GLOB --collection NAME`: send a folder of images (and captions) to a gateway.

It talks to the running gateway over HTTP, because the gateway is the collection's single writer. Item ids are
the files' paths relative to the folder, so re-running is idempotent; a progress file beside the images records
finished ids, so an interrupted run resumes where it stopped. It stays inside the folder: a symlink that leads
out of it is skipped unless `--follow-links` says otherwise. A file that is not an image the gateway accepts is
skipped and counted, and the run goes on.
"""

from __future__ import annotations

import base64
import csv
import glob
import io
import json
import mimetypes
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


@dataclass
class IngestResult:
    sent: int
    skipped: int
    seconds: float
    not_images: int = 0  # files that were not images, or that the gateway refused as images
    outside: int = 0  # symlinks leading out of the folder, not followed

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def find_images(source: str, follow_links: bool = False) -> tuple[Path, list[Path], int]:
    """(root the ids are relative to, image files in a stable order, symlinks out of the root left out)."""
    path = Path(source)
    if path.is_dir():
        root = path
        files = [p for p in _walk(path) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    else:
        files = [Path(p) for p in glob.glob(source, recursive=True)]
        files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        root = Path(glob.escape(source.split("*")[0]) or ".").parent if "*" in source else path.parent
    if follow_links:
        return root, sorted(files), 0
    real_root = root.resolve()
    inside = [p for p in files if p.resolve().is_relative_to(real_root)]
    return root, sorted(inside), len(files) - len(inside)


def _walk(root: Path) -> Iterator[Path]:
    """Every file below `root`, through linked folders too (each real folder once, so a link loop ends); whether
    a file outside the folder is kept is `find_images`' decision."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        yield from (Path(folder, name) for name in names)


def read_captions(path: Path | None) -> dict[str, str]:
    """`file,caption` CSV or JSON lines `{"file": ..., "caption": ...}`, keyed by file name or relative path."""
    if path is None:
        return {}
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {row["file"]: row["caption"] for row in rows}
    with path.open(newline="") as handle:
        return {row[0]: row[1] for row in csv.reader(handle) if len(row) >= 2}


def thumbnail(data: bytes, size: int = 128) -> str:
    """A small JPEG data URL (a few KB) kept in the item's metadata, so a results page can show the image."""
    image = Image.open(io.BytesIO(data))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _items(
    root: Path, files: list[Path], captions: dict[str, str], done: set[str], unreadable: list[str]
) -> Iterator[dict[str, Any]]:
    for file in files:
        item_id = file.relative_to(root).as_posix()
        if item_id in done:
            continue
        mime = mimetypes.guess_type(file.name)[0] or "image/png"
        data = file.read_bytes()
        try:
            small = thumbnail(data)
        except (OSError, ValueError, Image.DecompressionBombError):  # not an image (or not one Pillow reads)
            unreadable.append(item_id)
            continue
        url = f"data:{mime};base64," + base64.b64encode(data).decode()
        caption = captions.get(item_id) or captions.get(file.name)
        metadata: dict[str, Any] = {"kind": "image", "path": item_id, "thumbnail": small}
        if caption:
            metadata["caption"] = caption
        yield {"id": item_id, "image_url": url, "metadata": metadata}
        if caption:  # the caption as its own item, for image -> text retrieval
            metadata = {"kind": "caption", "path": item_id, "caption": caption}
            yield {"id": f"{item_id}#caption", "text": caption, "metadata": metadata}


def ingest(
    source: str,
    collection: str,
    url: str,
    api_key: str | None,
    *,
    captions: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    follow_links: bool = False,
) -> IngestResult:
    from tqdm import tqdm

    root, files, outside = find_images(source, follow_links)
    progress_file = root / f".gateway-index-{collection}.done"
    done = set(progress_file.read_text().splitlines()) if progress_file.exists() else set()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300)
    listing = client.get("/v1/collections")
    if listing.status_code == 200:
        names = {c["name"] for c in listing.json()["data"]}
        if collection not in names:
            client.post("/v1/collections", json={"name": collection}).raise_for_status()
    todo = [f for f in files if f.relative_to(root).as_posix() not in done]
    started, sent = time.perf_counter(), 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress)
    batch: list[dict[str, Any]] = []
    unreadable: list[str] = []
    with progress_file.open("a") as record:

        def send(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """The items the gateway took: a batch it refuses as bad input is sent again item by item, and the
            items it refuses alone are counted and left out (the run goes on)."""
            response = client.post(f"/v1/collections/{collection}/items", json={"items": items})
            if response.status_code == 200:
                return items
            if response.status_code in (400, 413, 422) and len(items) > 1:
                return [item for one in items for item in send([one])]
            if response.status_code in (400, 413, 422):
                unreadable.append(items[0]["id"])
                return []
            raise RuntimeError(f"gateway refused a batch: {response.status_code} {response.text[:300]}")

        def flush() -> None:
            nonlocal sent
            if not batch:
                return
            taken = send(list(batch))
            images = [item["id"] for item in taken if item["metadata"]["kind"] == "image"]
            record.write("".join(f"{i}\n" for i in images))
            record.flush()
            sent += len(images)
            bar.update(len(images))
            batch.clear()

        for item in _items(root, todo, read_captions(captions), done, unreadable):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
    bar.close()
    not_images = len({i.removesuffix("#caption") for i in unreadable})
    return IngestResult(sent, len(files) - len(todo), time.perf_counter() - started, not_images, outside)
