"""An in-process, vLLM-shaped upstream on a real loopback socket, for edge timings real vLLM can't be made to show
on demand (a stall before the first token, a 429 with Retry-After, a reset before headers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.harness.processes import free_port

STALL = 3600.0  # a replica that never sends again (the gateway's timeouts end it)
WATCH = 0.05  # how often a stalled fake looks whether the gateway closed the connection
AFTER_RESET = 1.0  # a reset replica's handler lingers, as a crashed process would not answer either


@dataclass
class Behaviour:
    mode: str = "normal"  # normal | stall_first | stall_mid | status | reset | drop_mid | split_whole
    status: int = 200
    retry_after: str | None = None
    chunks: int = 3
    chunk_delay: float = 0.0
    padding: int = 0  # bytes of filler per chunk, to fill socket buffers quickly
    message: str | None = None  # the error message of mode "status" (default "fake status <code>")
    whole_delay: float = 0.0  # how long a non-streamed answer takes


WHOLE_BODY = orjson.dumps(
    {
        "id": "cmpl-fake",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"content": "ok"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
    }
)


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
    traceparents: list[str] = field(default_factory=list)  # the W3C header each generation request carried
    aborted: int = 0  # stalled requests whose connection the gateway closed (what makes vLLM abort one)
    # What /v1/models lists (id -> parent); the base model is "m". Adapter loads add to it, as vLLM's do.
    models: dict[str, str | None] = field(default_factory=lambda: {"m": None})
    stored: dict[str, bytes] = field(default_factory=dict)  # response id -> the response, as vLLM's store
    paths: list[str] = field(default_factory=list)  # method and path (with query) of every non-health request
    credentials: list[str] = field(default_factory=list)  # Authorization and x-api-key values a request carried
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeVllm:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_post("/v1/messages", self._chat)  # the stream's events are chat's: the gateway relays bytes
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/responses/{response_id}", self._stored)
        app.router.add_post("/v1/responses/{response_id}/cancel", self._stored)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
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

    async def _models(self, _: web.Request) -> web.Response:
        cards = [{"id": name, "object": "model", "parent": parent} for name, parent in self.models.items()]
        return web.json_response({"object": "list", "data": cards})

    async def _load(self, request: web.Request) -> web.Response:
        self.paths.append(f"POST {request.path_qs}")
        body = await request.json()
        if "/adapters/" not in body["lora_path"]:
            return web.json_response({"error": {"message": "no such adapter", "code": 400}}, status=400)
        self.models[body["lora_name"]] = "m"
        return web.Response(text="Success")

    async def _unload(self, request: web.Request) -> web.Response:
        self.paths.append(f"POST {request.path_qs}")
        self.models.pop((await request.json())["lora_name"], None)
        return web.Response(text="Success")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """As vLLM: the response id is the request's `request_id`; a previous id must be in this replica's store."""
        self.hits += 1
        body = await request.read()
        self.bodies.append(body)
        early = await self._before_answering(request)
        if early is not None:
            return early
        data = orjson.loads(body)
        previous = data.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            error = {"error": {"message": f"Response with id '{previous}' not found.", "code": 404}}
            return web.json_response(error, status=404)
        usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
        response = {
            "id": data["request_id"],
            "object": "response",
            "model": data["model"],
            "status": "completed",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}],
            "usage": usage,
        }
        self.stored[data["request_id"]] = orjson.dumps(response)
        if not data.get("stream"):
            return web.Response(body=self.stored[data["request_id"]], content_type="application/json")
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        created = {"type": "response.created", "sequence_number": 0, "response": {**response, "usage": None}}
        await stream.write(b"event: response.created\ndata: " + orjson.dumps(created) + b"\n\n")
        if self.behaviour.mode == "stall_mid":
            await asyncio.sleep(STALL)
        if self.behaviour.mode == "drop_mid":
            assert request.transport is not None
            request.transport.abort()
            return stream
        if self.behaviour.mode == "client_gone":  # keep streaming until the gateway closes the connection
            transport = request.transport
            while transport is not None and not transport.is_closing():
                await asyncio.sleep(WATCH)
            self.aborted += 1
            return stream
        done = {"type": "response.completed", "sequence_number": 1, "response": response}
        await stream.write(b"event: response.completed\ndata: " + orjson.dumps(done) + b"\n\n")
        await stream.write_eof()
        return stream

    async def _stored(self, request: web.Request) -> web.Response:
        self.paths.append(f"{request.method} {request.path_qs}")
        found = self.stored.get(request.match_info["response_id"])
        if found is None:
            return web.json_response({"error": {"message": "not found", "code": 404}}, status=404)
        if request.path.endswith("/cancel"):
            return web.json_response(
                {"error": {"message": "Cannot cancel a synchronous response.", "code": 400}}, status=400
            )
        return web.Response(body=found, content_type="application/json")

    async def _before_answering(self, request: web.Request) -> web.StreamResponse | None:
        """The faults every generation route can show before its first byte (reset, stall, a status)."""
        b = self.behaviour
        if b.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(AFTER_RESET)
        if b.mode == "stall_first":
            transport = request.transport
            while transport is not None and not transport.is_closing():
                await asyncio.sleep(WATCH)
            self.aborted += 1
            await asyncio.sleep(STALL)
        if b.mode == "status":
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            message = b.message if b.message is not None else f"fake status {b.status}"
            error = {"error": {"message": message, "type": "BadRequestError", "code": b.status}}
            return web.json_response(error, status=b.status, headers=headers)
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        body = await request.read()
        self.bodies.append(body)
        self.request_ids.append(request.headers.get("X-Request-Id", ""))
        self.traceparents.append(request.headers.get("traceparent", ""))
        self.credentials += [request.headers[h] for h in ("Authorization", "x-api-key") if h in request.headers]
        early = await self._before_answering(request)
        if early is not None:
            return early
        b = self.behaviour
        if not orjson.loads(body).get("stream"):
            if b.whole_delay:
                await asyncio.sleep(b.whole_delay)
            if b.mode == "split_whole":  # a JSON body in two writes, `chunk_delay` apart (not one read)
                whole = web.StreamResponse(headers={"Content-Type": "application/json"})
                whole.content_length = len(WHOLE_BODY)
                await whole.prepare(request)
                await whole.write(WHOLE_BODY[:20])
                await asyncio.sleep(b.chunk_delay)
                await whole.write(WHOLE_BODY[20:])
                await whole.write_eof()
                return whole
            return web.Response(body=WHOLE_BODY, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(b.chunks):
            await response.write(sse_chunk(i, b.padding))
            if b.mode in ("stall_mid", "drop_mid") and i == 1:
                if b.mode == "drop_mid":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await asyncio.sleep(STALL)
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        await response.write(USAGE_CHUNK + b"data: [DONE]\n\n")
        await response.write_eof()
        return response
