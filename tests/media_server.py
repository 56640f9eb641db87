"""A real HTTP media host on loopback with hostile behaviours: oversized, undeclared, drip-fed, redirecting, bombs."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from dataclasses import dataclass, field

from aiohttp import web
from PIL import Image

from tests.harness.processes import free_port

DRIP_EVERY = 0.2  # a drip-feeding host: one byte this often


def png_bytes(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def noisy_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-sized JPEG of noise: the worst case for a size-bounded re-encode."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def bomb_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_with_oversized_frame() -> bytes:
    """A GIF whose logical screen is 10x10 but whose only frame claims 30000x30000 at offset 0."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, 30000, 30000, 0)
    data = b"\x02\x02\x44\x01\x00"  # minimal LZW stream
    return screen + descriptor + data + b"\x3b"


@dataclass
class MediaHost:
    host: str = "127.0.0.1"
    files: dict[str, bytes] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    async def start(self) -> MediaHost:
        app = web.Application()
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get("/declared-huge", self._declared_huge)
        app.router.add_get("/undeclared-huge", self._undeclared_huge)
        app.router.add_get("/drip", self._drip)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/slow/{name}", self._slow)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _hit(self, request: web.Request) -> None:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1

    async def _file(self, request: web.Request) -> web.Response:
        self._hit(request)
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[name], content_type="application/octet-stream")

    async def _declared_huge(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        response = web.StreamResponse(headers={"Content-Length": str(300 * 1024 * 1024)})
        await response.prepare(request)
        await response.write(b"\x89PNG" + b"\x00" * 1024)
        return response

    async def _undeclared_huge(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"\x00" * (1024 * 1024)
        for _ in range(300):
            await response.write(block)
        return response

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        response = web.StreamResponse(headers={"Content-Length": "1000000"})
        await response.prepare(request)
        for _ in range(1000):
            await response.write(b"\x00")
            await asyncio.sleep(DRIP_EVERY)
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        self._hit(request)
        raise web.HTTPFound(request.query["to"])

    async def _slow(self, request: web.Request) -> web.Response:
        self._hit(request)
        await asyncio.sleep(float(request.query.get("delay", "3")))
        return web.Response(body=self.files[request.match_info["name"]])
