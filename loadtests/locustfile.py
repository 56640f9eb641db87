"""Locust users for every route a client drives: chat (whole and streamed, with time to first token and
inter-token gaps read from the SSE), chat with synthetic images of several sizes, chat with a short video,
embeddings (text and image) and search.

    locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 60s --host http://127.0.0.1:8080 \\
        --csv .cache/locust/run --only-summary  ChatUser StreamUser ImageUser VideoUser EmbeddingsUser SearchUser

Environment: GATEWAY_API_KEY (default "none"), GATEWAY_MODEL (default: the first model /v1/models lists),
GATEWAY_EMBEDDING_MODEL (default: the first embedding model listed). Streams report three extra entries:
"ttft" (time to the first content chunk), "itl" (every gap between chunks) and "stream" (the whole stream).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from functools import cache
from typing import Any

import numpy as np
from locust import HttpUser, between, events, tag, task
from PIL import Image

API_KEY = os.environ.get("GATEWAY_API_KEY", "none")
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
IMAGE_SIZES = [(64, 64), (448, 336), (1280, 960)]


@cache
def png_data_url(width: int, height: int) -> str:
    pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


@cache
def mp4_data_url(seconds: float = 2.0, fps: int = 4) -> str:
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = 112, 112
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((112, 112, 3), (i * 30) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(out.getvalue()).decode()


def _report(name: str, kind: str, seconds: float, length: int = 0, error: Exception | None = None) -> None:
    events.request.fire(
        request_type=kind, name=name, response_time=seconds * 1000, response_length=length, exception=error, context={}
    )


class GatewayUser(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.05)
    model = ""
    embedding_model = ""

    def on_start(self) -> None:
        listed = self.client.get("/v1/models", headers=HEADERS, name="/v1/models").json()["data"]
        embedding = [m["id"] for m in listed if m["capabilities"].get("embeddings")]
        chat = [m["id"] for m in listed if not m["capabilities"].get("embeddings")]
        self.model = os.environ.get("GATEWAY_MODEL") or (chat[0] if chat else "")
        self.embedding_model = os.environ.get("GATEWAY_EMBEDDING_MODEL") or (embedding[0] if embedding else "")

    def chat(self, content: Any, name: str, max_tokens: int = 16) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        with self.client.post("/v1/chat/completions", json=body, headers=HEADERS, name=name, catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("choices"):
                r.failure(f"{r.status_code}: {r.text[:200]}")

    def stream(self, content: Any, name: str, max_tokens: int = 32) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first: float | None = None
        last = started
        chunks = 0
        with self.client.post(
            "/v1/chat/completions", json=body, headers=HEADERS, name=name, stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:]
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    response.failure(event["error"].get("message", "error event"))
                    return
                now = time.perf_counter()
                if first is None:
                    first = now - started
                    _report(name, "ttft", first)
                else:
                    _report(name, "itl", now - last)
                last = now
                chunks += 1
            if first is None:
                response.failure("stream ended without a chunk")
                return
            _report(name, "stream", time.perf_counter() - started, chunks)


class ChatUser(GatewayUser):
    @tag("chat")
    @task
    def chat_text(self) -> None:
        self.chat("Say something short.", "chat")


class StreamUser(GatewayUser):
    @tag("chat", "stream")
    @task
    def chat_stream(self) -> None:
        self.stream("Tell me a story.", "chat stream")


class ImageUser(GatewayUser):
    @tag("image")
    @task
    def chat_image(self) -> None:
        width, height = random.choice(IMAGE_SIZES)  # load shape, not security
        parts = [
            {"type": "text", "text": "Describe it."},
            {"type": "image_url", "image_url": {"url": png_data_url(width, height)}},
        ]
        self.chat(parts, f"chat image {width}x{height}")


class VideoUser(GatewayUser):
    @tag("video")
    @task
    def chat_video(self) -> None:
        parts = [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": mp4_data_url()}}]
        self.chat(parts, "chat video")


class EmbeddingsUser(GatewayUser):
    @tag("embeddings")
    @task(3)
    def embed_text(self) -> None:
        body = {"model": self.embedding_model, "input": ["a photo of a cat", "a red square"]}
        self._embed(body, "embeddings text")

    @tag("embeddings")
    @task
    def embed_image(self) -> None:
        body = {
            "model": self.embedding_model,
            "input": [{"type": "image_url", "image_url": {"url": png_data_url(64, 64)}}],
        }
        self._embed(body, "embeddings image")

    def _embed(self, body: dict[str, Any], name: str) -> None:
        with self.client.post("/v1/embeddings", json=body, headers=HEADERS, name=name, catch_response=True) as r:
            if r.status_code != 200 or len(r.json().get("data", [])) != len(body["input"]):
                r.failure(f"{r.status_code}: {r.text[:200]}")


class SearchUser(GatewayUser):
    collection = "locust"

    def on_start(self) -> None:
        super().on_start()
        with self.client.post(
            "/v1/collections",
            json={"name": self.collection},
            headers=HEADERS,
            name="create collection",
            catch_response=True,
        ) as created:
            if created.status_code in (201, 409):  # 409: another user made it first
                created.success()
        items = [{"id": f"item-{i}", "text": f"item number {i}", "metadata": {"n": i}} for i in range(64)]
        url = f"/v1/collections/{self.collection}/items"
        for _ in range(100):  # a 409 above may mean another user's create is still under way
            with self.client.post(
                url, json={"items": items}, headers=HEADERS, name="add items", catch_response=True
            ) as r:
                if r.status_code != 404:
                    return
                r.success()
                time.sleep(0.1)
        raise RuntimeError(f"collection {self.collection} never became usable")

    @tag("search")
    @task
    def search(self) -> None:
        body = {"collection": self.collection, "query": {"text": "item number 7"}, "top_k": 5}
        with self.client.post("/v1/search", json=body, headers=HEADERS, name="search", catch_response=True) as r:
            if r.status_code != 200 or not r.json().get("data"):
                r.failure(f"{r.status_code}: {r.text[:200]}")
