"""Serving logic for the generation routes (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
`/v1/messages`): parse, check, prepare media, forward, relay.

The client's own request bytes are forwarded unchanged whenever no check needs to rewrite them: the gateway
validates a parsed copy but re-serialises only when it rewrote the request: media parts replaced by prepared data
URLs, or a grounded chat's hits injected (gateway/chat/retrieval.py). What differs
between the routes — where media sits, the affinity key, which replicas may answer, the stream's error event —
is the route's `Dialect`; the rest is one path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from opentelemetry.trace import get_current_span

from gateway.access.context import context_of
from gateway.access.limits import Limiter
from gateway.asgi import Message, Receive, Send, read_body, send_error, with_headers
from gateway.chat.checks import (
    ChatMedia,
    Request,
    check_against_pool,
    media_parts,
    parse_request,
    replace_media,
    reserved_tokens_defused,
    revalidate,
)
from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.chat.retrieval import Retriever, ground
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest, ModelNotFound, ServiceUnavailable, error_body
from gateway.media.images import PreparedMedia
from gateway.media.service import MediaPreparer
from gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from gateway.provided import Provided
from gateway.scheduling.bands import band_for
from gateway.scheduling.scheduler import ClientGone, Ticket
from gateway.tracing import Tracing
from gateway.upstream.client import UpstreamClient
from gateway.upstream.pool import Pools, Replica, ReplicaSet
from gateway.upstream.relay import RelayOutcome, chat_stream_error, relay_settled
from gateway.upstream.routing import affinity_key


@dataclass(frozen=True, slots=True)
class Generation:
    """What the generation endpoints need, made by the app's lifespan and passed to each endpoint it builds."""

    settings: Settings
    metrics: GatewayMetrics
    pools: Pools
    upstream: UpstreamClient
    media: MediaPreparer
    limiter: Limiter
    tracing: Tracing
    retriever: Retriever  # where a grounded chat searches: this process's index, or the retrieval service


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request may go and what each replica is sent: `only` narrows the replicas (None: any), and
    `body_for` makes the bytes per replica (None: the same bytes to each)."""

    only: Callable[[Replica], bool] | None = None
    body_for: Callable[[bytes, Replica], bytes] | None = None


class Dialect(Protocol):
    @property
    def model_cls(self) -> type[Any]: ...

    def stream_error(self, error: GatewayError, tail: bytes) -> bytes:
        """The event that ends a stream the replica broke off (relay's `stream_error`)."""
        ...

    def error_body(self, error: GatewayError) -> bytes:
        """An error answer's body in the dialect's envelope."""
        ...

    def media(self, request: Any) -> list[ChatMedia]: ...

    def replace_media(self, data: dict[str, Any], media: list[ChatMedia], prepared: list[PreparedMedia]) -> None: ...

    def routing_key(
        self, request: Any, namespace: str, session: str | None, media: list[ChatMedia], prepared: list[PreparedMedia]
    ) -> bytes: ...

    def placement(self, replicas: ReplicaSet, request: Any, namespace: str) -> Placement: ...


@dataclass(frozen=True, slots=True)
class ChatDialect:
    """Chat and text completions: media in `messages[i].content[j]`, chat's SSE error event, any replica."""

    model_cls: type[ChatCompletionRequest] | type[CompletionRequest]

    def stream_error(self, error: GatewayError, tail: bytes) -> bytes:
        return chat_stream_error(error, tail)

    def error_body(self, error: GatewayError) -> bytes:
        return error_body(error)

    def media(self, request: Any) -> list[ChatMedia]:
        return media_parts(request)

    def replace_media(self, data: dict[str, Any], media: list[ChatMedia], prepared: list[PreparedMedia]) -> None:
        replace_media(data, media, prepared)

    def routing_key(
        self, request: Any, namespace: str, session: str | None, media: list[ChatMedia], prepared: list[PreparedMedia]
    ) -> bytes:
        return routing_key(request, namespace, session, media, prepared)

    def placement(self, replicas: ReplicaSet, request: Any, namespace: str) -> Placement:
        return Placement()


@dataclass(frozen=True, slots=True)
class CompletionsEndpoint:
    """Raw ASGI endpoint: the hot path skips FastAPI's request/response machinery."""

    route: str
    dialect: Dialect
    deps: Provided[Generation]

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        gateway = self.deps()
        metrics = gateway.metrics
        model_label = UNKNOWN_MODEL
        status = 500
        try:
            body = await read_body(receive)
            # A large body's parse and checks (every text scanned) run in a worker thread, off the event loop.
            large = len(body) > gateway.settings.inline_parse_bytes
            model_cls = self.dialect.model_cls
            if large:
                data, request = await asyncio.to_thread(parse_request, body, model_cls)
            else:
                data, request = parse_request(body, model_cls)
            identity = context_of(scope).identity
            replicas = gateway.pools.get(request.model, identity.sees_adapters_of)  # another's adapter: not found
            if replicas is None:
                raise ModelNotFound(f"The model '{request.model}' does not exist.", param="model")
            model_label = request.model
            grounding = None
            if getattr(request, "retrieval", None) is not None:
                grounding = await ground(
                    data, request, replicas.pool, gateway.retriever, scope, reserved_tokens_defused(replicas.pool)
                )
                data, request = await asyncio.to_thread(revalidate, data, model_cls)
            media = self.dialect.media(request)
            if large:
                await asyncio.to_thread(check_against_pool, request, replicas.pool, media)
            else:
                check_against_pool(request, replicas.pool, media)
            namespace = identity.namespace
            band = band_for(request.service_tier, identity.service_tier, identity.max_service_tier)
            placement = self.dialect.placement(replicas, request, namespace)
            only = eligible_replicas(replicas, request.model, placement.only)
        except GatewayError as error:
            metrics.rejections.labels(self.route, error.code or error.type).inc()
            metrics.requests.labels(self.route, model_label, str(error.status)).inc()
            await send_error(send, error, render=self.dialect.error_body)
            return
        in_flight = metrics.of(metrics.in_flight, self.route, model_label)
        in_flight.inc()
        tracing = gateway.tracing
        span = get_current_span() if tracing.enabled else None  # the request's, opened by the middleware
        if span is not None:
            span.set_attributes(_request_attributes(self.route, request))
        try:
            visual_tokens = 0
            prepared: list[PreparedMedia] = []
            pool = replicas.pool
            if media:
                prepared = await gateway.media.prepare([m.part for m in media], pool)
                visual_tokens = sum(item.visual_tokens for item in prepared)
                self.dialect.replace_media(data, media, prepared)
            key = None
            if pool.routing == "affinity":
                session = _header(scope, pool.session_header)
                key = self.dialect.routing_key(request, namespace, session, media, prepared)
            if request.prompt_cache_key is not None and not pool.forward_prompt_cache_key:
                del data["prompt_cache_key"]  # used for routing here; vLLM sees it only if the pool says so
                body = reserialise(data)
            elif media or grounding is not None:
                body = reserialise(data)
            prompt_tokens = estimated_prompt_tokens(request, visual_tokens)
            # The most it may generate: charged against the key's token budget and the tenant's fair share
            output_tokens = (request.requested_tokens() or UNSTATED_MAX_TOKENS) * request.choice_count()
            budget_headers = await gateway.limiter.charge_tokens(identity.key_id, prompt_tokens + output_tokens)
            send = with_headers(send, budget_headers + (grounding.headers() if grounding else []))
            make = placement.body_for
            payload = body if make is None else lambda replica, sent=body: make(sent, replica)
            place, home = _routes(replicas, key, only)
            ticket = Ticket(namespace, identity.weight, band, prompt_tokens, len(body), place, output_tokens, home)
            grant = await replicas.scheduler.acquire(ticket, lambda: _hung_up(receive), tracing)
            outcome = RelayOutcome(status=499)  # until the relay says otherwise: the client left before an answer
            try:
                opened = await gateway.upstream.open(
                    replicas, self.route, payload, context_of(scope).request_id, key, only=only, first=grant.replica
                )
                replicas.visual_tokens.inc(visual_tokens)
                try:
                    outcome = await relay_settled(
                        opened,
                        receive,
                        send,
                        stream=request.stream,
                        timeouts=replicas.pool.timeouts,
                        started=started,
                        metrics=metrics,
                        stream_error=self.dialect.stream_error,
                        final_chunk=grounding.final_chunk if grounding is not None and request.stream else None,
                        on_events=grant.charge_output,
                        on_upstream_done=grant.free,
                    )
                finally:
                    replicas.visual_tokens.dec(visual_tokens)
            finally:
                grant.release(outcome.prompt_tokens, outcome.completion_tokens)
            status = outcome.status
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.usage.input_tokens": outcome.prompt_tokens,
                        "gen_ai.usage.output_tokens": outcome.completion_tokens,
                        "gateway.upstream.replica": opened.replica.base_url,
                        "gateway.visual_tokens": visual_tokens,
                        "gateway.band": band.label,
                    }
                )
            if outcome.prompt_tokens:
                metrics.of(metrics.prompt_tokens, model_label).inc(outcome.prompt_tokens)
            if outcome.completion_tokens:
                metrics.of(metrics.completion_tokens, model_label).inc(outcome.completion_tokens)
        except ClientGone:
            status = 499  # hung up while queued: nothing reached a replica, and there is no one to answer
        except GatewayError as error:  # queue, media, token budget or upstream refusal, all before the first byte
            status = error.status
            metrics.rejections.labels(self.route, error.code or error.type).inc()
            await send_error(send, error, render=self.dialect.error_body)
        finally:
            in_flight.dec()
            metrics.of(metrics.requests, self.route, model_label, str(status)).inc()
            metrics.of(metrics.request_duration, self.route, model_label).observe(time.perf_counter() - started)


async def _hung_up(receive: Receive) -> None:
    """Returns once the client has hung up (the body was read whole, so nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _routes(
    replicas: ReplicaSet, key: bytes | None, only: Callable[[Replica], bool] | None
) -> tuple[Callable[[Callable[[Replica], bool]], Replica | None], Callable[[], Replica | None]]:
    """Where the scheduler may send this request — the pool's routing (affinity order, bounded load) among the
    replicas with room that may answer it — and its home, the replica its caches are on."""
    ineligible = {r for r in replicas.replicas if not only(r)} if only is not None else set()
    return (lambda room: replicas.pick(ineligible, key, room)[0]), (lambda: replicas.home(key, ineligible))


# What a request that states no max_tokens is taken to generate, for its budget and fair-share charge until it ends
UNSTATED_MAX_TOKENS = 256

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}


def _request_attributes(route: str, request: Request) -> dict[str, str | int | float | bool]:
    """GenAI semantic-convention attributes of a request: what was asked for, never what was said."""
    attributes: dict[str, str | int | float | bool] = {
        "gen_ai.operation.name": OPERATIONS.get(route, "chat"),
        "gen_ai.request.model": request.model,
        "gen_ai.system": "vllm",
        "gateway.stream": request.stream,
    }
    if (wanted := request.requested_tokens()) is not None:
        attributes["gen_ai.request.max_tokens"] = wanted
    return attributes


def eligible_replicas(
    replicas: ReplicaSet, model: str, pinned: Callable[[Replica], bool] | None
) -> Callable[[Replica], bool] | None:
    """The replicas that may answer: those serving the adapter a request names, within the dialect's own choice
    (an error now, before the client waits, when the pool has none)."""
    if model == replicas.pool.name:
        return pinned
    serving = [r for r in replicas.replicas if replicas.serves(r, model) and (pinned is None or pinned(r))]
    if not serving:
        raise ServiceUnavailable(f"No replica serving adapter '{model}' is available.", headers={"Retry-After": "5"})
    chosen = set(serving)
    return chosen.__contains__


def _header(scope: Message, name: str) -> str | None:
    wanted = name.encode()
    for header, value in scope["headers"]:
        if header == wanted:
            return str(value[:256].decode("latin-1"))
    return None


def routing_key(
    request: ChatCompletionRequest | CompletionRequest,
    namespace: str,
    session: str | None,
    media: list[ChatMedia],
    prepared: list[PreparedMedia],
) -> bytes:
    """The request's affinity key: prompt_cache_key, else the session header, else the conversation's leading
    part — system/developer messages and the first user turn, each image or video by its content hash (so a URL,
    a data URL and a re-send of the same image key alike, and later turns keep the first turn's key)."""
    explicit = request.prompt_cache_key if request.prompt_cache_key is not None else session
    if isinstance(request, CompletionRequest):
        prompts = request.token_prompts()
        texts = list(request.texts()) or [",".join(map(str, prompts[0][:1024])) if prompts else ""]
        return affinity_key(namespace, explicit, texts, ())
    users = (i for i, message in enumerate(request.messages) if message.role == "user")
    leading = next(users, len(request.messages) - 1)
    hashes = [item.sha256 for where, item in zip(media, prepared, strict=True) if where.message <= leading]
    leading_texts = (text for message in request.messages[: leading + 1] for text in (message.role, *message.texts()))
    return affinity_key(namespace, explicit, leading_texts, hashes)


def reserialise(data: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # an allow-listed field holding an integer beyond 64 bits
        raise InvalidRequest("The request holds a number too large to forward.") from None


def estimated_prompt_tokens(request: Request, visual_tokens: int) -> int:
    """A prompt's tokens before the replica counts them: text (chars/4, or its token ids) plus its images'.
    The token budget adds the completion it asks room for (max_tokens, else 256) times n, as OpenAI does."""
    return max(request.text_chars() // 4, getattr(request, "longest_token_prompt", lambda: 0)()) + visual_tokens
