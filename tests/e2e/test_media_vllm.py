"""Media through the whole path: the gateway fetches, checks and resizes; real vLLM counts the visual tokens."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import MODEL, Replica, gateway_args
from tests.e2e.test_chat_vllm import client
from tests.media_server import png_bytes
from tests.support import run_gateway


class _QuietHandler(SimpleHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _QuietHandler.hits.append(self.path)
        super().do_GET()

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture
def image_host(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "images"
    root.mkdir()
    (root / "photo.png").write_bytes(png_bytes(1000, 800))
    _QuietHandler.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_image_is_resized_to_the_pool_budget(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica], image_host: str
) -> None:
    args = gateway_args(tmp_path, live_replicas, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    config = Path(args[1])
    data = yaml.safe_load(config.read_text())
    data["media"] = {"trusted_hosts": ["127.0.0.1/32"]}
    config.write_text(yaml.safe_dump(data))
    with run_gateway(args, log_dir) as gateway:
        sdk = client(gateway)
        text = [{"type": "text", "text": "Describe"}]
        image = {"type": "image_url", "image_url": {"url": f"{image_host}/photo.png"}}
        baseline = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2)
        replies = [
            sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [*text, image]}], max_tokens=2
            )
            for _ in range(2)
        ]
        assert baseline.usage is not None
        for reply in replies:
            assert reply.usage is not None
            # 1000x800 resized by the gateway to 224x196: 8x7 = 56 visual tokens, plus vision start/end markers.
            assert reply.usage.prompt_tokens - baseline.usage.prompt_tokens == 56 + 2
        assert _QuietHandler.hits == ["/photo.png"], "fetched once; the repeat came from the gateway's cache"
        assert gateway.metric("gateway_media_cache_hits_total", {"modality": "image"}) == 1
