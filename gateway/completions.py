"""Serving logic for `/v1/chat/completions` and `/v1/completions`: parse, check, forward, relay.

The client's own request bytes are forwarded unchanged whenever no check needs to rewrite them: the gateway
validates a parsed copy but never re-serialises what it only had to read.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from gateway.asgi import Message, Receive, Send, read_body, send_error
from gateway.config import Modality, ModelPool
from gateway.errors import ContextLengthExceeded, GatewayError, InvalidRequest, ModelNotFound
from gateway.metrics import UNKNOWN_MODEL
from gateway.protocol.chat import ChatCompletionRequest, CompletionRequest
from gateway.state import GatewayState
from gateway.upstream.relay import relay

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


def parse_request(
    body: bytes, model_cls: type[ChatCompletionRequest] | type[CompletionRequest]
) -> ChatCompletionRequest | CompletionRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def check_against_pool(request: ChatCompletionRequest | CompletionRequest, pool: ModelPool) -> None:
    """The pool's own rules: allowed extra fields, media budgets, context length."""
    for name in request.model_extra or {}:
        if name not in pool.allow_fields:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name)
    parts = request.media_parts()
    counts: Counter[Modality] = Counter()
    for param, part in parts:
        modality: Modality = "image" if part.type == "image_url" else "video"
        counts[modality] += 1
        limit = pool.limit_mm_per_prompt.get(modality, 0)
        if counts[modality] > limit:
            raise InvalidRequest(f"At most {limit} {MEDIA_NAMES[modality]} may be provided in one prompt.", param=param)
    for param, part in parts:
        url = part.image_url.url if part.type == "image_url" else part.video_url.url
        if not url.startswith("data:"):
            raise InvalidRequest("Only data: URLs are accepted for media by this gateway.", param=f"{param}.url")
    if pool.max_model_len is None:
        return
    wanted = request.requested_tokens()
    if wanted is not None and wanted > pool.max_model_len:
        raise ContextLengthExceeded(
            f"max_tokens ({wanted}) exceeds the model's context length of {pool.max_model_len} tokens.",
            param="max_tokens",
        )
    if request.text_chars() > pool.max_model_len * pool.max_chars_per_token:
        raise ContextLengthExceeded(
            f"The prompt is longer than the model's context length of {pool.max_model_len} tokens.",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
        )
    if isinstance(request, CompletionRequest) and isinstance(request.prompt, list) and request.prompt:
        first = request.prompt[0]
        longest = (
            max(len(p) for p in request.prompt if isinstance(p, list))
            if isinstance(first, list)
            else (len(request.prompt) if isinstance(first, int) else 0)
        )
        if longest > pool.max_model_len:
            raise ContextLengthExceeded(
                f"The prompt has {longest} tokens; the model's context length is {pool.max_model_len}.",
                param="prompt",
            )


@dataclass(frozen=True, slots=True)
class CompletionsEndpoint:
    """Raw ASGI endpoint: the hot path skips FastAPI's request/response machinery."""

    route: str
    model_cls: type[ChatCompletionRequest] | type[CompletionRequest]

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        gateway: GatewayState = scope["app"].state.gateway
        metrics = gateway.metrics
        model_label = UNKNOWN_MODEL
        status = 500
        try:
            body = await read_body(receive)
            if len(body) > gateway.settings.inline_parse_bytes:
                request = await asyncio.to_thread(parse_request, body, self.model_cls)
            else:
                request = parse_request(body, self.model_cls)
            replicas = gateway.pools.get(request.model)
            if replicas is None:
                raise ModelNotFound(f"The model '{request.model}' does not exist.", param="model")
            model_label = request.model
            check_against_pool(request, replicas.pool)
        except GatewayError as error:
            metrics.rejections.labels(self.route, error.code or error.type).inc()
            metrics.requests.labels(self.route, model_label, str(error.status)).inc()
            await send_error(send, error)
            return
        in_flight = metrics.in_flight.labels(self.route, model_label)
        in_flight.inc()
        try:
            try:
                opened = await gateway.upstream.open(replicas, self.route, body, scope["state"]["request_id"])
            except GatewayError as error:
                status = error.status
                await send_error(send, error)
                return
            try:
                outcome = await relay(
                    opened,
                    receive,
                    send,
                    stream=request.stream,
                    timeouts=replicas.pool.timeouts,
                    started=started,
                    metrics=metrics,
                )
            finally:
                replicas.release(opened.replica)
            if outcome.upstream_broke:
                replicas.mark_down(opened.replica)
            status = outcome.status
            if outcome.prompt_tokens:
                metrics.prompt_tokens.labels(model_label).inc(outcome.prompt_tokens)
            if outcome.completion_tokens:
                metrics.completion_tokens.labels(model_label).inc(outcome.completion_tokens)
        finally:
            in_flight.dec()
            metrics.requests.labels(self.route, model_label, str(status)).inc()
            metrics.request_duration.labels(self.route, model_label).observe(time.perf_counter() - started)
