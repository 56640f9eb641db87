"""The Grafana dashboard's vLLM panels query metrics a real vLLM server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Replica

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/compose/grafana/dashboards/vlm-gateway.json"


def test_dashboard_vllm_metrics_exist_on_a_real_replica(live_replicas: list[Replica]) -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {name for p in panels for t in p.get("targets", []) for name in re.findall(r"\bvllm:[a-z_]+", t["expr"])}
    assert used
    exported = {s.name for f in text_string_to_metric_families(live_replicas[0].metrics()) for s in f.samples}
    assert used <= exported, used - exported
    labelled = {
        k
        for f in text_string_to_metric_families(live_replicas[0].metrics())
        for s in f.samples
        for k in s.labels
        if s.name in used
    }
    assert "model_name" in labelled, "the panels group by model_name"
