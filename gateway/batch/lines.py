"""A batch's input lines, checked at create and read back while it runs, and the records its output files hold.

All of it is O(file) work: callers run it in a thread. Lines are read one at a time with a bounded `readline`, so
memory holds at most one line beyond the cap, whatever the file.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.batch.protocol import MAX_CUSTOM_ID
from gateway.errors import InvalidRequest

ModelCheck = Callable[[str, str], str | None]  # (endpoint, model) -> why the key may not use it, or None


@dataclass(frozen=True, slots=True)
class InputSummary:
    lines: int
    model: str


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based, as the file's lines are counted
    custom_id: str
    body: dict[str, Any]


def _refuse(number: int, why: str) -> InvalidRequest:
    return InvalidRequest(f"Line {number} of the input file: {why}", param="input_file_id", code="invalid_batch_input")


def _raw_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(number, line) for each non-blank line; a line longer than the cap is returned cut, one byte over it."""
    with path.open("rb") as source:
        number = 0
        while raw := source.readline(max_line_bytes + 2):
            number += 1
            if len(raw) > max_line_bytes + 1 or (len(raw) == max_line_bytes + 1 and not raw.endswith(b"\n")):
                yield number, raw  # over the cap: the caller refuses it before parsing
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = source.readline(1024 * 1024)
                continue
            if raw.strip():
                yield number, raw


def _parse(number: int, raw: bytes, endpoint: str, max_line_bytes: int) -> Line:
    if len(raw.rstrip(b"\r\n")) > max_line_bytes:
        raise _refuse(number, f"longer than {max_line_bytes} bytes (the online request body limit).")
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _refuse(number, "not valid JSON (the file must be JSONL: one JSON object per line).") from None
    if not isinstance(request, dict):
        raise _refuse(number, "not a JSON object.")
    custom_id, method, url, body = (request.get(k) for k in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise _refuse(number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters.")
    if method != "POST":
        raise _refuse(number, "method must be POST.")
    if url != endpoint:
        raise _refuse(number, f"url {str(url)[:100]!r} is not the batch's endpoint {endpoint}.")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _refuse(number, "body must be a JSON object naming a model.")
    if body.get("stream"):
        raise _refuse(number, "streaming is not available inside a batch.")
    return Line(number, custom_id, body)


def check_input(
    path: Path, endpoint: str, *, max_lines: int, max_line_bytes: int, model_check: ModelCheck
) -> InputSummary:
    """The whole file checked as `create` must: JSONL, one endpoint, one model the key may use, unique custom_ids,
    every line within the online body limit and the line count within the batch limit. Raises naming the line."""
    seen: dict[bytes, int] = {}  # custom_id digests: bounded per entry however long the ids are
    model: str | None = None
    count = 0
    for number, raw in _raw_lines(path, max_line_bytes):
        line = _parse(number, raw, endpoint, max_line_bytes)
        count += 1
        if count > max_lines:
            raise _refuse(number, f"a batch holds at most {max_lines} requests.")
        digest = hashlib.blake2b(line.custom_id.encode(), digest_size=16).digest()
        if digest in seen:
            raise _refuse(number, f"custom_id {line.custom_id[:100]!r} is also on line {seen[digest]}.")
        seen[digest] = number
        name = line.body["model"]
        if model is None:
            why = model_check(endpoint, name)
            if why is not None:
                raise _refuse(number, why)
            model = name
        elif name != model:
            raise _refuse(number, f"model {name[:100]!r} differs from {model[:100]!r}; a batch runs one model.")
    if model is None:
        raise InvalidRequest("The input file holds no requests.", param="input_file_id", code="invalid_batch_input")
    return InputSummary(count, model)


def read_lines(path: Path, endpoint: str, max_line_bytes: int, skip: set[int]) -> Generator[Line, None, None]:
    """The file's requests not in `skip`, in order (the file was checked at create and is not changed since)."""
    for number, raw in _raw_lines(path, max_line_bytes):
        if number not in skip:
            yield _parse(number, raw, endpoint, max_line_bytes)


def request_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def response_record(custom_id: str, status: int, request: str, body: bytes) -> bytes:
    """An output (2xx) or error-file (other status) line, as OpenAI writes them."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = body.decode("utf-8", "replace")
    response = {"status_code": status, "request_id": request, "body": parsed}
    return orjson.dumps({"id": request, "custom_id": custom_id, "response": response, "error": None}) + b"\n"


def error_record(custom_id: str, code: str, message: str) -> bytes:
    """An error-file line for a request that got no response."""
    error = {"code": code, "message": message}
    return orjson.dumps({"id": request_id(), "custom_id": custom_id, "response": None, "error": error}) + b"\n"
