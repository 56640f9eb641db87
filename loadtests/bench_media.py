"""Images/s through the gateway's media path, per core, side by side with the pipeline it replaced.

Arms, on the same images in interleaved rounds, each in one worker thread as the gateway runs it:
  gateway   the real MediaPreparer (fetch from a loopback image host in another process -> checks -> prepare),
            cache off
  prepare   today's prepare_image alone: header checks, JPEG shrink-on-load (DCT scaling), OpenCV resize, encode
  previous  the pipeline before shrink-on-load and OpenCV: full decode, orient, Pillow bicubic resize, encode (kept
            here as the baseline; same checks)
  forward   for an image already at its target size (a client that sizes with Qwen's rule, as qwen-vl-utils does):
            the same checks and full decode (which is what proves the bytes whole), then the source bytes hashed
            and base64'd for vLLM instead of re-encoded (the alternative to re-encoding, measured; not shipped)
  vllm      Qwen2.5-VL's own image processor (transformers, in vLLM's virtualenv) on the same bytes: the CPU the
            engine's host spends when handed an image as-is (--vllm-python; a subprocess, same core)
for two pixel budgets: the processor's default (max_pixels 12.8 MP) and ~1 MP (max_pixels 1280*28*28).
Then the peak resident memory a fresh process adds to prepare one 12 MP photo, new path against previous.
Pin it for per-core figures:
    taskset -c 0 .venv/bin/python loadtests/bench_media.py --vllm-python ~/.cache/vlm-gateway/vllm-*/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web
from PIL import Image

from gateway.config import MediaSettings, ModelPool
from gateway.media.images import decode_image, load_rgb, open_image, prepare_image, smart_resize
from gateway.media.pixels import JPEG_QUALITY
from gateway.media.service import MediaPart, MediaPreparer
from gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.processes import free_port  # noqa: E402

IMAGES = [("512x512.jpg", 512, 512), ("1024x768.jpg", 1024, 768), ("2048x1536.jpg", 2048, 1536),
          ("4032x3024.jpg", 4032, 3024), ("1024x768.png", 1024, 768)]  # fmt: skip
SIZED = [("1036x756.jpg", 1036, 756), ("448x448.jpg", 448, 448)]  # already at Qwen's dimensions: nothing to resize
BUDGETS = {"default": 16384 * 28 * 28, "1MP": 1280 * 28 * 28}
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
VLLM_ANCHOR = """
import io, json, sys, time
from PIL import Image
from transformers import Qwen2VLImageProcessor
data, count, max_pixels = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=max_pixels)
started = time.perf_counter()
for _ in range(count):
    processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
print(json.dumps(count / (time.perf_counter() - started)))
"""
PEAK_MEMORY = """
import sys
from pathlib import Path
from loadtests.bench_media import previous_prepare, today_prepare
data = open(sys.argv[1], "rb").read()
arm = today_prepare if sys.argv[2] == "prepare" else previous_prepare
def peak_kib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1])
# ru_maxrss would carry the parent's peak across fork+exec; VmHWM is this process's own, reset here.
Path("/proc/self/clear_refs").write_text("5")
before = peak_kib()
arm(data, int(sys.argv[3]))
print((peak_kib() - before) // 1024)
"""


def _photo(width: int, height: int, fmt: str) -> bytes:
    image = Image.effect_mandelbrot((width, height), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    out = io.BytesIO()
    image.save(out, fmt, quality=90) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


def today_prepare(data: bytes, max_pixels: int) -> None:
    prepare_image(data, min_pixels=3136, max_pixels=max_pixels, max_decode_pixels=10**8, formats=FORMATS, param="p")


def forward_validated(data: bytes, max_pixels: int) -> None:
    """Checks and a full decode as prepare_image does, then the source's own bytes as the data URL."""
    image = open_image(data, max_decode_pixels=10**8, formats=FORMATS, param="p")
    load_rgb(image, "p")
    hashlib.sha256(data).hexdigest()
    "data:image/jpeg;base64," + base64.b64encode(data).decode()


def previous_prepare(data: bytes, max_pixels: int) -> None:
    """The path before shrink-on-load: decode everything, then one bicubic pass, then encode."""
    rgb = decode_image(data, max_decode_pixels=10**8, formats=FORMATS, param="p")
    height, width = smart_resize(rgb.height, rgb.width, 3136, max_pixels)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    rgb.save(io.BytesIO(), "JPEG", quality=JPEG_QUALITY)


def _serve(port: int, files: dict[str, bytes]) -> None:
    others = os.sched_getaffinity(0) ^ set(range(os.cpu_count() or 1))
    if others:  # keep the image host off the measured core
        os.sched_setaffinity(0, others)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=files[request.match_info["name"]], content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


async def _gateway(port: int, name: str, count: int, concurrency: int, max_pixels: int) -> float:
    settings = MediaSettings(trusted_hosts=["127.0.0.1/32"], cache_bytes=0, decode_threads=1)
    preparer = MediaPreparer(settings, GatewayMetrics())
    pool = ModelPool(name="bench", upstreams=["http://127.0.0.1:1"], max_pixels=max_pixels)
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            await preparer.prepare([MediaPart("image", f"http://127.0.0.1:{port}/{name}?i={i}", "p")], pool)

    started = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(count)])
    elapsed = time.perf_counter() - started
    await preparer.close()
    return count / elapsed


def _in_thread(arm: Callable[[bytes, int], None], data: bytes, count: int, max_pixels: int) -> float:
    def loop() -> float:
        started = time.perf_counter()
        for _ in range(count):
            arm(data, max_pixels)
        return count / (time.perf_counter() - started)

    with ThreadPoolExecutor(1) as worker:
        return worker.submit(loop).result()


def _vllm(python: str, path: Path, count: int, max_pixels: int) -> float:
    out = subprocess.run([python, "-c", VLLM_ANCHOR, str(path), str(count), str(max_pixels)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _peak_mib(path: Path, arm: str, max_pixels: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", PEAK_MEMORY, str(path), arm, str(max_pixels)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return int(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vllm-python", default=None, help="vLLM's virtualenv python, for the processor anchor")
    args = parser.parse_args()
    files = {name: _photo(w, h, "PNG" if name.endswith(".png") else "JPEG") for name, w, h in IMAGES + SIZED}
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-media"
    scratch.mkdir(exist_ok=True)
    for name, data in files.items():
        (scratch / name).write_bytes(data)
    port = free_port()
    host = multiprocessing.Process(target=_serve, args=(port, files), daemon=True)
    host.start()
    time.sleep(1.0)
    print(f"img/s, median of {args.rounds} interleaved rounds, {args.count} images each, gateway concurrency "
          f"{args.concurrency}; ratios against `previous` (the pipeline before shrink-on-load and OpenCV)")  # fmt: skip
    header = f"{'image':>14} {'budget':>8} {'gateway':>8} {'prepare':>8} {'previous':>9} {'vllm':>7}"
    print(header + f" {'prepare/prev':>13} {'gateway/prev':>13} {'prepare/vllm':>13}")
    try:
        for name, _, _ in IMAGES:
            for budget, max_pixels in BUDGETS.items():
                arms: dict[str, list[float]] = {"gateway": [], "prepare": [], "previous": [], "vllm": []}
                for _ in range(args.rounds):  # interleaved, so drift hits every arm alike
                    arms["gateway"].append(asyncio.run(_gateway(port, name, args.count, args.concurrency, max_pixels)))
                    arms["prepare"].append(_in_thread(today_prepare, files[name], args.count, max_pixels))
                    arms["previous"].append(_in_thread(previous_prepare, files[name], args.count, max_pixels))
                    if args.vllm_python:
                        arms["vllm"].append(_vllm(args.vllm_python, scratch / name, args.count, max_pixels))
                m = {arm: statistics.median(values) if values else float("nan") for arm, values in arms.items()}
                print(f"{name:>14} {budget:>8} {m['gateway']:>8.1f} {m['prepare']:>8.1f} {m['previous']:>9.1f} "
                      f"{m['vllm']:>7.1f} {m['prepare'] / m['previous']:>13.2f} {m['gateway'] / m['previous']:>13.2f} "
                      f"{m['prepare'] / m['vllm']:>13.2f}")  # fmt: skip
        print(f"\nalready sized, default budget: {'image':>14} {'prepare':>8} {'forward':>8} {'vllm':>7} "
              f"{'forward/prepare':>16}")  # fmt: skip
        for name, _, _ in SIZED:
            sized: dict[str, list[float]] = {"prepare": [], "forward": [], "vllm": []}
            for _ in range(args.rounds):
                sized["prepare"].append(_in_thread(today_prepare, files[name], args.count, BUDGETS["default"]))
                sized["forward"].append(_in_thread(forward_validated, files[name], args.count, BUDGETS["default"]))
                if args.vllm_python:
                    sized["vllm"].append(_vllm(args.vllm_python, scratch / name, args.count, BUDGETS["default"]))
            m = {arm: statistics.median(values) if values else float("nan") for arm, values in sized.items()}
            print(f"{'':>30} {name:>14} {m['prepare']:>8.1f} {m['forward']:>8.1f} {m['vllm']:>7.1f} "
                  f"{m['forward'] / m['prepare']:>16.2f}")  # fmt: skip
        for budget, max_pixels in BUDGETS.items():
            new, old = (_peak_mib(scratch / "4032x3024.jpg", arm, max_pixels) for arm in ("prepare", "previous"))
            print(f"peak RSS added by one 12 MP JPEG, budget {budget}: prepare {new} MiB, previous {old} MiB")
    finally:
        host.terminate()


if __name__ == "__main__":
    main()
