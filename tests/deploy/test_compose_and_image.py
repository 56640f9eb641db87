"""The docker-compose stack, its Prometheus/Grafana files and the Dockerfile, checked without a Docker engine:
every cross-reference between them resolves (service names, ports, flags vs. the gateway's pool config, metric
names vs. gateway/metrics.py), and the Dockerfile passes hadolint and installs what the README says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import Settings
from tests.support import exported_metric_names

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DASHBOARD = json.loads((DEPLOY / "compose/grafana/dashboards/vlm-gateway.json").read_text())


def flags(service: str) -> dict[str, str]:
    return dict(arg.removeprefix("--").split("=", 1) for arg in SERVICES[service]["command"])


def mounted(service: str, target: str) -> Path:
    for volume in SERVICES[service]["volumes"]:
        source, mount = volume.split(":")[:2]
        if mount == target:
            return (DEPLOY / source).resolve()
    raise AssertionError(f"{service} mounts nothing at {target}")


def gateway_settings() -> Settings:
    config = mounted("gateway", "/etc/vlm-gateway/gateway.yaml")
    return Settings.model_validate(yaml.safe_load(config.read_text()))


def dashboard_queries() -> list[str]:
    return [t["expr"] for panel in DASHBOARD["panels"] for t in panel.get("targets", [])]


def test_every_service_has_an_image_and_every_mounted_file_exists() -> None:
    assert set(SERVICES) == {"vllm", "vllm-awq", "gateway", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        assert service.get("image"), name
        assert not re.search(r":latest$", service["image"]), f"{name}: pin the image"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    assert SERVICES["gateway"]["build"]["context"] == ".." and (DEPLOY / ".." / "Dockerfile").is_file()
    assert SERVICES["vllm-awq"]["profiles"] == ["awq"]


def test_vllm_flags_agree_with_the_gateway_pools() -> None:
    settings = gateway_settings()
    assert settings.keys_file == Path("/etc/vlm-gateway/keys.yaml")
    mounted("gateway", str(settings.keys_file))
    for pool in settings.models:
        (upstream,) = pool.upstreams
        host, port = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", upstream).groups()  # type: ignore[union-attr]
        assert host in SERVICES, f"{pool.name} points at {host}, not a compose service"
        vllm = flags(host)
        assert port == "8000" and "port" not in vllm
        assert vllm["served-model-name"] == pool.name
        assert json.loads(vllm["limit-mm-per-prompt"]) == pool.limit_mm_per_prompt
        assert int(vllm["max-model-len"]) == pool.max_model_len
        pixels = json.loads(vllm["mm-processor-kwargs"])
        assert (pixels["min_pixels"], pixels["max_pixels"]) == (pool.min_pixels, pool.max_pixels)
        assert vllm.get("quantization", "bf16") == pool.quantization
        devices = SERVICES[host]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_the_gateway_and_vllm_where_they_listen() -> None:
    settings = gateway_settings()
    prometheus = yaml.safe_load(mounted("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prometheus["scrape_configs"]}
    assert targets["gateway"] == [f"gateway:{settings.metrics_port}"]
    assert sorted(targets["vllm"]) == sorted(f"{s}:8000" for s in SERVICES if s.startswith("vllm"))
    listen = next(a for a in SERVICES["prometheus"]["command"] if a.startswith("--web.listen-address="))
    port = listen.rsplit(":", 1)[1]
    assert SERVICES["prometheus"]["ports"] == [f"{port}:{port}"]
    datasources = yaml.safe_load((DEPLOY / "compose/grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasources[0]["url"] == f"http://prometheus:{port}"
    assert datasources[0]["uid"] == "prometheus"


def test_dashboard_covers_the_issue_and_uses_real_gateway_metrics() -> None:
    queries = dashboard_queries()
    used = {name for q in queries for name in re.findall(r"\bgateway_[a-z_]+", q)}
    assert used <= exported_metric_names(), used - exported_metric_names()
    for needed in (
        "gateway_requests_total",
        "gateway_time_to_first_token_seconds_bucket",
        "gateway_inter_token_latency_seconds_bucket",
        "gateway_media_rejections_total",
        "gateway_embedding_queue_items",
        "gateway_embedding_batch_size_bucket",
        "gateway_search_seconds_bucket",
        "gateway_index_items",
    ):
        assert needed in used, needed
    vllm = {name for q in queries for name in re.findall(r"\bvllm:[a-z_]+", q)}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= vllm
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus"
    provider = yaml.safe_load((DEPLOY / "compose/grafana/provisioning/dashboards/vlm-gateway.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert mounted("grafana", "/var/lib/grafana/dashboards") == (DEPLOY / "compose/grafana/dashboards").resolve()


def test_shutdown_grace_covers_the_drain_budget() -> None:
    grace = int(SERVICES["gateway"]["stop_grace_period"].removesuffix("s"))
    assert grace > gateway_settings().drain_timeout


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_health_check_and_the_readme_install() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM ", dockerfile, re.M)
    assert len(stages) >= 2
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user and not user.group(1).startswith(("0", "root"))
    assert "HEALTHCHECK" in final and "/health/live" in final
    assert re.search(r"ARG VARIANT=cpu", dockerfile) and "cuda)" in dockerfile
    readme = (ROOT / "README.md").read_text()
    documented = re.search(r"pip install -c deploy/constraints\.txt \"\.\[clip,milvus\]\"", readme)
    assert documented, "the README documents the install the image performs"
    assert re.search(r'pip install .*-c deploy/constraints\.txt "\.\$\{extras\}"', dockerfile)
    assert 'cpu)   extras="[clip,milvus]"' in dockerfile and 'cuda)  extras="[clip,milvus]"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


@pytest.mark.parametrize("path", sorted((DEPLOY / "compose").rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_compose_side_file_is_valid_yaml(path: Path) -> None:
    assert yaml.safe_load(path.read_text()) is not None
