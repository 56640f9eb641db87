"""Images/s through the gateway's media path (fetch -> check -> decode -> resize -> encode), per core.

Runs the real MediaPreparer against a real HTTP image host on loopback (a separate process, so the host's
work is not charged to the measured core), cache off, and prints it side by side with Pillow alone doing the
same decode+resize+encode on the same core, as a ratio. Pin it for per-core figures:
    taskset -c 0 .venv/bin/python loadtests/bench_media.py
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from PIL import Image

from gateway.config import MediaSettings, ModelPool
from gateway.media.images import prepare_image
from gateway.media.service import MediaPart, MediaPreparer
from gateway.metrics import GatewayMetrics
from tests.harness.processes import free_port

SIZES = [(512, 512), (1024, 768), (2048, 1536)]
POOL = ModelPool(name="bench", upstreams=["http://127.0.0.1:1"], max_pixels=1280 * 28 * 28)


def _photo(width: int, height: int) -> bytes:
    image = Image.effect_mandelbrot((width, height), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _serve(port: int, files: dict[str, bytes]) -> None:
    others = os.sched_getaffinity(0) ^ set(range(os.cpu_count() or 1))
    if others:  # keep the image host off the measured core
        os.sched_setaffinity(0, others)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=files[request.match_info["name"]], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


async def _pipeline(port: int, name: str, count: int, concurrency: int) -> float:
    settings = MediaSettings(trusted_hosts=["127.0.0.1/32"], cache_entries=0, decode_threads=1)
    preparer = MediaPreparer(settings, GatewayMetrics())
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            body = {"messages": [{"content": [{"type": "image_url", "image_url": {"url": ""}}]}]}
            part = MediaPart(0, 0, "image", f"http://127.0.0.1:{port}/{name}?i={i}")
            await preparer.prepare(body, [part], POOL)

    started = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(count)])
    elapsed = time.perf_counter() - started
    await preparer.close()
    return count / elapsed


def _pillow_only(data: bytes, count: int) -> float:
    """The same decode/resize/encode, called directly, in one worker thread as the gateway runs it."""

    def loop() -> float:
        started = time.perf_counter()
        for _ in range(count):
            prepare_image(
                data,
                min_pixels=POOL.min_pixels,
                max_pixels=POOL.max_pixels,
                max_decode_pixels=10**8,
                formats=("JPEG",),
                param="p",
            )
        return count / (time.perf_counter() - started)

    with ThreadPoolExecutor(1) as worker:
        return worker.submit(loop).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = {f"{w}x{h}.jpg": _photo(w, h) for w, h in SIZES}
    port = free_port()
    host = multiprocessing.Process(target=_serve, args=(port, files), daemon=True)
    host.start()
    time.sleep(1.0)
    print(f"median of {args.rounds} interleaved rounds, {args.count} images each, concurrency {args.concurrency}")
    print(f"{'image':>12} {'bytes':>9} {'gateway img/s':>14} {'pillow-only img/s':>18} {'ratio':>6}")
    try:
        for (w, h), (name, data) in zip(SIZES, files.items(), strict=True):
            throughs, alones = [], []
            for _ in range(args.rounds):  # interleaved, so drift hits both arms alike
                throughs.append(asyncio.run(_pipeline(port, name, args.count, args.concurrency)))
                alones.append(_pillow_only(data, args.count))
            through, alone = statistics.median(throughs), statistics.median(alones)
            print(f"{f'{w}x{h}':>12} {len(data):>9} {through:>14.1f} {alone:>18.1f} {through / alone:>6.2f}")
    finally:
        host.terminate()


if __name__ == "__main__":
    main()
