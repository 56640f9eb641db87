"""Anthropic's Messages routes, mounted as raw ASGI endpoints on the hot path like chat."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.serving import CompletionsEndpoint, Generation
from gateway.messages.protocol import CountTokensRequest, MessagesRequest
from gateway.messages.serving import MessagesDialect
from gateway.provided import Provided


def routes(deps: Provided[Generation]) -> list[Route]:
    messages = CompletionsEndpoint("/v1/messages", MessagesDialect(MessagesRequest), deps)
    count = CompletionsEndpoint("/v1/messages/count_tokens", MessagesDialect(CountTokensRequest), deps)
    return [
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count, methods=["POST"]),
    ]
