"""The two proxied chat routes, mounted as raw ASGI endpoints."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.chat.serving import ChatDialect, CompletionsEndpoint, Generation
from gateway.provided import Provided


def routes(deps: Provided[Generation]) -> list[Route]:
    """Only these upstream paths are ever proxied; vLLM's /tokenize, /pause, /metrics, /docs ... are not reachable."""
    chat = CompletionsEndpoint("/v1/chat/completions", ChatDialect(ChatCompletionRequest), deps)
    completions = CompletionsEndpoint("/v1/completions", ChatDialect(CompletionRequest), deps)
    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
