"""The two proxied generation routes, mounted as raw ASGI endpoints."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.chat.serving import ChatDialect, CompletionsEndpoint

# Only these upstream paths are ever proxied; vLLM's /tokenize, /pause, /metrics, /docs ... are not reachable.
routes = [
    Route(
        "/v1/chat/completions",
        CompletionsEndpoint("/v1/chat/completions", ChatDialect(ChatCompletionRequest)),
        methods=["POST"],
    ),
    Route("/v1/completions", CompletionsEndpoint("/v1/completions", ChatDialect(CompletionRequest)), methods=["POST"]),
]
