"""Media at the gateway, against a real gateway process and real media hosts on loopback (CASES A1-A3, A6, A7, B7)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from tests.fake_upstream import FakeVllm
from tests.media_server import MediaHost, bomb_png, gif_with_oversized_frame, png_bytes
from tests.support import RunningGateway, post_json, run_gateway_async, write_config

JSON = {"content-type": "application/json"}
SMALL_BUDGET = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat_with(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, *parts]}]}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def mp4(seconds: float, fps: int, size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), i % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.fixture
async def media_host() -> AsyncIterator[MediaHost]:
    host = await MediaHost().start()
    host.files["photo.png"] = png_bytes(1000, 800)
    host.files["bomb.png"] = bomb_png()
    host.files["frame-bomb.gif"] = gif_with_oversized_frame()
    yield host
    await host.stop()


async def _gateway(tmp_path: Path, log_dir: Path, upstream: FakeVllm, **media: Any) -> Any:
    models = [
        {
            "name": "m",
            "upstreams": [upstream.url],
            "limit_mm_per_prompt": {"image": 4, "video": 1},
            "max_model_len": 32768,
            **SMALL_BUDGET,
        }
    ]
    config = write_config(tmp_path / "media.yaml", models, media=media)
    return run_gateway_async(["--config", str(config)], log_dir)


@pytest.fixture
async def trusting(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> AsyncIterator[RunningGateway]:
    """A gateway that trusts 127.0.0.1 only (as an operator trusts an internal image store)."""
    settings = {
        "trusted_hosts": ["127.0.0.1/32"],
        "max_image_bytes": 2 * 1024 * 1024,
        "total_timeout": 3,
        "read_timeout": 2,
        "video_max_seconds": 10,
        "video_max_fps": 30,
    }
    async with await _gateway(tmp_path, log_dir, fake_a, **settings) as gateway:
        yield gateway


@pytest.fixture
async def strict(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> AsyncIterator[RunningGateway]:
    async with await _gateway(tmp_path, log_dir, fake_a) as gateway:
        yield gateway


async def _post(gateway: RunningGateway, body: dict[str, Any], timeout: float = 30) -> httpx.Response:
    return await post_json(gateway, "/v1/chat/completions", body, timeout=timeout)


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


def _forwarded_parts(fake: FakeVllm, body: bytes | None = None) -> list[dict[str, Any]]:
    """The media parts of a forwarded body (the last one by default)."""
    content = orjson.loads(body if body is not None else fake.bodies[-1])["messages"][0]["content"]
    return [p for p in content if p["type"] != "text"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "0x7f000001",
        "127.1",
        "0177.0.0.1",
        "localhost",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ],
)
async def test_loopback_in_any_spelling_is_refused_before_connecting(
    strict: RunningGateway, media_host: MediaHost, fake_a: FakeVllm, host: str
) -> None:
    url = f"http://{host}:{media_host.port}/files/photo.png"
    error = _error(await _post(strict, chat_with(image_part(url))), 400)
    assert error["code"] == "media_url_refused"
    assert error["param"] == "messages[0].content[1].image_url"
    assert media_host.total_hits == 0 and fake_a.hits == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x.png",
        "http://192.168.1.1/x.png",
        "http://100.64.0.1/x.png",
        "http://[fe80::1]/x.png",
        "http://224.0.0.1/x.png",
        "http://0.0.0.0/x.png",
    ],
)
async def test_private_link_local_and_reserved_addresses_are_refused(
    strict: RunningGateway, fake_a: FakeVllm, url: str
) -> None:
    assert _error(await _post(strict, chat_with(image_part(url))), 400)["code"] == "media_url_refused"
    assert fake_a.hits == 0


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/x",
        "ftp://example.com/x.png",
        "http://user:pw@example.com/x.png",
        "javascript:alert(1)",
    ],
)
async def test_other_schemes_and_credentials_are_refused(strict: RunningGateway, fake_a: FakeVllm, url: str) -> None:
    assert _error(await _post(strict, chat_with(image_part(url))), 400)["code"] == "media_url_refused"
    assert fake_a.hits == 0


async def test_data_urls_can_be_switched_off(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    async with await _gateway(tmp_path, log_dir, fake_a, allow_data_urls=False) as gateway:
        response = await _post(gateway, chat_with(image_part(data_url(png_bytes(28, 28)))))
    assert _error(response, 400)["code"] == "media_url_refused"
    assert fake_a.hits == 0


async def test_trusted_host_image_is_fetched_resized_and_tagged(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm
) -> None:
    response = await _post(trusting, chat_with(image_part(media_host.url("/files/photo.png"))))
    assert response.status_code == 200, response.text
    (part,) = _forwarded_parts(fake_a)
    assert set(part) == {"type", "image_url", "uuid"} and len(part["uuid"]) == 64
    header, encoded = part["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    # 1000x800 into at most 64 tokens of 28x28: Qwen's smart_resize floors to 224x196 (8x7 = 56 tokens).
    assert image.size == (224, 196)
    assert trusting.metric("gateway_media_items_total", {"modality": "image", "source": "remote"}) == 1


async def test_redirect_to_an_untrusted_private_address_is_refused(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm
) -> None:
    other = await MediaHost(host="127.0.0.2").start()
    other.files["photo.png"] = png_bytes(64, 64)
    try:
        target = other.url("/files/photo.png")
        response = await _post(trusting, chat_with(image_part(media_host.url(f"/redirect?to={target}"))))
        assert _error(response, 400)["code"] == "media_url_refused"
        assert media_host.hits["/redirect"] == 1 and other.total_hits == 0 and fake_a.hits == 0
        ok = await _post(trusting, chat_with(image_part(media_host.url("/redirect?to=/files/photo.png"))))
        assert ok.status_code == 200, "a redirect that stays on the trusted host is followed"
    finally:
        await other.stop()


async def test_oversized_media_is_413_whether_declared_or_not(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm
) -> None:
    pid = trusting.process.proc.pid  # type: ignore[union-attr]
    rss_before = _rss_kib(pid)
    for _ in range(5):
        for path in ("/declared-huge", "/undeclared-huge"):
            error = _error(await _post(trusting, chat_with(image_part(media_host.url(path)))), 413)
            assert error["code"] == "media_too_large"
    too_big_inline = data_url(b"\x00" * (3 * 1024 * 1024))
    assert _error(await _post(trusting, chat_with(image_part(too_big_inline))), 413)["code"] == "media_too_large"
    assert fake_a.hits == 0
    # 1.5 GB was offered across those requests; reads stop at the 2 MiB cap, so memory stays flat.
    assert _rss_kib(pid) - rss_before < 100 * 1024


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_drip_fed_media_times_out_with_408(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm
) -> None:
    error = _error(await _post(trusting, chat_with(image_part(media_host.url("/drip")))), 408)
    assert error["code"] == "media_fetch_timeout"
    assert fake_a.hits == 0


@pytest.mark.parametrize("name", ["bomb.png", "frame-bomb.gif"])
async def test_decompression_bombs_are_refused(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm, name: str
) -> None:
    for url in (media_host.url(f"/files/{name}"), data_url(media_host.files[name])):
        error = _error(await _post(trusting, chat_with(image_part(url))), 400)
        assert error["code"] == "invalid_image"
    assert fake_a.hits == 0


async def test_non_image_bytes_and_disallowed_formats_are_refused(trusting: RunningGateway, fake_a: FakeVllm) -> None:
    tiff = io.BytesIO()
    Image.new("RGB", (32, 32)).save(tiff, "TIFF")
    for payload in (b"<html>not an image</html>", tiff.getvalue()):
        assert _error(await _post(trusting, chat_with(image_part(data_url(payload)))), 400)["code"] == "invalid_image"
    assert fake_a.hits == 0


async def test_exif_orientation_is_applied(trusting: RunningGateway, fake_a: FakeVllm) -> None:
    tall = Image.new("RGB", (200, 400), (0, 0, 255))
    exif = tall.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is 400 wide, 200 tall
    out = io.BytesIO()
    tall.save(out, "JPEG", exif=exif)
    assert (await _post(trusting, chat_with(image_part(data_url(out.getvalue(), "image/jpeg"))))).status_code == 200
    (part,) = _forwarded_parts(fake_a)
    width, height = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1]))).size
    assert width > height


async def test_video_within_caps_is_forwarded_and_over_caps_refused(trusting: RunningGateway, fake_a: FakeVllm) -> None:
    ok = mp4(seconds=1, fps=10)
    response = await _post(trusting, chat_with({"type": "video_url", "video_url": {"url": data_url(ok, "video/mp4")}}))
    assert response.status_code == 200, response.text
    (part,) = _forwarded_parts(fake_a)
    assert part["video_url"]["url"] == data_url(ok, "video/mp4") and len(part["uuid"]) == 64
    for video, what in ((mp4(seconds=12, fps=2), "seconds long"), (mp4(seconds=1, fps=60), "frames per second")):
        body = chat_with({"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}})
        error = _error(await _post(trusting, body), 400)
        assert error["code"] == "invalid_video" and what in error["message"]
        assert error["param"] == "messages[0].content[1].video_url"
    assert fake_a.hits == 1


async def test_same_url_is_fetched_once_for_concurrent_and_repeated_requests(
    trusting: RunningGateway, media_host: MediaHost, fake_a: FakeVllm
) -> None:
    media_host.files["shared.png"] = png_bytes(300, 300)
    body = chat_with(image_part(media_host.url("/slow/shared.png?delay=0.5")))
    responses = await asyncio.gather(*[_post(trusting, body) for _ in range(8)])
    assert [r.status_code for r in responses] == [200] * 8
    assert (await _post(trusting, body)).status_code == 200
    assert media_host.hits["/slow/shared.png"] == 1
    uuids = {part["uuid"] for body in fake_a.bodies[-9:] for part in _forwarded_parts(fake_a, body)}
    assert len(fake_a.bodies) >= 9 and len(uuids) == 1, "all nine requests forwarded the same prepared image"


async def test_health_and_metrics_answer_while_32_slow_fetches_are_in_flight(
    trusting: RunningGateway, media_host: MediaHost
) -> None:
    for i in range(32):
        media_host.files[f"slow{i}.png"] = png_bytes(64 + i, 64)
    bodies = [chat_with(image_part(media_host.url(f"/slow/slow{i}.png?delay=1.5"))) for i in range(32)]
    in_flight = [asyncio.create_task(_post(trusting, body)) for body in bodies]
    await asyncio.sleep(0.5)
    # each answer well inside the 1.5 s fetches, or an exception
    async with httpx.AsyncClient(base_url=trusting.base_url, timeout=0.5) as client:
        for _ in range(5):
            assert (await client.get("/health/live")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
    assert not any(task.done() for task in in_flight), "the fetches were still in flight while health answered"
    assert [r.status_code for r in await asyncio.gather(*in_flight)] == [200] * 32


async def test_visual_token_estimate_is_checked_against_context(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    models = [{"name": "m", "upstreams": [fake_a.url], "max_model_len": 100, "max_pixels": 28 * 28 * 256}]
    config = write_config(tmp_path / "ctx.yaml", models)
    async with run_gateway_async(["--config", str(config)], log_dir) as gateway:
        response = await _post(gateway, chat_with(image_part(data_url(png_bytes(448, 448)))))
        assert _error(response, 400)["code"] == "context_length_exceeded"
        assert gateway.metric("gateway_media_visual_tokens_count") == 1
    assert fake_a.hits == 0


async def test_a_trusted_host_with_a_port_opens_that_port_only(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm, media_host: MediaHost
) -> None:
    """The gateway trusts the image store's port; the same host's other services (here, the fake replica itself)
    stay unreachable through an image URL."""
    async with await _gateway(tmp_path, log_dir, fake_a, trusted_hosts=[f"127.0.0.1:{media_host.port}"]) as gateway:
        served = await _post(gateway, chat_with(image_part(media_host.url("/files/photo.png"))))
        assert served.status_code == 200, served.text
        probing = chat_with(image_part(f"http://127.0.0.1:{fake_a.port}/health"))
        assert _error(await _post(gateway, probing), 400)["code"] == "media_url_refused"
    assert fake_a.hits == 1


def avi(seconds: float, fps: int) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


async def test_a_video_goes_on_with_its_sniffed_type_not_its_label(trusting: RunningGateway, fake_a: FakeVllm) -> None:
    """An MP4 labelled video/jpeg is forwarded as video/mp4 (vLLM decodes what the gateway checked); a container
    outside the accepted ones is refused."""
    ok = mp4(seconds=1, fps=10)
    labelled = {"type": "video_url", "video_url": {"url": data_url(ok, "video/jpeg")}}
    assert (await _post(trusting, chat_with(labelled))).status_code == 200
    (part,) = _forwarded_parts(fake_a)
    assert part["video_url"]["url"] == data_url(ok, "video/mp4")
    other = {"type": "video_url", "video_url": {"url": data_url(avi(1, 10), "video/mp4")}}
    error = _error(await _post(trusting, chat_with(other)), 400)
    assert error["code"] == "invalid_video" and "container" in error["message"]
    assert fake_a.hits == 1


async def test_requests_sharing_a_failed_fetch_each_get_their_own_param(
    trusting: RunningGateway, media_host: MediaHost
) -> None:
    media_host.files["not-an-image.png"] = b"<html>nope</html>"
    url = media_host.url("/slow/not-an-image.png?delay=0.5")
    text = {"type": "text", "text": "and"}
    first, second = await asyncio.gather(
        _post(trusting, chat_with(image_part(url))), _post(trusting, chat_with(text, text, image_part(url)))
    )
    assert _error(first, 400)["param"] == "messages[0].content[1].image_url"
    assert _error(second, 400)["param"] == "messages[0].content[3].image_url"
    assert media_host.hits["/slow/not-an-image.png"] == 1, "one fetch shared by both"
