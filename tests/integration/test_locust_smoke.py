"""The locustfiles work: a short headless run of every user class against a real gateway in front of the
benchmark's mock upstream (loadtests/mock_upstream.py), with the built-in tiny CLIP for embeddings and search."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness.processes import ManagedProcess, free_port
from tests.support import run_gateway, write_config

ROOT = Path(__file__).resolve().parents[2]
USERS = ["ChatUser", "StreamUser", "ImageUser", "VideoUser", "EmbeddingsUser", "SearchUser"]


def test_locust_run_of_every_user_class_has_no_failures(tmp_path: Path, log_dir: Path) -> None:
    mock_port = free_port()
    mock = ManagedProcess(
        argv=[sys.executable, str(ROOT / "loadtests" / "mock_upstream.py"), "--port", str(mock_port), "--tokens", "8"],
        log_path=log_dir / "mock-upstream.log",
        ready_url=f"http://127.0.0.1:{mock_port}/health",
    )
    mock.start()
    try:
        mock.wait_ready(timeout=30)
        models = [{"name": "mock", "upstreams": [f"http://127.0.0.1:{mock_port}"], "max_model_len": 32768}]
        config = write_config(
            tmp_path / "g.yaml",
            models,
            embeddings={"clip_model": "tiny-random"},
            search={"index_dir": str(tmp_path / "index")},
        )
        with run_gateway(["--config", str(config)], log_dir) as gateway:
            gateway.wait_for_encoder()
            prefix = tmp_path / "locust"
            argv = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless"]
            argv += ["-u", "12", "-r", "12", "-t", "20s", "--host", gateway.base_url, "--csv", str(prefix)]
            argv += ["--only-summary", "--stop-timeout", "5", *USERS]
            run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            with (tmp_path / "locust_stats.csv").open() as stats_file:
                rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats_file)}
            assert run.returncode == 0, run.stderr[-3000:]
            assert httpx.get(f"{gateway.base_url}/health/ready").status_code == 200
    finally:
        mock.stop()
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, rows
    for kind, name in [
        ("POST", "chat"),
        ("POST", "chat stream"),
        ("ttft", "chat stream"),
        ("itl", "chat stream"),
        ("POST", "chat video"),
        ("POST", "embeddings text"),
        ("POST", "embeddings image"),
        ("POST", "search"),
    ]:
        assert int(rows[(kind, name)]["Request Count"]) > 0, (kind, name)
    assert any(name.startswith("chat image ") for _, name in rows)
