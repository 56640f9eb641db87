"""An in-process, vLLM-shaped upstream on a real loopback socket, for edge timings real vLLM can't be made to show
on demand (a stall before the first token, a 429 with Retry-After, a reset before headers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.harness.processes import free_port


@dataclass
class Behaviour:
    mode: str = "normal"  # normal | stall_first | stall_mid | status | reset | drop_mid
    status: int = 200
    retry_after: str | None = None
    chunks: int = 3
    chunk_delay: float = 0.0
    padding: int = 0  # bytes of filler per chunk, to fill socket buffers quickly
    message: str | None = None  # the error message of mode "status" (default "fake status <code>")


def sse_chunk(i: int, padding: int = 0) -> bytes:
    payload = {
        "id": "cmpl-fake",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": f"t{i}" + "x" * padding}}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


USAGE_CHUNK = (
    b'data: {"id":"cmpl-fake","choices":[],"usage":{"prompt_tokens":7,"total_tokens":10,"completion_tokens":3}}\n\n'
)


@dataclass
class FakeVllm:
    behaviour: Behaviour = field(default_factory=Behaviour)
    hits: int = 0
    bodies: list[bytes] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    aborted: int = 0  # stalled requests whose connection the gateway closed (what makes vLLM abort one)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        self.bodies.append(body)
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        b = self.behaviour
        if b.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if b.mode == "stall_first":
            transport = request.transport
            while transport is not None and not transport.is_closing():
                await asyncio.sleep(0.05)
            self.aborted += 1
            await asyncio.sleep(3600)
        if b.mode == "status":
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            message = b.message if b.message is not None else f"fake status {b.status}"
            error = {"error": {"message": message, "type": "BadRequestError", "code": b.status}}
            return web.json_response(error, status=b.status, headers=headers)
        if not orjson.loads(body).get("stream"):
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"content": "ok"}}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(b.chunks):
            await response.write(sse_chunk(i, b.padding))
            if b.mode in ("stall_mid", "drop_mid") and i == 1:
                if b.mode == "drop_mid":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await asyncio.sleep(3600)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await response.write(USAGE_CHUNK + b"data: [DONE]\n\n")
        await response.write_eof()
        return response
