"""The Responses API's routes, as raw ASGI endpoints: create (on the hot path, like chat), read and cancel."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.serving import CompletionsEndpoint, Generation
from gateway.provided import Provided
from gateway.responses.ids import ResponseIds
from gateway.responses.serving import ResponsesDialect, StoredResponseEndpoint


def routes(deps: Provided[Generation], ids: Provided[ResponseIds]) -> list[Route]:
    return [
        Route("/v1/responses", CompletionsEndpoint("/v1/responses", ResponsesDialect(ids), deps), methods=["POST"]),
        # A stored response lives on the replica that made it; only that replica is asked.
        Route("/v1/responses/{response_id}", StoredResponseEndpoint(False, deps, ids), methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", StoredResponseEndpoint(True, deps, ids), methods=["POST"]),
    ]
