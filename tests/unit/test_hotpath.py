"""The generation routes' short way in answers like FastAPI did: OpenAI-shaped 500s, other routes untouched."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
from fastapi import FastAPI

from gateway.access.keys import KeyChecker
from gateway.asgi import Message, Receive, Send
from gateway.config import Settings
from gateway.errors import error_body
from gateway.server.hotpath import HotPathDispatch
from gateway.server.middleware import REQUEST_ID_SAFE
from gateway.tracing import OFF


async def _call(app: Any, path: str, method: str = "POST") -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [], "state": {}}
    await app(scope, receive, send)
    return sent


class _OpenDoor:
    """Admission and per-key limits that admit everything, so only the dispatch is under test."""

    def check(self) -> None:
        pass

    async def admit(self, key_id: str) -> list[tuple[bytes, bytes]]:
        return []

    async def leave(self, key_id: str) -> None:
        pass


def _dispatch(endpoint: Any, fallback: FastAPI | None = None) -> HotPathDispatch:
    settings = Settings()
    app = fallback or FastAPI()
    app.state.gateway = SimpleNamespace(admission=_OpenDoor(), limiter=_OpenDoor(), tracing=OFF)
    routes = {"/v1/chat/completions": (endpoint, error_body)}
    return HotPathDispatch(app, routes, max_body_bytes=1024, keys=KeyChecker(settings))


async def test_an_endpoint_failing_before_its_response_gives_an_openai_500() -> None:
    async def broken(scope: Message, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    sent = await _call(_dispatch(broken), "/v1/chat/completions")
    assert sent[0]["status"] == 500
    assert orjson.loads(sent[1]["body"])["error"]["type"] == "internal_error"
    minted = dict(sent[0]["headers"]).get(b"x-request-id", b"")
    assert REQUEST_ID_SAFE.fullmatch(minted), minted  # the answer names its request, even when the route failed


async def test_a_failure_after_the_response_started_sends_nothing_more() -> None:
    async def half(scope: Message, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("bug")

    sent = await _call(_dispatch(half), "/v1/chat/completions")
    assert [m["type"] for m in sent] == ["http.response.start"]


async def test_other_routes_and_methods_go_to_fastapi() -> None:
    calls: list[str] = []

    async def endpoint(scope: Message, receive: Receive, send: Send) -> None:
        calls.append("hot")

    class Recorder(FastAPI):
        async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:  # type: ignore[override]
            calls.append(f"{scope['method']} {scope['path']}")

    dispatch = _dispatch(endpoint, Recorder())
    await _call(dispatch, "/v1/models", "GET")
    await _call(dispatch, "/v1/chat/completions", "GET")
    await _call(dispatch, "/v1/chat/completions")
    assert calls == ["GET /v1/models", "GET /v1/chat/completions", "hot"]


async def test_a_stray_payload_error_from_an_endpoint_is_an_openai_500_not_a_bare_one() -> None:
    """Only the body cap's own error becomes the 413; any other exception an endpoint raises is answered here."""
    from gateway.errors import PayloadTooLarge

    async def broken(scope: Message, receive: Receive, send: Send) -> None:
        raise PayloadTooLarge("not the cap")

    sent = await _call(_dispatch(broken), "/v1/chat/completions")
    assert sent[0]["status"] == 500
    assert orjson.loads(sent[1]["body"])["error"]["type"] == "internal_error"
