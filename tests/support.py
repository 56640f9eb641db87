"""Helpers shared by the test suites: start a real gateway process, read its metrics with a real parser."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.processes import ManagedProcess, free_port, gateway_process

POLL = 0.05  # how often a waited-for condition is looked at


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Whether `condition` came true within `timeout` seconds (polled): tests wait on what they can observe."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


async def eventually(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> bool:
    """`wait_until` for async tests: the event loop (and an in-process fake replica) runs between polls. An async
    condition is awaited (one that reaches an in-process fake must be, or the loop it needs is blocked)."""
    deadline = time.monotonic() + timeout
    while True:
        verdict = condition()
        if not isinstance(verdict, bool):
            verdict = await verdict
        if verdict:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def exported_metric_names() -> set[str]:
    """Every sample name gateway/metrics.py can export (counters with _total, histograms with their series)."""
    from gateway.metrics import GatewayMetrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in GatewayMetrics().registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


class RunningGateway:
    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def metrics_url(self) -> str:
        """Where /metrics is: the config's `metrics_port` when it names one, else the main port."""
        args = self.process.argv
        if "--config" in args:
            config = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text()) or {}
            if config.get("metrics_port"):
                return f"http://127.0.0.1:{config['metrics_port']}/metrics"
        return f"{self.base_url}/metrics"

    def metrics(self) -> str:
        return httpx.get(self.metrics_url, timeout=5).text

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return metric_value(self.metrics(), name, labels)

    def ready_status(self) -> int:
        return httpx.get(f"{self.base_url}/health/ready", timeout=5).status_code

    def log(self) -> str:
        return self.process.log_path.read_text(errors="replace")

    def wait_for_encoder(self, timeout: float = 30.0) -> None:
        """The CLIP encoder loads in the background after start-up; wait until readiness says it is ready."""
        ready = lambda: httpx.get(f"{self.base_url}/health/ready").json()["embeddings"]["state"] == "ready"  # noqa: E731
        if not wait_until(ready, timeout):
            raise TimeoutError(f"encoder not ready after {timeout}s:\n{self.log()[-2000:]}")


@contextlib.contextmanager
def run_gateway(args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Iterator[RunningGateway]:
    port = free_port()
    process = gateway_process(args, port=port, log_path=log_dir / f"gateway-{port}.log", env=env)
    process.start()
    try:
        process.wait_ready(timeout=30)
        yield RunningGateway(process, port)
    finally:
        process.stop(grace=10)


@contextlib.asynccontextmanager
async def run_gateway_async(
    args: list[str], log_dir: Path, env: dict[str, str] | None = None
) -> AsyncIterator[RunningGateway]:
    """As run_gateway, but waits in a thread so an in-process fake upstream keeps answering meanwhile."""
    port = free_port()
    process = gateway_process(args, port=port, log_path=log_dir / f"gateway-{port}.log", env=env)
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready, 30)
        yield RunningGateway(process, port)
    finally:
        await asyncio.to_thread(process.stop, 10)


SEARCH_BACKENDS = ["faiss", "milvus"]


def search_settings(root: Path, backend: str, **extra: Any) -> dict[str, Any]:
    """The `search` section for a backend: FAISS under root/index, or Milvus Lite (started by the gateway) in
    root/milvus.db — the real engine either way."""
    if backend == "milvus":
        return {"backend": "milvus", "milvus_uri": str(root / "milvus.db"), **extra}
    return {"index_dir": str(root / "index"), **extra}


def two_fake_replicas(urls: tuple[str, str], images: int, first_token: float, idle: float) -> dict[str, Any]:
    """Pool "m" on two fake replicas, least-outstanding routing, `images` per prompt and no video, 4096 tokens."""
    return {
        "name": "m",
        "upstreams": list(urls),
        "routing": "least_outstanding",
        "limit_mm_per_prompt": {"image": images, "video": 0},
        "max_model_len": 4096,
        "timeouts": {"first_token": first_token, "idle": idle},
    }


def write_config(path: Path, models: list[dict[str, Any]], **settings: Any) -> Path:
    """A YAML config; the CLIP encoder is off unless a test asks for it (chat tests need no torch), and batches
    keep their state beside the config (never in the user's default directory, shared between gateways)."""
    settings.setdefault("embeddings", {"enabled": False})
    settings.setdefault("batch", {"dir": str(path.parent / "batch")})
    path.write_text(yaml.safe_dump({"models": models, **settings}))
    return path


def png_data_url(width: int = 64, height: int = 64, colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A solid-colour PNG as a data URL (Pillow writes it)."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def missing(message: str) -> NoReturn:
    """Something a test needs is not installed: a failure when the run requires the whole stack (scripts/test sets
    GATEWAY_E2E=required, so nothing is skipped silently), a skip otherwise."""
    if os.environ.get("GATEWAY_E2E") == "required":
        pytest.fail(message)
    pytest.skip(message)


async def post_json(
    gateway: RunningGateway,
    path: str,
    body: dict[str, Any] | bytes,
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> httpx.Response:
    """One POST of `body` (JSON, or bytes as they are) to the gateway, with the key as a bearer token if given."""
    sent = {
        "content-type": "application/json",
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=timeout) as client:
        return await client.post(path, content=content, headers=sent)
