"""Parse and check a generation request before any replica or media host is contacted.

Everything here is decided from the request and the pool's configuration alone: bounds (by the protocol models),
engine-steering fields, media counts and the context budget.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
from pydantic import ValidationError

from gateway.config import Modality, ModelPool
from gateway.errors import ContextLengthExceeded, InvalidRequest
from gateway.media.service import MediaPart
from gateway.protocol.chat import ChatCompletionRequest, CompletionRequest, ImagePart

Request = ChatCompletionRequest | CompletionRequest
MEDIA_NAMES = {"image": "image(s)", "video": "video(s)"}
UNION_BRANCH_LABELS = ("str", "int", "float", "bool", "dict", "list", "none")


def _param_from_loc(loc: tuple[int | str, ...]) -> str:
    """`messages[0].content[2].image_url` from pydantic's location, minus the union-branch labels it inserts."""
    path = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in UNION_BRANCH_LABELS or "[" in part or part.startswith(("function-", "literal")):
            continue
        elif part != previous:  # a tagged union repeats its tag ("image_url") before the field of that name
            path += f".{part}" if path else part
        previous = part
    return path


def validation_error(exc: ValidationError) -> InvalidRequest:
    # With unions pydantic reports one error per branch; the deepest one names the real culprit.
    first = max(exc.errors(include_input=False, include_url=False), key=lambda e: len(e["loc"]))
    param = _param_from_loc(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param or None)


def parse_request(body: bytes, model_cls: type[Request]) -> tuple[dict[str, Any], Request]:
    """The raw JSON object (rewritten later only if media must be) and its validated, bounded model."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return data, model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def media_parts(request: Request) -> list[MediaPart]:
    parts = []
    for message, index, part in request.media_parts():
        if isinstance(part, ImagePart):
            parts.append(MediaPart(message, index, "image", part.image_url.url))
        else:
            parts.append(MediaPart(message, index, "video", part.video_url.url))
    return parts


def check_against_pool(request: Request, pool: ModelPool, parts: list[MediaPart]) -> None:
    """The pool's own rules: allowed extra fields, media counts (before any fetch), context length."""
    for name in request.model_extra or {}:
        if name not in pool.allow_fields:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    counts: Counter[Modality] = Counter()
    for part in parts:
        modality: Modality = "image" if part.modality == "image" else "video"
        counts[modality] += 1
        limit = pool.limit_mm_per_prompt.get(modality, 0)
        if counts[modality] > limit:
            raise InvalidRequest(
                f"At most {limit} {MEDIA_NAMES[modality]} may be provided in one prompt.", param=part.param
            )
    if pool.max_model_len is not None:
        _check_context(request, pool.max_model_len, pool.max_chars_per_token)


def _check_context(request: Request, max_model_len: int, max_chars_per_token: float) -> None:
    wanted = request.requested_tokens()
    if wanted is not None and wanted > max_model_len:
        raise ContextLengthExceeded(
            f"max_tokens ({wanted}) exceeds the model's context length of {max_model_len} tokens.",
            param="max_tokens",
        )
    if request.text_chars() > max_model_len * max_chars_per_token:
        raise ContextLengthExceeded(
            f"The prompt is longer than the model's context length of {max_model_len} tokens.",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
        )
    if isinstance(request, CompletionRequest):
        longest = request.longest_token_prompt()
        if longest > max_model_len:
            raise ContextLengthExceeded(
                f"The prompt has {longest} tokens; the model's context length is {max_model_len}.", param="prompt"
            )
