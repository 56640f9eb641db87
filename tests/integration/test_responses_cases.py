"""CASES A1-A11 and B1-B6 on `/v1/responses`, as on chat: a real gateway process, fake replicas on loopback.

The same checks guard every generation route; these prove the Responses route is wired through each of them
(its media parts, its fields, its stream's error event) rather than trusting that it shares the code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.fake_upstream import Behaviour, FakeVllm
from tests.harness.processes import free_port
from tests.media_server import DRIP_EVERY
from tests.support import (
    RunningGateway,
    eventually,
    png_data_url,
    post_json,
    run_gateway_async,
    two_fake_replicas,
    write_config,
)

HEADERS = {"content-type": "application/json"}


def _create(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hello", "max_output_tokens": 8, **fields}


def _with_image(url: str) -> dict[str, Any]:
    parts = [{"type": "input_text", "text": "what?"}, {"type": "input_image", "image_url": url}]
    return _create(input=[{"role": "user", "content": parts}])


def _bombpng_data_url() -> str:
    """A tiny PNG whose header declares 60000 x 60000 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    body = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(body).decode()


@pytest.fixture
async def gateway(tmp_path: Path, log_dir: Path, fake_a: FakeVllm, fake_b: FakeVllm) -> AsyncIterator[RunningGateway]:
    models = [two_fake_replicas((fake_a.url, fake_b.url), images=2, first_token=1, idle=1)]
    config = write_config(
        tmp_path / "g.yaml", models, health_check_interval=60, replica_cooldown=30, max_body_bytes=4 * 1024 * 1024
    )
    async with run_gateway_async(["--config", str(config)], log_dir) as running:
        yield running


async def _post(gateway: RunningGateway, body: dict[str, Any] | bytes) -> httpx.Response:
    return await post_json(gateway, "/v1/responses", body, headers=HEADERS)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",  # A1
        "http://127.0.0.1:8000/metrics",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://2130706433/x.png",
        "http://10.1.2.3/x.png",
        "file:///etc/passwd",  # A2
        "gopher://example.com/x",
    ],
)
async def test_private_and_odd_media_urls_are_refused_before_any_connect(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm, url: str
) -> None:
    error = _error(await _post(gateway, _with_image(url)), 400)
    assert error["param"] == "input[0].content[1].image_url"
    assert fake_a.hits + fake_b.hits == 0


async def test_a_drip_fed_media_host_is_cut_off(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:  # A3
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(600):
                writer.write(b"\x00")
                await writer.drain()
                await asyncio.sleep(DRIP_EVERY)

    server = await asyncio.start_server(drip, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    models = [{"name": "m", "upstreams": [fake_a.url]}]
    media = {"trusted_hosts": [f"127.0.0.1:{port}"], "total_timeout": 2}
    config = write_config(tmp_path / "g.yaml", models, media=media, health_check_interval=60)
    async with server, run_gateway_async(["--config", str(config)], log_dir) as gateway:
        error = _error(await _post(gateway, _with_image(f"http://127.0.0.1:{port}/slow.png")), 408)
    assert error["param"] == "input[0].content[1].image_url"
    assert fake_a.hits == 0


async def test_a_huge_body_is_refused_before_parsing(gateway: RunningGateway) -> None:  # A4
    body = b'{"model":"m","input":"' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert _error(await _post(gateway, body), 413)


async def test_too_many_images_and_bombs(gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm) -> None:
    image = {"type": "input_image", "image_url": png_data_url()}
    three = _create(input=[{"role": "user", "content": [image, image, image]}])
    error = _error(await _post(gateway, three), 400)  # A5
    assert "At most 2 image(s)" in error["message"] and error["param"] == "input[0].content[2].image_url"
    bomb = _error(await _post(gateway, _with_image(_bombpng_data_url())), 400)  # A6
    assert bomb["code"] == "invalid_image"
    assert fake_a.hits + fake_b.hits == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mm_processor_kwargs": {"max_pixels": 10**9}}, "mm_processor_kwargs"),  # A7
        ({"media_io_kwargs": {"video": {"num_frames": 10**6}}}, "media_io_kwargs"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),  # A8
        ({"temperature": -1}, "temperature"),
        ({"top_logprobs": 500}, "top_logprobs"),
        ({"max_tool_calls": 10**9}, "max_tool_calls"),
        ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),  # A9
        ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"structured_outputs": {"grammar": "x"}}, "structured_outputs"),
        ({"input": 42}, "input"),  # A11
        ({"input": []}, "input"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "name": "f",
                        "parameters": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]},
                    }
                ]
            },
            "tools[0].parameters",
        ),
    ],
)
async def test_bounded_fields_and_engine_steering(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm, fields: dict[str, Any], param: str
) -> None:
    error = _error(await _post(gateway, _create(**fields)), 400)
    assert error["param"] == param, error
    assert fake_a.hits + fake_b.hits == 0


async def test_malformed_and_oversized_text(gateway: RunningGateway, fake_a: FakeVllm) -> None:  # A10, A11
    assert _error(await _post(gateway, b'{"model": "m", "input": '), 400)["message"].startswith("The request body")
    assert _error(await _post(gateway, b"[1, 2]"), 400)
    assert _error(await _post(gateway, b'{"model":"m","input":"hi","temperature":NaN}'), 400)
    deep = b'{"model":"m","input":"hi","metadata":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert _error(await _post(gateway, deep), 400)
    long = _error(await _post(gateway, _create(input="word " * 600_000)), 400)
    assert long["code"] == "context_length_exceeded" and long["param"] == "input"
    assert fake_a.hits == 0


async def test_a_replica_dying_mid_stream_ends_it_with_an_error_event(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:  # B1
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="drop_mid")
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        async with client.stream(
            "POST", "/v1/responses", content=orjson.dumps(_create(stream=True)), headers=HEADERS
        ) as r:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
    last = [event for event in body.split(b"\n\n") if event][-1]
    assert last.startswith(b"event: error\ndata: ")
    assert orjson.loads(last.split(b"data: ", 1)[1])["code"] == "upstream_error"
    assert fake_a.hits + fake_b.hits == 1, "no retry after the first byte"


async def test_a_replica_that_never_answers_gives_504(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="stall_first")  # B2
    assert _error(await _post(gateway, _create()), 504)["code"] == "upstream_timeout"
    assert fake_a.hits + fake_b.hits == 1, "no retry once the first-token clock ran out"


async def test_saturated_replicas_are_retried_once_then_429(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="status", status=429, retry_after="7")  # B3
    response = await _post(gateway, _create())
    assert _error(response, 429) and response.headers["retry-after"] == "7"
    assert fake_a.hits == fake_b.hits == 1, "one bounded retry on the other replica"


async def test_upstream_400_passes_through_without_retry(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:  # B4
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="status", status=400, message="This model's maximum context")
    error = _error(await _post(gateway, _create()), 400)
    assert "maximum context" in error["message"]
    assert fake_a.hits + fake_b.hits == 1


async def test_a_client_leaving_mid_stream_closes_the_upstream(
    gateway: RunningGateway, fake_a: FakeVllm, fake_b: FakeVllm
) -> None:  # B5
    fake_a.behaviour = fake_b.behaviour = Behaviour(mode="client_gone")
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
        async with client.stream(
            "POST", "/v1/responses", content=orjson.dumps(_create(stream=True)), headers=HEADERS
        ) as r:
            async for _ in r.aiter_raw():
                break  # the first event arrived: hang up
    assert await eventually(lambda: fake_a.aborted + fake_b.aborted == 1, 5)


async def test_a_replica_that_refuses_connections_is_skipped(
    tmp_path: Path, log_dir: Path, fake_b: FakeVllm
) -> None:  # B6
    dead = f"http://127.0.0.1:{free_port()}"
    models = [{"name": "m", "upstreams": [dead, fake_b.url], "routing": "least_outstanding"}]
    config = write_config(tmp_path / "g.yaml", models, health_check_interval=60)
    async with run_gateway_async(["--config", str(config)], log_dir) as gateway:
        for _ in range(3):
            assert (await _post(gateway, _create())).status_code == 200
    assert fake_b.hits == 3
