"""Two real vLLM CPU replicas serving the tiny Qwen2.5-VL checkpoint, and a real gateway in front of them.

`scripts/test` builds both (see scripts/setup) and sets GATEWAY_E2E=required, so a missing vLLM fails the run
instead of silently skipping it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.harness.processes import ManagedProcess, free_port, vllm_process
from tests.otlp_receiver import OtlpReceiver
from tests.support import RunningGateway, metric_value, missing, run_gateway, write_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-qwen-vl"
ADAPTER = "tiny-lora"  # the tiny LoRA adapter (scripts/setup builds it) both replicas serve by name
API_KEY = "sk-e2e-test-key"
VLLM_LIMITS = {"image": 2, "video": 1}
MAX_MODEL_LEN = 8192


def _stack_paths() -> tuple[Path, Path, Path]:
    values = dict(os.environ)
    env_file = ROOT / ".cache" / "stack.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            values.setdefault(name, value)
    python, model_dir, lora_dir = values.get("VLLM_PYTHON"), values.get("TINY_MODEL_DIR"), values.get("TINY_LORA_DIR")
    if not (python and model_dir and lora_dir and Path(python).exists() and Path(model_dir).is_dir()):
        missing("vLLM CPU build or tiny checkpoint missing: run scripts/setup (scripts/test does)")
    return Path(python), Path(model_dir), Path(lora_dir)


class Replica:
    """A vLLM replica a test may kill, freeze or restart; `ensure_running` brings it back for the next test."""

    def __init__(
        self, python: Path, model_dir: Path, lora_dir: Path, log_dir: Path, name: str, traces_to: str | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: ManagedProcess = vllm_process(
            python,
            model_dir,
            served_name=MODEL,
            port=self.port,
            log_path=log_dir / f"vllm-{name}.log",
            limit_mm_per_prompt=VLLM_LIMITS,
            max_model_len=MAX_MODEL_LEN,
            lora_modules={ADAPTER: lora_dir},
            otlp_traces_endpoint=traces_to,
        )

    def start(self) -> None:
        self.process.start()

    def wait_ready(self) -> None:
        self.process.wait_ready(timeout=600)

    def ensure_running(self) -> None:
        if not self.process.alive():
            self.process.start()
            self.wait_ready()

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def running_requests(self) -> float:
        return metric_value(self.metrics(), "vllm:num_requests_running")

    def generated_tokens(self) -> float:
        return metric_value(self.metrics(), "vllm:generation_tokens_total")

    def requests_done(self) -> float:
        """Every request this replica finished, whatever the reason."""
        return metric_value(self.metrics(), "vllm:request_success_total")

    def finished(self, reason: str) -> float:
        return metric_value(self.metrics(), "vllm:request_success_total", {"finished_reason": reason})


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """Where the shared replicas send their own spans (vLLM's --otlp-traces-endpoint), for the tracing test."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def replicas(log_dir: Path, otlp: OtlpReceiver) -> Iterator[list[Replica]]:
    python, model_dir, lora_dir = _stack_paths()
    pair = [Replica(python, model_dir, lora_dir, log_dir, name, otlp.endpoint) for name in ("a", "b")]
    for replica in pair:
        replica.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(Replica.wait_ready, pair))
        yield pair
    finally:
        for replica in pair:
            replica.process.stop()


# The saturable replica's batch: a GPU running at its --max-num-seqs, in miniature, for the scheduler's tests.
SATURABLE_SEQS = 4


@pytest.fixture(scope="session")
def saturable_replica(log_dir: Path) -> Iterator[str]:
    """One more replica (its base URL), started with a small `--max-num-seqs` on first use and shared by the
    tests that need a pool that fills."""
    python, model_dir, _ = _stack_paths()
    port = free_port()
    process = vllm_process(
        python,
        model_dir,
        served_name=MODEL,
        port=port,
        log_path=log_dir / "vllm-saturable.log",
        limit_mm_per_prompt=VLLM_LIMITS,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=SATURABLE_SEQS,
    )
    process.start()
    try:
        process.wait_ready(timeout=600)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@pytest.fixture
def live_replicas(replicas: list[Replica]) -> list[Replica]:
    for replica in replicas:
        replica.ensure_running()
    return replicas


def lora_dir() -> Path:
    return _stack_paths()[2]


def checkpoint_dir() -> Path:
    """The tiny checkpoint (its tokenizer gives a pool its reserved tokens and the checkpoint's own placeholder ids,
    which differ from real Qwen2.5-VL's defaults)."""
    return _stack_paths()[1]


def placeholder_ids() -> list[int]:
    """The tiny checkpoint's media placeholder ids, as its config names them (what the tokenizer must give)."""
    config = json.loads((checkpoint_dir() / "config.json").read_text())
    names = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    return [config[name] for name in names]


def gateway_args(tmp_path: Path, replicas: list[Replica], **pool: object) -> list[str]:
    models = [
        {
            "name": MODEL,
            "upstreams": [r.url for r in replicas],
            "limit_mm_per_prompt": VLLM_LIMITS,
            "max_model_len": MAX_MODEL_LEN,
            "tokenizer": str(checkpoint_dir()),
            **pool,
        }
    ]
    config = write_config(tmp_path / "e2e.yaml", models, health_check_interval=1, replica_cooldown=2)
    return ["--config", str(config), "--api-key", API_KEY]


@pytest.fixture
def gateway(tmp_path: Path, log_dir: Path, live_replicas: list[Replica]) -> Iterator[RunningGateway]:
    with run_gateway(gateway_args(tmp_path, live_replicas), log_dir) as running:
        yield running


def wait_for(predicate: object, timeout: float = 20.0, interval: float = 0.1) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
