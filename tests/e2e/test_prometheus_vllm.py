"""Every query the project ships, evaluated by a real Prometheus scraping a real gateway and a real vLLM replica.

The Grafana dashboard's expressions, the KEDA triggers the chart renders and the recording and alerting rules
(helm/vlm-gateway/files/prometheus-rules.yaml) are each run through Prometheus' HTTP API after a short, varied
load: each must parse and return data, or be listed below with the reason it is empty in this run. Then a replica
is frozen and the "replicas unhealthy" alert is seen pending or firing.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from tests import helm_render
from tests.e2e.conftest import API_KEY, MODEL, Replica, gateway_args, wait_for
from tests.e2e.test_chat_vllm import png
from tests.harness.processes import ManagedProcess, free_port
from tests.support import RunningGateway, missing, run_gateway, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vlm-gateway"
RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "vlm-gateway.json"
NAMESPACE = "serving"  # what the chart's queries select on (tests/helm_render.py installs into it)
RELEASE = "gw"
# The labels the Prometheus operator gives a ServiceMonitor's targets, which the chart's queries select on.
GATEWAY_TARGET_LABELS = {"namespace": NAMESPACE, "service": f"{RELEASE}-vlm-gateway-gateway"}

# Queries that legitimately return nothing after this run's load, and why. Anything else empty fails the test.
EMPTY_BECAUSE = {
    "gateway_search_seconds_bucket": "no collection exists in this run (search is tested on its own)",
    "gateway_index_items": "no collection exists in this run",
    "gateway_index_last_snapshot_timestamp_seconds": "no collection exists in this run",
    "gateway_upstream_errors_total": "no replica fails during this load (the freeze comes in the next test)",
    'status=~"5.."': "no request ends in a 5xx during this load",
    "gateway_batch_lines": "no batch runs during this load (tests/e2e/test_batch_vllm.py runs them)",
}


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        missing("Debian's prometheus is missing: run scripts/setup (scripts/test does)")
    return found


@pytest.fixture
def gateway(tmp_path: Path, log_dir: Path, live_replicas: list[Replica]) -> Iterator[RunningGateway]:
    args = gateway_args(tmp_path, live_replicas, routing="least_outstanding")
    config_path = Path(args[1])
    config = yaml.safe_load(config_path.read_text())
    config["embeddings"] = {"clip_model": "tiny-random"}
    config["health_check_interval"] = 0.5
    config_path.write_text(yaml.safe_dump(config))
    with run_gateway(args, log_dir) as running:
        running.wait_for_encoder(timeout=120)
        yield running


@pytest.fixture
def prometheus(tmp_path: Path, log_dir: Path, gateway: RunningGateway, live_replicas: list[Replica]) -> Iterator[str]:
    port = free_port()
    target = lambda url: url.removeprefix("http://")  # noqa: E731
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "gateway",
                "static_configs": [{"targets": [target(gateway.base_url)], "labels": GATEWAY_TARGET_LABELS}],
            },
            {
                "job_name": "vllm",
                "static_configs": [{"targets": [target(live_replicas[0].url)], "labels": {"namespace": NAMESPACE}}],
            },
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [
        _prometheus_binary(),
        f"--config.file={config_path}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
    ]
    process = ManagedProcess(argv, log_dir / "prometheus.log", f"http://127.0.0.1:{port}/-/ready", {})
    process.start()
    try:
        process.wait_ready(timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]  # type: ignore[no-any-return]


def _load(gateway: RunningGateway) -> None:
    """A short, varied load: plain and streamed chat, an image, a response, embeddings, and refusals."""
    sdk = OpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    for _ in range(3):
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        list(
            sdk.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=6, stream=True
            )
        )
    image = [{"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": png(112, 84)}}]
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": image}], max_tokens=2)  # type: ignore[misc,list-item]
    sdk.responses.create(model=MODEL, input="hello", max_output_tokens=4)
    sdk.embeddings.create(model="clip-tiny-random", input=["a red square", "a blue circle"])
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bad_image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
    for body in (
        {"model": MODEL, "messages": [{"role": "user", "content": bad_image}]},  # media rejection
        {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},  # a 404 rejection
    ):
        assert httpx.post(f"{gateway.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30).is_error


def _dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def _keda_exprs(tmp_path: Path) -> list[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pool = copy.deepcopy(values["vllm"]["pools"][0])
    pool["servedModelName"] = MODEL  # the chart's queries then select the model this run serves
    pool["autoscaling"]["idleReplicaCount"] = 0  # renders the scale-from-zero trigger too
    objects = helm_render.render(CHART, {"vllm": {"pools": [pool]}}, tmp_path, release=RELEASE)
    return [
        trigger["metadata"]["query"]
        for obj in objects
        if obj["kind"] == "ScaledObject"
        for trigger in obj["spec"]["triggers"]
        if trigger["type"] == "prometheus"
    ]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_shipped_query_runs_on_real_scrapes(
    tmp_path: Path, log_dir: Path, prometheus: str, gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    _load(gateway)
    # rate() needs two scrapes of the load's series inside its window
    assert wait_until(lambda: bool(_query(prometheus, "sum(rate(gateway_time_to_first_token_seconds_count[1m]))")), 30)
    empty: dict[str, str] = {}
    exprs = _dashboard_exprs() + _keda_exprs(tmp_path) + [rule["expr"] for rule in _rules() if "record" in rule]
    assert len(exprs) > 30
    unexplained = []
    for expr in exprs:
        if not _query(prometheus, expr):
            reason = next((why for metric, why in EMPTY_BECAUSE.items() if metric in expr), None)
            if reason is None:
                unexplained.append(expr)
            else:
                empty[expr] = reason
    assert not unexplained, f"empty after the load, with no stated reason: {unexplained}"
    assert len(empty) < len(exprs) / 3, empty
    (log_dir / "empty-queries.txt").write_text("\n".join(f"{e}  -- {why}" for e, why in empty.items()))
    for rule in (r for r in _rules() if "record" in r):  # the recorded series exist under their own names
        if rule["expr"] not in empty:
            assert wait_for(lambda name=rule["record"]: bool(_query(prometheus, name)), 10), rule["record"]
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(_rules())
    assert all(rule["health"] == "ok" and not rule.get("lastError") for rule in loaded), loaded


def test_a_frozen_replica_raises_the_unhealthy_alert(
    prometheus: str, gateway: RunningGateway, live_replicas: list[Replica]
) -> None:
    frozen = live_replicas[1]
    frozen.process.signal(signal.SIGSTOP)
    try:
        assert wait_for(lambda: gateway.metric("gateway_replica_healthy", {"replica": frozen.url}) == 0, 20)

        def alert_state() -> str | None:
            alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            states = [a["state"] for a in alerts if a["labels"]["alertname"] == "GatewayReplicasUnhealthy"]
            return states[0] if states else None

        assert wait_for(lambda: alert_state() in ("pending", "firing"), 20), alert_state()
        firing = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        alert = next(a for a in firing if a["labels"]["alertname"] == "GatewayReplicasUnhealthy")
        assert alert["labels"]["model"] == MODEL and float(alert["value"]) == 1
    finally:
        frozen.process.signal(signal.SIGCONT)
    assert wait_for(lambda: gateway.metric("gateway_replica_healthy", {"replica": frozen.url}) == 1, 30)
