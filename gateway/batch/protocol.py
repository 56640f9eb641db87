"""OpenAI's Files and Batches shapes: requests bounded, objects written as OpenAI writes them, so the SDK's
`files.create` → `batches.create` → `batches.retrieve` → `files.content` works unchanged."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings")
Endpoint = Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]

# Unguessable (96 random bits) and recognisable; anything else is a 404 before any lookup.
FILE_ID = r"^file-[0-9a-f]{24}[oe]?$"
BATCH_ID = r"^batch_[0-9a-f]{24}$"
FileId = Annotated[str, StringConstraints(pattern=FILE_ID)]
BatchId = Annotated[str, StringConstraints(pattern=BATCH_ID)]
FILE_ID_RE = re.compile(FILE_ID)
BATCH_ID_RE = re.compile(BATCH_ID)

# completion_window: OpenAI takes "24h"; shorter windows ("30m", "90s") are accepted for jobs that are worth
# nothing later (and for tests of expiry).
WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smh])$")
MAX_WINDOW = 24 * 3600
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
MAX_CUSTOM_ID = 512
MAX_FILENAME = 255


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def derived_file_ids(batch_id: str) -> tuple[str, str]:
    """The output and error files' ids: fixed by the batch, so a finalisation redone after a crash rewrites the
    same files instead of leaving orphans."""
    token = batch_id.removeprefix("batch_")
    return f"file-{token}o", f"file-{token}e"


def window_seconds(window: str) -> int | None:
    match = WINDOW.fullmatch(window)
    if match is None:
        return None
    seconds = int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
    return seconds if seconds <= MAX_WINDOW else None


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: FileId
    endpoint: Endpoint
    completion_window: Annotated[str, StringConstraints(max_length=16)] = "24h"
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=16)  # OpenAI's bounds


@dataclass(frozen=True, slots=True)
class ListPage:
    limit: int
    after: str | None


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    errors = row.get("errors")
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row["model"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "in_progress_at": row["in_progress_at"],
        "expires_at": row["expires_at"],
        "finalizing_at": row["finalizing_at"],
        "completed_at": row["completed_at"],
        "failed_at": row["failed_at"],
        "expired_at": row["expired_at"],
        "cancelling_at": row["cancelling_at"],
        "cancelled_at": row["cancelled_at"],
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "metadata": row["metadata"],
    }


def page(objects: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's cursor page: `limit` objects, and whether more follow the last one (fetched: limit + 1)."""
    shown = objects[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(objects) > limit,
    }
