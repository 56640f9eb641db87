"""Pools discovered through DNS, with a real gateway process, the system resolver and real sockets."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from tests.fake_upstream import FakeVllm
from tests.support import run_gateway_async, write_config


async def test_a_discovered_name_is_routed_to_each_address_it_resolves_to(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    args = ["--discover", f"http://localhost:{fake_a.port}", "--model", "m"]  # as `gateway serve` is run
    async with run_gateway_async(args, log_dir, env={"GATEWAY_EMBEDDINGS__ENABLED": "false"}) as gateway:
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
        reply = await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        assert fake_a.hits == 1
        replica = f"http://127.0.0.1:{fake_a.port}"  # the address, not the name: one replica per address
        assert gateway.metric("gateway_replica_healthy", {"model": "m", "replica": replica}) == 1
        ready = httpx.get(f"{gateway.base_url}/health/ready").json()
        assert ready["models"]["m"]["replicas"] >= 1 and not ready["models"]["m"]["scaled_to_zero"]


async def test_a_name_with_no_address_is_a_pool_scaled_to_zero(tmp_path: Path, log_dir: Path) -> None:
    models = [{"name": "m", "discover": "http://no-pod-is-ready.invalid:8000"}]
    config = write_config(tmp_path / "g.yaml", models, health_check_interval=0.5)
    async with run_gateway_async(["--config", str(config)], log_dir) as gateway:
        ready = httpx.get(f"{gateway.base_url}/health/ready")
        assert ready.status_code == 200, "still ready: its 503s are what wake the pool's autoscaler"
        assert ready.json()["models"]["m"] == {"healthy_replicas": 0, "replicas": 0, "scaled_to_zero": True}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert "scaled to zero" in refused.json()["error"]["message"]
        assert gateway.metric("gateway_requests_total", {"model": "m", "status": "503"}) == 1, "counted for KEDA"
