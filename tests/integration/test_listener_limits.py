"""One connection against a real gateway process (CASES F1, F2, G10): oversized heads, dribbled heads and bodies,
trickled bodies, answered requests with bodies still owed, and idle connections by the hundred are cut or evicted
by the listener, while liveness (on both ports), authenticated traffic and the replica health check carry on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fake_upstream import Behaviour, FakeVllm
from tests.harness.processes import free_port
from tests.support import RunningGateway, eventually, run_gateway_async, write_config

MAX_CONNECTIONS = 40
TRICKLE_EVERY = 0.1  # how often a slow client sends its next byte
KEY = "sk-listener"


@pytest.fixture
async def gateway(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> AsyncIterator[RunningGateway]:
    config = write_config(
        tmp_path / "g.yaml",
        [{"name": "m", "upstreams": [fake_a.url]}],
        head_timeout=2,
        body_idle_timeout=2,
        max_connections=MAX_CONNECTIONS,
        health_check_interval=0.5,
        metrics_port=free_port(),
        keys=[{"key": KEY}],
    )
    async with run_gateway_async(["--config", str(config)], log_dir) as running:
        yield running


def _connect(gateway: RunningGateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (the socket timeout fails the test)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def _live_answers(gateway: RunningGateway) -> bool:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=2) as client:
        return (await client.get("/health/live")).status_code == 200


async def _chat_answers(gateway: RunningGateway) -> int:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {KEY}"}
        return (await client.post("/v1/chat/completions", json=chat, headers=headers)).status_code


def _send_huge_header(gateway: RunningGateway, megabytes: int) -> tuple[int, int]:
    """(bytes the gateway took before refusing, its status)."""
    sock = _connect(gateway)
    sent = 0
    sock.sendall(b"GET /health/live HTTP/1.1\r\nhost: x\r\nx-filler: ")
    block = b"a" * 65536
    try:
        for _ in range(megabytes * 16):
            sock.sendall(block)
            sent += len(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        response = _read_all(sock)
    except (ConnectionResetError, OSError):
        response = b""
    sock.close()
    return sent, _status(response) if response else 0


async def test_an_oversized_head_is_refused_431_before_it_is_buffered(gateway: RunningGateway) -> None:
    sent, status = await asyncio.to_thread(_send_huge_header, gateway, 64)
    assert sent < 64 * 1024 * 1024, "the gateway stopped reading long before 64 MiB"
    assert status in (431, 0)  # 0: the reset raced the response on a full socket buffer
    many = b"GET /health/live HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(8000)) + b"\r\n"
    sock = _connect(gateway)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(many)
    response = await asyncio.to_thread(_read_all, sock)
    sock.close()
    assert _status(response) == 431 and b'"code":"headers_too_large"' in response
    assert await _live_answers(gateway)


async def test_liveness_and_replica_health_hold_while_a_huge_header_streams_in(
    gateway: RunningGateway, fake_a: FakeVllm
) -> None:
    attack = asyncio.create_task(asyncio.to_thread(_send_huge_header, gateway, 256))
    for _ in range(10):  # probes spread over the attack
        assert await _live_answers(gateway)
        await asyncio.sleep(TRICKLE_EVERY)
    await attack
    assert gateway.metric("gateway_replica_healthy", {"model": "m"}) == 1


async def test_dribbled_heads_get_408_and_stalled_bodies_are_cut(gateway: RunningGateway) -> None:
    sock = _connect(gateway)
    started = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
    for byte in b"host: x\r\n":
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(bytes([byte]))
        await asyncio.sleep(5 * TRICKLE_EVERY)
        if time.monotonic() - started > 4:
            break
    response = await asyncio.to_thread(_read_all, sock)
    sock.close()
    assert _status(response) == 408, response

    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    sock = _connect(gateway)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    head += b"authorization: Bearer %s\r\n" % KEY.encode()
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body[:10])  # and then nothing
    cut = await asyncio.to_thread(_read_all, sock)  # returns once the gateway closes the connection
    sock.close()
    assert not cut.startswith(b"HTTP/1.1 200"), cut
    assert await _live_answers(gateway)


async def test_idle_connections_by_the_hundred_cannot_keep_liveness_out(
    gateway: RunningGateway, fake_a: FakeVllm
) -> None:
    idle = [_connect(gateway) for _ in range(5 * MAX_CONNECTIONS)]  # each evicts an older idle one at the cap
    try:
        for _ in range(5):
            assert await _live_answers(gateway), "a probe evicts an idle connection instead of being refused"
        assert await _chat_answers(gateway) == 200
        assert gateway.metric("gateway_replica_healthy", {"model": "m"}) == 1
    finally:
        for sock in idle:
            sock.close()


async def test_trickled_bodies_cannot_hold_the_listener(gateway: RunningGateway) -> None:
    """CASES G10: thousands of connections that send a head, then a byte now and then, with no key. At the cap the
    oldest uploads are evicted, each is cut once it falls below the minimum body rate, and meanwhile the probes
    (on both ports) and an authenticated chat are answered."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{"
    trickling: list[socket.socket] = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):
            sock = _connect(gateway)
            with contextlib.suppress(OSError):
                sock.sendall(head)
            trickling.append(sock)
        for _ in range(3):
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.sendall(b" ")  # a byte each: never idle for body_idle_timeout, far below the rate
            assert await _live_answers(gateway)
            assert await _chat_answers(gateway) == 200
            async with httpx.AsyncClient(timeout=2) as client:
                side = gateway.metrics_url.removesuffix("/metrics")
                assert (await client.get(f"{side}/health/live")).status_code == 200
                assert (await client.get(f"{side}/health/ready")).status_code == 200
                assert b"gateway_requests_total" in (await client.get(f"{side}/metrics")).content
        survivor = trickling[-1]  # never evicted (the newest): the rate rule ends it within a window
        survivor.settimeout(15)
        cut = await asyncio.to_thread(_read_all, survivor)
        assert not cut.startswith(b"HTTP/1.1 200"), cut
    finally:
        for sock in trickling:
            sock.close()


async def test_an_answered_request_does_not_wait_for_the_rest_of_its_body(gateway: RunningGateway) -> None:
    """A 401 (no key) and a probe answered before their bodies arrived close the connection once answered, even
    while the client keeps sending; before, the connection read on at the client's pace."""
    for head in (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{",
        b"GET /health/live HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n{",
    ):
        sock = _connect(gateway)
        sock.settimeout(3)  # under the rate rule's 5 s window: only the answered-close rule can end it in time
        sock.sendall(head)
        stop = asyncio.Event()

        async def keep_sending(sock: socket.socket = sock, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock.sendall(b"x" * 64)
                await asyncio.sleep(TRICKLE_EVERY)

        sender = asyncio.create_task(keep_sending())
        try:
            answer = await asyncio.to_thread(_read_all, sock)  # returns at EOF: the gateway closed it
        finally:
            stop.set()
            await sender
            sock.close()
        assert _status(answer) in (200, 401), answer


async def test_busy_connections_at_the_cap_refuse_the_next_with_503(gateway: RunningGateway, fake_a: FakeVllm) -> None:
    """Connections whose whole request is being answered are not evicted; past the cap the newcomer gets 503 +
    Retry-After."""
    fake_a.behaviour = Behaviour(chunks=40, chunk_delay=0.1)  # each answer streams for ~4 s
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n" % KEY.encode()
    request = head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    busy = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = _connect(gateway)
            sock.sendall(request)
            busy.append(sock)
        assert await eventually(lambda: fake_a.hits == MAX_CONNECTIONS)
        extra = _connect(gateway)
        response = await asyncio.to_thread(_read_all, extra)
        extra.close()
        assert _status(response) == 503 and b"retry-after: 1" in response.lower()
    finally:
        for sock in busy:
            sock.close()
    assert await eventually(lambda: _live_answers(gateway), 5), "service comes back once the busy connections close"


async def test_a_large_body_behind_a_small_head_is_not_counted_as_head(gateway: RunningGateway) -> None:
    """A read can carry the head and much of the body; only the head counts against the head limit."""
    text = "word " * 160_000  # 800 kB of body (the fake replica takes up to 1 MB) in the same reads as the head
    chat = {"model": "m", "messages": [{"role": "user", "content": text}]}
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
