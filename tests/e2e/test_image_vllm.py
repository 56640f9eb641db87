"""The container image, built and run for real with podman (no Docker engine here): the `proxy` variant, from a
base image made locally with mmdebstrap (deploy/image/local-base; no registry can be reached), run as uid 10001
on a read-only root filesystem, its HEALTHCHECK run, an OpenAI SDK chat through it to a real vLLM CPU replica on
the host network, and SIGTERM draining an open stream as the gateway does outside a container (CASES C4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, MAX_MODEL_LEN, MODEL, VLLM_LIMITS, Replica
from tests.harness.processes import free_port
from tests.support import missing

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/vlm-gateway-base:bookworm"
IMAGE = "localhost/vlm-gateway:proxy-test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")  # the host's trust store, for pip behind a TLS proxy
# podman as root here: runc (crun refuses these cgroups) and explicit ulimits (the defaults cannot be set).
RUNTIME = ["--runtime", "runc", "--ulimit", "nofile=1024:4096", "--ulimit", "nproc=1024:4096"]


def _podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args[:3])}... failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        missing("podman/mmdebstrap missing: run scripts/setup as root on Debian (scripts/test does)")
    subprocess.run([str(ROOT / "deploy/image/local-base"), BASE], check=True, timeout=600)
    ca = [
        "-v",
        f"{HOST_CA.parent}:/etc/ssl/host-certs:ro",
        "--build-arg",
        f"PIP_CERT=/etc/ssl/host-certs/{HOST_CA.name}",
    ]
    _podman(
        "build", "--format", "docker", "--network", "host", *RUNTIME, *(ca if HOST_CA.is_file() else []),
        "--build-arg", "VARIANT=proxy", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE, str(ROOT),
        timeout=900,
    )  # fmt: skip
    return IMAGE


@pytest.fixture
def container(image: str, live_replicas: list[Replica]) -> Iterator[tuple[str, str]]:
    port = free_port()
    name = f"vlm-gateway-test-{port}"
    limits = json.dumps(VLLM_LIMITS)
    _podman(
        "run", "-d", "--name", name, "--network", "host", *RUNTIME, "--read-only", "--tmpfs", "/tmp",
        "-e", "GATEWAY_SEARCH__INDEX_DIR=/tmp/index", "-e", "GATEWAY_EMBEDDINGS__ENABLED=false",
        "-e", "GATEWAY_DRAIN_DELAY=2", "-e", "GATEWAY_DRAIN_TIMEOUT=60", "-e", f"GATEWAY_PORT={port}",
        image, "serve", "--upstream", live_replicas[0].url, "--model", MODEL,
        "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), "--limit-mm-per-prompt", limits,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the container never became ready:\n" + _podman("logs", name, check=False).stderr)
        yield name, base_url
    finally:
        _podman("rm", "--force", "--time", "5", name, check=False)


def test_the_image_runs_unprivileged_read_only_and_healthy(container: tuple[str, str]) -> None:
    name, _ = container
    assert _podman("exec", name, "id", "-u").stdout.strip() == "10001"
    assert _podman("inspect", "--format", "{{.Config.User}}", name).stdout.strip() == "10001:10001"
    assert _podman("exec", name, "touch", "/opt/venv/written", check=False).returncode != 0, "root fs is read-only"
    assert _podman("healthcheck", "run", name, check=False).returncode == 0, "its own HEALTHCHECK passes"


def test_an_sdk_chat_through_the_container_and_a_drain_on_sigterm(container: tuple[str, str]) -> None:
    name, base_url = container
    sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    reply = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert reply.choices[0].message.content is not None and reply.usage is not None
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "go on"}],
        max_tokens=300,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    _podman("kill", "--signal", "TERM", name)
    time.sleep(0.5)
    refused = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert refused.status_code == 503, "new work is refused while draining"
    rest = list(chunks)  # raises on an error event: a cut stream fails the test
    finished = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"], finished
    waited = _podman("wait", name, timeout=90)
    assert waited.stdout.strip() == "0", "the gateway exits cleanly once the stream is done"
