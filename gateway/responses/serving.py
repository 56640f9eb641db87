"""Serving logic for the Responses API: the create route's dialect of the generation path, and the endpoint that
reads or cancels a stored response on the replica holding it.

vLLM stores a response in the memory of the replica that made it (with `VLLM_ENABLE_RESPONSES_API_STORE=1`), so
everything that names a stored response — `previous_response_id`, `GET /v1/responses/{id}`, `cancel` — must reach
that replica. The gateway mints each response's id (gateway/responses/ids.py) to say which one and whose it is.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.access.context import context_of
from gateway.asgi import Message, Receive, Send, send_error
from gateway.chat.checks import ChatMedia
from gateway.chat.serving import Generation, Placement
from gateway.errors import GatewayError, InvalidRequest, NotFound, error_body
from gateway.media.images import PreparedMedia
from gateway.media.service import MediaPart
from gateway.metrics import UNKNOWN_MODEL
from gateway.provided import Provided
from gateway.responses.ids import ResolvedId, ResponseIds
from gateway.responses.protocol import MAX_RESPONSE_ID_CHARS, ResponsesRequest
from gateway.upstream.pool import Replica, ReplicaSet
from gateway.upstream.relay import relay_settled
from gateway.upstream.routing import affinity_key

STORED_ROUTE = "/v1/responses/{response_id}"
_SEQUENCE = re.compile(rb'"sequence_number":(\d+)')


def responses_stream_error(error: GatewayError, tail: bytes) -> bytes:
    """The Responses API's own error event, numbered after the last event the client saw; the SDK's stream
    yields it as a `ResponseErrorEvent` (this API has no `[DONE]` terminator)."""
    numbers = _SEQUENCE.findall(tail)
    event = {
        "type": "error",
        "code": error.code,
        "message": error.message,
        "param": error.param,
        "sequence_number": int(numbers[-1]) + 1 if numbers else 0,
    }
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


def with_request_id(body: bytes, response_id: str) -> bytes:
    """The client's bytes with vLLM's `request_id` (which becomes the response id) set first in the object.

    Splicing keeps the forwarded bytes the client's own; the key cannot repeat, as the dialect refuses a client's
    `request_id`, and the body is a validated, non-empty JSON object."""
    start = body.index(b"{") + 1
    return b'{"request_id":' + orjson.dumps(response_id) + b"," + body[start:]


@dataclass(frozen=True, slots=True)
class ResponsesDialect:
    ids: Provided[ResponseIds]  # mints each response's id (it names the replica and the namespace)
    model_cls: type[ResponsesRequest] = ResponsesRequest

    def stream_error(self, error: GatewayError, tail: bytes) -> bytes:
        return responses_stream_error(error, tail)

    def error_body(self, error: GatewayError) -> bytes:
        return error_body(error)

    def media(self, request: ResponsesRequest) -> list[ChatMedia]:
        return [
            ChatMedia(item, index, MediaPart("image", part.image_url, f"input[{item}].content[{index}].image_url"))
            for item, index, part in request.media_parts()
        ]

    def replace_media(self, data: dict[str, Any], media: list[ChatMedia], prepared: list[PreparedMedia]) -> None:
        for where, item in zip(media, prepared, strict=True):
            part = data["input"][where.message]["content"][where.index]
            part["image_url"] = item.data_url

    def routing_key(
        self,
        request: ResponsesRequest,
        namespace: str,
        session: str | None,
        media: list[ChatMedia],
        prepared: list[PreparedMedia],
    ) -> bytes:
        explicit = request.prompt_cache_key if request.prompt_cache_key is not None else session
        leading = request.leading_item()
        hashes = [item.sha256 for where, item in zip(media, prepared, strict=True) if where.message <= leading]
        return affinity_key(namespace, explicit, request.leading_texts(), hashes)

    def placement(self, replicas: ReplicaSet, request: ResponsesRequest, namespace: str) -> Placement:
        if "request_id" in (request.model_extra or {}):
            raise InvalidRequest("request_id is set by the gateway (it names the response).", param="request_id")
        ids = self.ids()
        only = None
        if request.previous_response_id is not None:
            holder = _holder_in(ids, replicas, request.previous_response_id, namespace, "previous_response_id")
            only = _pinned(holder)
        return Placement(
            only=only, body_for=lambda body, replica: with_request_id(body, ids.mint(namespace, replica.base_url))
        )


def _pinned(holder: Replica) -> Callable[[Replica], bool]:
    return lambda replica: replica is holder


def _not_found(response_id: str, param: str) -> NotFound:
    shown = response_id[:MAX_RESPONSE_ID_CHARS]
    return NotFound(f"Response with id '{shown}' not found.", param=param, code="response_not_found")


def _resolve(ids: ResponseIds, response_id: str, namespace: str, param: str) -> ResolvedId:
    resolved = ids.resolve(response_id, namespace)
    if resolved is None:  # not ours, another namespace's, or expired: all look the same from outside
        raise _not_found(response_id, param)
    return resolved


def _holder_in(ids: ResponseIds, replicas: ReplicaSet, response_id: str, namespace: str, param: str) -> Replica:
    holder = ids.holder(_resolve(ids, response_id, namespace, param), ((r.base_url, r) for r in replicas.replicas))
    if holder is None:  # the replica left the pool, and its store with it
        raise _not_found(response_id, param)
    return holder


@dataclass(frozen=True, slots=True)
class StoredResponseEndpoint:
    """`GET /v1/responses/{id}` (optionally `?stream=true&starting_after=N`) and `POST .../cancel`."""

    cancel: bool
    deps: Provided[Generation]
    ids: Provided[ResponseIds]

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        gateway, ids = self.deps(), self.ids()
        metrics = gateway.metrics
        route = STORED_ROUTE + ("/cancel" if self.cancel else "")
        status, model_label = 500, UNKNOWN_MODEL
        try:
            response_id = scope["path_params"]["response_id"]
            namespace = context_of(scope).identity.namespace
            resolved = _resolve(ids, response_id, namespace, "response_id")
            found = [
                (rs, holder)
                for rs in gateway.pools.by_model.values()
                if (holder := ids.holder(resolved, ((r.base_url, r) for r in rs.replicas)))
            ]
            if not found:
                raise _not_found(response_id, "response_id")
            replicas, holder = found[0]
            model_label = replicas.pool.name
            stream, query = (False, b"") if self.cancel else _read_query(scope["query_string"])
            path = f"/v1/responses/{response_id}" + ("/cancel" if self.cancel else "")
            if query:
                path += "?" + query.decode()
            opened = await gateway.upstream.open(
                replicas,
                path,
                b"",
                context_of(scope).request_id,
                only=_pinned(holder),
                method="POST" if self.cancel else "GET",
            )
            outcome = await relay_settled(
                opened,
                receive,
                send,
                stream=stream,
                timeouts=replicas.pool.timeouts,
                started=started,
                metrics=metrics,
                stream_error=responses_stream_error,
            )
            status = outcome.status
        except GatewayError as error:
            status = error.status
            metrics.rejections.labels(route, error.code or error.type).inc()
            await send_error(send, error)
        finally:
            metrics.of(metrics.requests, route, model_label, str(status)).inc()
            metrics.of(metrics.request_duration, route, model_label).observe(time.perf_counter() - started)


def _read_query(raw: bytes) -> tuple[bool, bytes]:
    """Only `stream` and `starting_after` go on, re-written from their parsed values."""
    stream, starting_after = False, None
    for pair in raw.split(b"&") if raw else ():
        name, _, value = pair.partition(b"=")
        if name == b"stream":
            if value not in (b"true", b"false"):
                raise InvalidRequest("stream must be true or false.", param="stream")
            stream = value == b"true"
        elif name == b"starting_after":
            if not value.isdigit() or len(value) > 9:
                raise InvalidRequest("starting_after must be a non-negative integer.", param="starting_after")
            starting_after = int(value)
        elif name:
            raise InvalidRequest(f"Unrecognized query parameter: {name[:64].decode('latin-1')}", param=None)
    parts = []
    if stream:
        parts.append(b"stream=true")
    if starting_after is not None:
        parts.append(b"starting_after=%d" % starting_after)
    return stream, b"&".join(parts)
