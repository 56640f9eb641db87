"""The generation routes' short way in: straight from the server to the gateway middleware and the raw endpoint.

FastAPI still owns every other route, the OpenAPI schema and the lifespan. For the generation routes (`POST
/v1/chat/completions`, `/v1/completions`, `/v1/responses`, `/v1/messages`) its layers (error and telemetry
middleware, body-limit wrapper, router matching, exception wrappers, exit stack) were about a third of the
gateway's CPU per request in a py-spy profile, and none of them does anything on this path: the middleware and
the endpoint write their own errors, in the route's dialect.
"""

from __future__ import annotations

from fastapi import FastAPI

from gateway.access.keys import KeyChecker
from gateway.asgi import ASGIApp, ErrorRenderer, Message, Receive, Send
from gateway.server.middleware import GatewayMiddleware


class HotPathDispatch:
    def __init__(
        self,
        app: FastAPI,
        endpoints: dict[str, tuple[ASGIApp, ErrorRenderer]],
        *,
        max_body_bytes: int,
        keys: KeyChecker,
        log_requests: bool = False,
    ) -> None:
        self.app = app
        self.state = app.state  # what the server and tools may look up on "the app"
        self.routes = {
            path: GatewayMiddleware(
                endpoint,
                max_body_bytes=max_body_bytes,
                keys=keys,
                log_requests=log_requests,
                answer_errors=True,
                render_error=render,
            )
            for path, (endpoint, render) in endpoints.items()
        }

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
            if route is not None:
                scope["app"] = self.app  # as Starlette sets it: the endpoint finds the gateway's state there
                await route(scope, receive, send)
                return
        await self.app(scope, receive, send)
