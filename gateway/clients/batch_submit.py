"""`gateway batch submit FILE --wait`: the Batch API for people without the SDK at hand — upload, create, then
(with --wait) a progress bar until the batch is final and the output and error files downloaded beside FILE."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

FINAL = ("completed", "failed", "expired", "cancelled")
POLL = 1.0


@dataclass(frozen=True, slots=True)
class Submitted:
    batch: dict[str, Any]
    output: Path | None = None
    errors: Path | None = None


class SubmitFailed(Exception):
    """The gateway refused a step; the message is its error, as it wrote it."""


def _checked(response: httpx.Response) -> dict[str, Any]:
    if response.is_success:
        body: dict[str, Any] = response.json()
        return body
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    raise SubmitFailed(f"{response.status_code}: {message}")


def submit(
    path: Path,
    url: str,
    api_key: str | None,
    *,
    endpoint: str = "/v1/chat/completions",
    window: str = "24h",
    wait: bool = False,
    progress: bool = True,
) -> Submitted:
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as client:
        with path.open("rb") as source:
            upload = _checked(client.post("/v1/files", data={"purpose": "batch"}, files={"file": (path.name, source)}))
        create = {"input_file_id": upload["id"], "endpoint": endpoint, "completion_window": window}
        batch = _checked(client.post("/v1/batches", json=create))
        if not wait:
            return Submitted(batch)
        counts = batch["request_counts"]
        with tqdm(total=counts["total"], unit="line", disable=not progress, desc=batch["id"]) as bar:
            while batch["status"] not in FINAL:
                time.sleep(POLL)
                batch = _checked(client.get(f"/v1/batches/{batch['id']}"))
                counts = batch["request_counts"]
                bar.update(counts["completed"] + counts["failed"] - bar.n)
                bar.set_postfix(status=batch["status"], failed=counts["failed"])
        output = _download(client, batch.get("output_file_id"), path.with_suffix(".output.jsonl"))
        errors = _download(client, batch.get("error_file_id"), path.with_suffix(".errors.jsonl"))
        return Submitted(batch, output, errors)


def _download(client: httpx.Client, file_id: str | None, to: Path) -> Path | None:
    if not file_id:
        return None
    with client.stream("GET", f"/v1/files/{file_id}/content") as response:
        if not response.is_success:
            response.read()
            _checked(response)
        with to.open("wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
    return to
