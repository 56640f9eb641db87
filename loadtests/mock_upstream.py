"""A fast vLLM-shaped mock for measuring what a gateway itself costs.

Answers `POST /v1/chat/completions` and `/v1/completions` (JSON, or SSE when the body asks for `"stream": true`),
`GET /health` and `GET /v1/models`, over HTTP/1.1 keep-alive, from a bare asyncio protocol on uvloop: canned
bytes, no framework, ~10 µs of work per request. `--tokens` chunks per stream, `--token-delay` seconds between
them (0: the whole stream in one write); a stream asking `max_tokens` = `--paced-max-tokens` (64) gets
`--pace-ms` (5) between its tokens instead, whatever proxy it came through.

    python loadtests/mock_upstream.py --port 9000 [--tokens 16] [--token-delay 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import cast

import orjson

MODEL = "mock"
MAX_TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')


def _chunk(i: int) -> bytes:
    body = orjson.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
        }
    )
    return b"data: " + body + b"\n\n"


def _http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
)
USAGE = (
    b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1,"model":"mock","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":16,"total_tokens":25}}\n\n'
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mock"}]})


def _response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (content_type, len(body), body)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"


class MockProtocol(asyncio.Protocol):
    def __init__(self, tokens: int, token_delay: float, paced_max_tokens: int = 0, pace_ms: float = 0) -> None:
        self.tokens = tokens
        self.token_delay = token_delay
        self.paced_max_tokens = paced_max_tokens
        self.pace_ms = pace_ms
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.whole_stream = (
            STREAM_HEAD
            + b"".join(_http_chunk(_chunk(i)) for i in range(tokens))
            + _http_chunk(USAGE + b"data: [DONE]\n\n")
            + b"0\r\n\r\n"
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self._answer(head.split(b" ", 2), body)

    def _answer(self, request_line: list[bytes], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if method == b"GET":
            if path.startswith(b"/v1/models"):
                self.transport.write(_response(MODELS))
            else:
                self.transport.write(_response(b""))
            return
        if b'"stream":true' in body.replace(b" ", b""):
            delay = self.token_delay
            asked = MAX_TOKENS.search(body)  # every proxy forwards max_tokens, so it carries the pacing request
            if self.paced_max_tokens and asked and int(asked.group(1)) == self.paced_max_tokens:
                delay = self.pace_ms / 1000
            if delay <= 0:
                self.transport.write(self.whole_stream)
            else:
                asyncio.get_running_loop().create_task(
                    self._paced_stream(delay, int(asked.group(1)) if asked else self.tokens)
                )
            return
        self.transport.write(_response(COMPLETION))

    async def _paced_stream(self, delay: float, tokens: int) -> None:
        assert self.transport is not None
        self.transport.write(STREAM_HEAD)
        for i in range(tokens):
            if self.transport.is_closing():
                return
            self.transport.write(_http_chunk(_chunk(i)))
            await asyncio.sleep(delay)
        self.transport.write(_http_chunk(USAGE + b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(host: str, port: int, tokens: int, token_delay: float, paced_max_tokens: int, pace_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(tokens, token_delay, paced_max_tokens, pace_ms), host, port, backlog=4096
    )
    print(f"mock upstream on http://{host}:{port} ({tokens} tokens, {token_delay}s apart)", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--paced-max-tokens", type=int, default=64, help="streams asking this max_tokens are paced")
    parser.add_argument("--pace-ms", type=float, default=5.0, help="gap between their tokens")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    started = time.perf_counter()
    try:
        asyncio.run(serve(args.host, args.port, args.tokens, args.token_delay, args.paced_max_tokens, args.pace_ms))
    except KeyboardInterrupt:
        print(f"mock upstream stopped after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
