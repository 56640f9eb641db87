"""The Responses API's routes, as raw ASGI endpoints: create (on the hot path, like chat), read and cancel."""

from __future__ import annotations

from starlette.routing import Route

from gateway.chat.serving import CompletionsEndpoint
from gateway.responses.serving import RESPONSES_DIALECT, StoredResponseEndpoint

routes = [
    Route("/v1/responses", CompletionsEndpoint("/v1/responses", RESPONSES_DIALECT), methods=["POST"]),
    # A stored response lives on the replica that made it; only that replica is asked.
    Route("/v1/responses/{response_id}", StoredResponseEndpoint(cancel=False), methods=["GET"]),
    Route("/v1/responses/{response_id}/cancel", StoredResponseEndpoint(cancel=True), methods=["POST"]),
]
