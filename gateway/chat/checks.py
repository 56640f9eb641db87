"""Parse and check a generation request before any replica or media host is contacted.

Everything here is decided from the request and the pool's configuration alone: bounds (by the protocol models),
engine-steering fields, media counts and the context budget.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import orjson
from pydantic import ValidationError

from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.config import Modality, ModelPool
from gateway.errors import ContextLengthExceeded, InvalidRequest, validation_error
from gateway.media.images import PreparedMedia
from gateway.media.parts import ImagePart
from gateway.media.service import MediaPart

MEDIA_NAMES = {"image": "image(s)", "video": "video(s)"}


class Request(Protocol):
    """What the checks, budgets and routing read of a generation request (chat, text completion, response)."""

    PROMPT_FIELD: ClassVar[str]  # named by a context-length error: "messages", "prompt", "input"
    TOKENS_FIELD: ClassVar[str]  # "max_tokens" or "max_output_tokens"
    model: str

    @property
    def stream(self) -> bool: ...

    @property
    def prompt_cache_key(self) -> str | None: ...

    @property
    def model_extra(self) -> dict[str, Any] | None: ...

    def texts(self) -> Iterator[str]: ...

    def schemas(self) -> list[Any]: ...

    def text_chars(self) -> int: ...

    def requested_tokens(self) -> int | None: ...

    def choice_count(self) -> int: ...


R = TypeVar("R")


def parse_request(body: bytes, model_cls: type[R]) -> tuple[dict[str, Any], R]:
    """The raw JSON object (rewritten later only if media must be) and its validated, bounded model."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return revalidate(data, model_cls)


def revalidate(data: dict[str, Any], model_cls: type[R]) -> tuple[dict[str, Any], R]:
    """The model of a JSON object (parsed, or rewritten by the gateway itself, as grounding does)."""
    try:
        return data, model_cls.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise validation_error(exc.errors(include_input=False, include_url=False)) from None


@dataclass(frozen=True, slots=True)
class ChatMedia:
    """A media part of a chat request and where it sits: messages[message].content[index]."""

    message: int
    index: int
    part: MediaPart


def media_parts(request: ChatCompletionRequest | CompletionRequest) -> list[ChatMedia]:
    found = []
    for message, index, part in request.media_parts():
        modality, url = ("image", part.image_url.url) if isinstance(part, ImagePart) else ("video", part.video_url.url)
        param = f"messages[{message}].content[{index}].{modality}_url"
        found.append(ChatMedia(message, index, MediaPart(modality, url, param)))
    return found


def replace_media(data: dict[str, Any], media: list[ChatMedia], prepared: list[PreparedMedia]) -> None:
    """Put each prepared data URL where its part was, with its content hash as vLLM's multimodal cache key."""
    for where, item in zip(media, prepared, strict=True):
        key = f"{where.part.modality}_url"
        data["messages"][where.message]["content"][where.index] = {
            "type": key,
            key: {"url": item.data_url},
            "uuid": item.sha256,
        }


def check_against_pool(request: Request, pool: ModelPool, media: list[ChatMedia]) -> None:
    """The pool's own rules: allowed extra fields, media counts (before any fetch), context length."""
    for name in request.model_extra or {}:
        if name not in pool.allow_fields:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    counts: Counter[Modality] = Counter()
    for part in (m.part for m in media):
        modality: Modality = "image" if part.modality == "image" else "video"
        counts[modality] += 1
        limit = pool.limit_mm_per_prompt.get(modality, 0)
        if counts[modality] > limit:
            raise InvalidRequest(
                f"At most {limit} {MEDIA_NAMES[modality]} may be provided in one prompt.", param=part.param
            )
    _check_reserved_tokens(request, pool)
    if pool.max_model_len is not None:
        _check_context(request, pool.max_model_len, pool.max_chars_per_token)


@functools.lru_cache(maxsize=64)
def _reserved_pattern(tokens: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(re.escape(t) for t in tokens)) if tokens else None


def reserved_tokens_defused(pool: ModelPool) -> Callable[[str], str]:
    """For text the gateway itself puts in a prompt (stored captions): the pool's reserved tokens lose their
    angle brackets and bars, so they read as words, not as roles or media placeholders."""
    pattern = _reserved_pattern(tuple(pool.reserved_tokens))
    if pattern is None:
        return lambda text: text
    return lambda text: pattern.sub(lambda found: found.group().strip("<|>"), text)


def _check_reserved_tokens(request: Request, pool: ModelPool) -> None:
    """The model's control tokens are its own: in a client's text they are refused, not forwarded (the engine's
    tokenizer would read them as roles or media placeholders), and so are placeholder ids in token prompts."""
    pattern = _reserved_pattern(tuple(pool.reserved_tokens))
    if pattern is not None:
        # The JSON schemas a template renders (tool parameters, response formats) are read by the model too: one
        # search over their serialised text covers every key and string in them (their size is bounded).
        schemas = request.schemas()
        rendered = orjson.dumps(schemas).decode() if schemas else ""
        for text in itertools.chain(request.texts(), (rendered,)):
            found = pattern.search(text)
            if found is not None:
                raise InvalidRequest(
                    f"The text holds the model's reserved token {found.group()!r}; send it as plain text without "
                    "the angle brackets and bars.",
                    code="reserved_token",
                )
    if isinstance(request, CompletionRequest) and pool.reserved_token_ids:
        reserved = frozenset(pool.reserved_token_ids)
        for prompt in request.token_prompts():
            if not reserved.isdisjoint(prompt):
                raise InvalidRequest(
                    "The token prompt holds the model's media placeholder ids.", param="prompt", code="reserved_token"
                )


def _check_context(request: Request, max_model_len: int, max_chars_per_token: float) -> None:
    wanted = request.requested_tokens()
    if wanted is not None and wanted > max_model_len:
        raise ContextLengthExceeded(
            f"{request.TOKENS_FIELD} ({wanted}) exceeds the model's context length of {max_model_len} tokens.",
            param=request.TOKENS_FIELD,
        )
    if request.text_chars() > max_model_len * max_chars_per_token:
        raise ContextLengthExceeded(
            f"The prompt is longer than the model's context length of {max_model_len} tokens.",
            param=request.PROMPT_FIELD,
        )
    if isinstance(request, CompletionRequest):
        longest = request.longest_token_prompt()
        if longest > max_model_len:
            raise ContextLengthExceeded(
                f"The prompt has {longest} tokens; the model's context length is {max_model_len}.", param="prompt"
            )
