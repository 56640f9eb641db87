"""Milvus Lite as the gateway's own child process, for a file-path `search.milvus_uri`.

A child rather than Lite's in-process threads: its search work (pure Python) then never competes with the event
loop for the GIL, and a crash of either side is visible to the other.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("gateway.search")


def is_lite_path(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a kill -9'd gateway leaves no Lite holding the file lock


class LiteServer:
    """Milvus Lite (`milvus-lite server`) as a child process on a loopback port, restarted when it exits. A child
    rather than in-process threads: its search work then never competes with the event loop for the GIL."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            argv, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent if sys.platform == "linux" else None
        )
        log.info("Milvus Lite started (pid %d) for %s on port %d", self.process.pid, self.data_dir, self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
