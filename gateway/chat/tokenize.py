"""vLLM's `/tokenize` and `/detokenize`, which clients use to size prompts, behind the same keys, scopes, body
bounds, per-key request budgets, metrics and routing as the generation routes (none of vLLM's other engine routes
is reachable). They take no generation slot: they neither queue in the pool's scheduler nor spend token budgets.

`/tokenize` takes a text `prompt` or text-only chat `messages` (an image would be fetched and decoded by the engine,
outside the media guard); the model's reserved tokens are refused as in generation. `/detokenize` takes at most
`MAX_DETOKENIZE_IDS` ids (more than any served context holds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.access.context import context_of
from gateway.asgi import Message, Receive, Send, read_body, send_error
from gateway.chat.checks import check_against_pool, parse_request
from gateway.chat.protocol import MAX_MESSAGES, ChatMessage
from gateway.chat.sampling import MAX_STRING_CHARS, ShortStr
from gateway.chat.serving import Generation, eligible_replicas
from gateway.errors import GatewayError, ModelNotFound
from gateway.media.parts import ImagePart, VideoPart
from gateway.metrics import UNKNOWN_MODEL
from gateway.provided import Provided
from gateway.upstream.relay import relay_settled

MAX_DETOKENIZE_IDS = 128 * 1024


class _TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING_CHARS)
    PROMPT_FIELD: ClassVar[str] = "prompt"
    TOKENS_FIELD: ClassVar[str] = "max_tokens"

    model: ShortStr

    @property
    def stream(self) -> bool:
        return False

    @property
    def prompt_cache_key(self) -> str | None:
        return None

    def schemas(self) -> list[Any]:
        return []

    def requested_tokens(self) -> int | None:
        return None

    def choice_count(self) -> int:
        return 1

    def text_chars(self) -> int:
        return sum(len(text) for text in self.texts())

    def texts(self) -> Iterator[str]:
        return iter(())


class TokenizeRequest(_TokenRequest):
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        for message in self.messages or ():
            if isinstance(message.content, list) and any(
                isinstance(part, ImagePart | VideoPart) for part in message.content
            ):
                raise ValueError("tokenize takes text only: media would be fetched by the engine, unchecked")
        return self

    def texts(self) -> Iterator[str]:
        if self.prompt is not None:
            yield self.prompt
        for message in self.messages or ():
            yield from message.texts()


class DetokenizeRequest(_TokenRequest):
    tokens: Annotated[list[Annotated[int, Field(ge=0, lt=1 << 31)]], Field(max_length=MAX_DETOKENIZE_IDS)]


@dataclass(frozen=True, slots=True)
class TokenEndpoint:
    route: str
    model_cls: type[TokenizeRequest] | type[DetokenizeRequest]
    deps: Provided[Generation]

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        gateway = self.deps()
        metrics = gateway.metrics
        status, model_label = 500, UNKNOWN_MODEL
        try:
            body = await read_body(receive)
            _, request = parse_request(body, self.model_cls)
            identity = context_of(scope).identity
            replicas = gateway.pools.get(request.model, identity.sees_adapters_of)
            if replicas is None:
                raise ModelNotFound(f"The model '{request.model}' does not exist.", param="model")
            model_label = request.model
            check_against_pool(request, replicas.pool, [])  # allowed fields, reserved tokens, context
            only = eligible_replicas(replicas, request.model, None)
            opened = await gateway.upstream.open(replicas, self.route, body, context_of(scope).request_id, only=only)
            outcome = await relay_settled(
                opened, receive, send, stream=False, timeouts=replicas.pool.timeouts, started=started, metrics=metrics
            )
            status = outcome.status
        except GatewayError as error:
            status = error.status
            metrics.rejections.labels(self.route, error.code or error.type).inc()
            await send_error(send, error)
        finally:
            metrics.of(metrics.requests, self.route, model_label, str(status)).inc()
            metrics.of(metrics.request_duration, self.route, model_label).observe(time.perf_counter() - started)
