"""Start and stop real processes: vLLM's CPU build and the gateway itself.

Used by the local stack (tests/harness/local_stack.py) and by the tests, so both meet the same real parts. vLLM
runs from its own virtualenv; the gateway never imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_POLL = 0.5  # how often a starting process's ready URL is asked


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


@dataclass(eq=False)
class ManagedProcess:
    """A child in its own process group, so a kill reaches everything it spawned (vLLM's engine core too)."""

    argv: list[str]
    log_path: Path
    ready_url: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    file_size_limit: int | None = None  # RLIMIT_FSIZE for the child: a full disk, for real, without a mount

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        limit = self.file_size_limit

        def limit_file_size() -> None:
            if limit is not None:
                import resource

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
            preexec_fn=limit_file_size if limit is not None else None,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.argv[0]} exited early; log tail:\n{self.log_tail()}")
            if _get_status(self.ready_url) == 200:
                return
            time.sleep(READY_POLL)
        raise TimeoutError(f"not ready after {timeout:.0f}s: {self.ready_url}; log tail:\n{self.log_tail()}")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group: the crash a replica really suffers when its pod is OOM-killed."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace: float = 20.0) -> None:
        if not self.alive():
            return
        self.signal(signal.SIGTERM)
        assert self.proc is not None
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def vllm_process(
    python: Path,
    model_dir: Path,
    *,
    served_name: str,
    port: int,
    log_path: Path,
    limit_mm_per_prompt: dict[str, int],
    max_model_len: int = 2048,
    lora_modules: dict[str, Path] | None = None,
    otlp_traces_endpoint: str | None = None,
    max_num_seqs: int | None = None,
) -> ManagedProcess:
    """vLLM's OpenAI server on the CPU build. It stores responses (so `previous_response_id` and GET work), and
    with `lora_modules` it serves those adapters by name and lets adapters be loaded at runtime."""
    argv = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        "--limit-mm-per-prompt",
        json.dumps(limit_mm_per_prompt),
    ]
    env = {
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if lora_modules:
        argv += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "4"]
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if max_num_seqs is not None:  # a saturated GPU in miniature: the scheduler's tests and benchmarks
        argv += ["--max-num-seqs", str(max_num_seqs)]
    if otlp_traces_endpoint:  # vLLM's own spans, OTLP/HTTP to a full /v1/traces URL
        argv += ["--otlp-traces-endpoint", otlp_traces_endpoint]
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
        env["OTEL_SERVICE_NAME"] = "vllm"
        env["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    return ManagedProcess(argv, log_path, f"http://127.0.0.1:{port}/health", env)


def gateway_process(args: list[str], *, port: int, log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    argv = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    env = dict(env or {})
    if "--config" not in args:  # a config file names its own batch.dir (tests.support.write_config)
        env.setdefault("GATEWAY_BATCH__DIR", str(log_path.parent / f"batch-{port}"))
    return ManagedProcess(argv, log_path, f"http://127.0.0.1:{port}/health/live", env)
