"""Embeddings throughput: the raw CLIP encoder vs the `/v1/embeddings` endpoint, on the same core, in one run.

Raw: the encoder called directly at batch 1/8/32/64 (this process, pinned to core 0, one torch thread).
Endpoint: a real gateway process pinned to core 0 (one torch thread), loaded from this process on core 1 with
single-input requests at concurrency 1/16/64. Prints items/s and the endpoint's ratio to the raw batch-64 figure.
    .venv/bin/python loadtests/bench_embeddings.py --models tiny-random ViT-B-32 --modalities text image
ViT-B-32 runs with random weights: the same FLOPs as the released checkpoint, no download.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from PIL import Image

from gateway.embeddings.encoder import OpenClipEncoder
from gateway.retrieval_settings import EmbeddingsSettings
from tests.harness.processes import free_port, gateway_process

GATEWAY_CORE, LOAD_CORE = 0, 1


def _image_bytes(seed: int) -> bytes:
    image = Image.effect_mandelbrot((256, 256), (-2.0 + seed * 0.01, -1.5, 1.0, 1.5), 40).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def _payloads(encoder: OpenClipEncoder, modality: str, count: int) -> list[Any]:
    if modality == "text":
        return encoder.tokenize([f"a photo of object number {i}" for i in range(count)])
    return [encoder.preprocess(Image.open(io.BytesIO(_image_bytes(i)))) for i in range(count)]


def raw_throughput(encoder: OpenClipEncoder, modality: str, batch: int, seconds: float) -> float:
    items = _payloads(encoder, modality, batch)
    encode = encoder.encode_text if modality == "text" else encoder.encode_image
    encode(items)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        encode(items)
        done += batch
    return done / (time.perf_counter() - started)


async def endpoint_throughput(base_url: str, model: str, modality: str, concurrency: int, seconds: float) -> float:
    images = [base64.b64encode(_image_bytes(i)).decode() for i in range(16)]

    def body(i: int) -> bytes:
        if modality == "text":
            value: Any = f"a photo of object number {i}"
        else:
            value = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{images[i % 16]}"}}]
        return orjson.dumps({"model": model, "input": value, "encoding_format": "base64"})

    done = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < deadline:
                async with session.post(
                    f"{base_url}/v1/embeddings", data=body(i), headers={"content-type": "application/json"}
                ) as response:
                    await response.read()
                    assert response.status == 200, response.status
                done += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(concurrency)])
        return done / (time.perf_counter() - started)


def bench_model(clip_model: str, modalities: list[str], seconds: float, log_dir: Path) -> list[str]:
    import torch

    settings = EmbeddingsSettings(clip_model=clip_model, pretrained=None, max_batch=64, max_wait_ms=2)
    os.sched_setaffinity(0, {GATEWAY_CORE})
    torch.set_num_threads(1)
    encoder = OpenClipEncoder(settings)
    rows = []
    raw: dict[str, dict[int, float]] = {}
    for modality in modalities:
        raw[modality] = {b: raw_throughput(encoder, modality, b, seconds) for b in (1, 8, 32, 64)}
    config = log_dir / f"bench-{clip_model}.yaml"
    config.write_text(yaml.safe_dump({"embeddings": settings.model_dump(), "log_level": "warning"}))
    port = free_port()
    process = gateway_process(
        ["--config", str(config)],
        port=port,
        log_path=log_dir / f"gateway-{port}.log",
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    process.argv[:0] = ["taskset", "-c", str(GATEWAY_CORE)]
    process.start()
    os.sched_setaffinity(0, {LOAD_CORE})
    try:
        process.wait_ready(60)
        base_url = f"http://127.0.0.1:{port}"
        asyncio.run(_wait_encoder(base_url))
        for modality in modalities:
            for batch, value in raw[modality].items():
                rows.append(f"{clip_model:>12} {modality:>6} {'raw batch ' + str(batch):>16} {value:>10.1f}")
            best = raw[modality][64]
            for concurrency in (1, 16, 64):
                runs = [
                    asyncio.run(endpoint_throughput(base_url, settings.model_name(), modality, concurrency, seconds))
                    for _ in range(2)
                ]
                value = statistics.median(runs)
                rows.append(
                    f"{clip_model:>12} {modality:>6} {'endpoint c=' + str(concurrency):>16} {value:>10.1f}"
                    f"   ratio to raw batch 64: {value / best:.2f}"
                )
    finally:
        process.stop()
    return rows


async def _wait_encoder(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(f"{base_url}/health/ready") as response:
                if (await response.json())["embeddings"]["state"] == "ready":
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("encoder did not load")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-random", "ViT-B-32"])
    parser.add_argument("--modalities", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for model in args.models for row in bench_model(model, args.modalities, args.seconds, Path(tmp))]
    print(f"{'model':>12} {'input':>6} {'arm':>16} {'items/s':>10}   (one core each; load from the other core)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
