"""The two proxied chat routes, mounted as raw ASGI endpoints."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.protocol import ChatCompletionRequest, CompletionRequest
from gateway.chat.serving import ChatDialect, CompletionsEndpoint, Generation
from gateway.chat.tokenize import DetokenizeRequest, TokenEndpoint, TokenizeRequest
from gateway.provided import Provided


def routes(deps: Provided[Generation]) -> list[Route]:
    """Only these upstream paths (with the Responses and Messages routes) are ever proxied; vLLM's /pause,
    /metrics, /docs, /v1/load_lora_adapter ... are not reachable."""
    chat = CompletionsEndpoint("/v1/chat/completions", ChatDialect(ChatCompletionRequest), deps)
    completions = CompletionsEndpoint("/v1/completions", ChatDialect(CompletionRequest), deps)
    return [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        # vLLM's prompt sizing, behind the same keys and bounds (outside /v1, as vLLM serves them)
        Route("/tokenize", TokenEndpoint("/tokenize", TokenizeRequest, deps), methods=["POST"]),
        Route("/detokenize", TokenEndpoint("/detokenize", DetokenizeRequest, deps), methods=["POST"]),
    ]
