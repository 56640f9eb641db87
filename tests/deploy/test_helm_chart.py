"""The Helm chart, rendered by real Helm (helm-sdkpy) for the defaults and every profile, then checked against the
Kubernetes schemas and for the properties users rely on: probes, resources, secrets by reference, isolation,
autoscaling on metrics the gateway really exports, and a config file the gateway itself accepts."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import Settings
from tests import helm_render
from tests.support import exported_metric_names

CHART = Path(__file__).resolve().parents[2] / "helm" / "vlm-gateway"
PROFILES = ["default", "bf16", "awq", "cpu-dev"]
KUBE_VERSION = "1.31.0"
CRD_KINDS = {
    "ScaledObject",
    "ServiceMonitor",
    "PrometheusRule",
}  # not in Kubernetes' own schemas; checked field by field below
WITH_KEYS = {
    "gateway": {
        "apiKeys": {"existingSecret": "gateway-keys", "key": "keys.yaml"},
        "rateLimitsRedis": {"existingSecret": "limits-redis", "key": "url"},
        "batchSecret": {"existingSecret": "batch-lines", "key": "secret"},
    }
}
WITH_HF = {"vllm": {"hfToken": {"existingSecret": "hf", "key": "token"}}}


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values: maps merge key by key, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_values(profile: str) -> dict[str, Any]:
    if profile == "default":
        return {}
    return yaml.safe_load((CHART / f"values-{profile}.yaml").read_text())  # type: ignore[no-any-return]


def render(tmp_path: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    return helm_render.render(CHART, values, tmp_path, release="gw")  # type: ignore[no-any-return]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=PROFILES)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    values = merged(merged(profile_values(request.param), WITH_KEYS), WITH_HF)
    return render(tmp_path_factory.mktemp(request.param), values)


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_passes(profile: str, tmp_path: Path) -> None:
    chart = tmp_path / "vlm-gateway"
    shutil.copytree(CHART, chart)
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), profile_values(profile))
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    result = helm_render.lint(chart)
    problems = [m for m in result["Messages"] if m["Severity"] >= 2]  # 2 warning, 3 error
    assert result["Errors"] is None and not problems, problems


def test_manifests_match_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in rendered}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy"} <= kinds
    for obj in rendered:
        if obj["kind"] in CRD_KINDS:
            continue
        clean = copy.deepcopy(obj)
        for field in ("uid", "resourceVersion", "creationTimestamp"):
            clean["metadata"].pop(field, None)
        kubernetes_validate.validate(clean, KUBE_VERSION, strict=True)


def test_every_container_has_probes_and_resources(rendered: list[dict[str, Any]]) -> None:
    workloads = by_kind(rendered, "Deployment") + by_kind(rendered, "StatefulSet")
    assert len(workloads) >= 3
    for workload in workloads:
        spec = pod_spec(workload)
        for container in spec["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert container["readinessProbe"]["httpGet"]["path"].startswith("/health"), where
            assert container["livenessProbe"]["httpGet"]["path"].startswith("/health"), where
            if container["name"] in ("gateway", "retrieval"):  # probes on the operator's port: never starved by
                for probe in ("livenessProbe", "readinessProbe"):  # client connections (hardening round 3)
                    assert container[probe]["httpGet"]["port"] == "metrics", (where, probe)
            assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"], where
            assert container["resources"]["limits"]["memory"], where
        assert spec["automountServiceAccountToken"] is False


def test_vllm_pods_get_gpus_shared_memory_and_a_long_startup_probe(rendered: list[dict[str, Any]]) -> None:
    pools = [
        d for d in by_kind(rendered, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
    ]
    assert pools
    for deployment in pools:
        spec = pod_spec(deployment)
        vllm = spec["containers"][0]
        args = vllm["args"]
        assert any(a.startswith("--limit-mm-per-prompt={") for a in args)
        assert any(a.startswith("--max-model-len=") for a in args)
        pixels = next(a for a in args if a.startswith("--mm-processor-kwargs="))
        assert '"max_pixels"' in pixels and '"min_pixels"' in pixels
        probe = vllm["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 600, "weights take minutes to load"
        shm = next(v for v in spec["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"mountPath": "/dev/shm", "name": "shm"} in vllm["volumeMounts"]
        gpus = vllm["resources"]["limits"].get("nvidia.com/gpu", 0)
        quantization = next((a.split("=")[1] for a in args if a.startswith("--quantization=")), None)
        if gpus:
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
        assert quantization in (None, "awq", "gptq")
        assert not any("trust-remote-code" in a for a in args), "no remote code by default (CASES E6)"


def test_secrets_are_only_referenced(rendered: list[dict[str, Any]]) -> None:
    assert not by_kind(rendered, "Secret"), "the chart must never carry key material"
    for workload in by_kind(rendered, "Deployment") + by_kind(rendered, "StatefulSet"):
        spec = pod_spec(workload)
        for container in spec["containers"]:
            for env in container.get("env", []):
                if re.search(r"TOKEN|KEY|SECRET|PASSWORD|REDIS_URL", env["name"]):
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], env
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("gateway", "retrieval"):
            keys = next(v for v in spec["volumes"] if v["name"] == "keys")
            assert keys["secret"]["secretName"] == "gateway-keys"
            # Both tiers sign and check batch lines with one secret.
            batch = next(e for e in spec["containers"][0]["env"] if e["name"] == "GATEWAY_BATCH__SECRET")
            assert batch["valueFrom"]["secretKeyRef"] == {"name": "batch-lines", "key": "secret"}
        if component == "gateway":
            redis = next(e for e in spec["containers"][0]["env"] if e["name"] == "GATEWAY_RATE_LIMITS_REDIS_URL")
            assert redis["valueFrom"]["secretKeyRef"] == {"name": "limits-redis", "key": "url"}
        if component == "vllm":
            token = next(e for e in spec["containers"][0]["env"] if e["name"] == "HF_TOKEN")
            assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}


def test_only_the_gateway_reaches_vllm_and_retrieval(rendered: list[dict[str, Any]]) -> None:
    policies = {
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: p
        for p in by_kind(rendered, "NetworkPolicy")
    }
    assert set(policies) == {"vllm", "retrieval"}
    for component, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        pod_peers = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
        assert pod_peers == [{**pod_peers[0], "app.kubernetes.io/component": "gateway"}], component
        assert all("podSelector" in p or "namespaceSelector" in p for p in peers)
        assert not any(p.get("namespaceSelector") == {} for p in peers), "an empty selector would admit everyone"
        if component == "vllm":
            assert peers == [{"podSelector": {"matchLabels": pod_peers[0]}}], "only the gateway reaches vLLM (E5)"


def test_config_map_is_a_config_the_gateway_accepts(rendered: list[dict[str, Any]]) -> None:
    config_map = by_kind(rendered, "ConfigMap")[0]
    proxy = Settings.model_validate(yaml.safe_load(config_map["data"]["gateway.yaml"]))
    assert proxy.role == "proxy" and proxy.keys_file is not None
    services = {s["metadata"]["name"]: s for s in by_kind(rendered, "Service")}
    for pool in proxy.models:
        assert pool.upstreams == [] and pool.discover is not None, "pods are discovered, not one ClusterIP"
        found = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", pool.discover)
        assert found is not None, pool.discover
        host, namespace, port = found.groups()
        service = services[host]
        assert namespace == service["metadata"]["namespace"] == "serving", "the release namespace, spelt out"
        assert service["spec"]["clusterIP"] == "None", "headless: the name resolves to each ready pod"
        assert service["spec"]["ports"][0]["port"] == int(port), "the gateway discovers the pool's Service"
        assert service["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
    assert proxy.retrieval_url == f"http://gw-vlm-gateway-retrieval:{proxy.port}"
    retrieval = Settings.model_validate(yaml.safe_load(config_map["data"]["retrieval.yaml"]))
    assert retrieval.role == "retrieval" and str(retrieval.search.index_dir) == "/var/lib/vlm-gateway/index"
    index_mount = next(
        m
        for m in pod_spec(by_kind(rendered, "StatefulSet")[0])["containers"][0]["volumeMounts"]
        if m["name"] == "index"
    )
    assert retrieval.search.index_dir.is_relative_to(index_mount["mountPath"]), "the index lives on the PVC"
    assert retrieval.batch.enabled and retrieval.batch.dir.is_relative_to(index_mount["mountPath"]), "batches too"
    http_port = next(p["port"] for p in services["gw-vlm-gateway-gateway"]["spec"]["ports"] if p["name"] == "http")
    assert retrieval.batch.dispatch_url == f"http://gw-vlm-gateway-gateway:{http_port}", "through the proxies"


def test_shutdown_leaves_time_to_drain_streams(rendered: list[dict[str, Any]]) -> None:
    config = yaml.safe_load(by_kind(rendered, "ConfigMap")[0]["data"]["gateway.yaml"])
    draining = [
        w
        for w in by_kind(rendered, "Deployment") + by_kind(rendered, "StatefulSet")
        if w["metadata"]["labels"]["app.kubernetes.io/component"] in ("gateway", "retrieval")
    ]
    assert len(draining) == 2, "the proxy and the retrieval tier"
    for workload in draining:
        spec = pod_spec(workload)
        delay = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
        assert delay >= 1
        assert spec["terminationGracePeriodSeconds"] > delay + config["drain_timeout"]


def test_autoscaling_uses_metrics_the_gateway_exports(rendered: list[dict[str, Any]]) -> None:
    exported = exported_metric_names()
    scaled = by_kind(rendered, "ScaledObject")
    assert by_kind(rendered, "Deployment"), "nothing rendered to check"
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in scaled}
    for workload in by_kind(rendered, "Deployment"):
        autoscaled = workload["metadata"]["name"] in targets or any(
            h["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]
            for h in by_kind(rendered, "HorizontalPodAutoscaler")
        )
        assert autoscaled == ("replicas" not in workload["spec"]), "the autoscaler alone owns the replica count"
    for scaled_object in scaled:
        assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
        assert scaled_object["spec"]["minReplicaCount"] <= scaled_object["spec"]["maxReplicaCount"]
        for trigger in scaled_object["spec"]["triggers"]:
            if trigger["type"] != "prometheus":
                continue
            query = trigger["metadata"]["query"]
            used = set(re.findall(r"\bgateway_[a-z_]+", query))
            assert used and used <= exported, f"{used - exported} are not exported by gateway/metrics.py"
            assert 'namespace="serving"' in query
            assert float(trigger["metadata"]["threshold"]) > 0


def test_awq_profile_scales_to_zero_and_wakes_on_arrivals(tmp_path: Path) -> None:
    objects = render(tmp_path, profile_values("awq"))
    pool = next(o for o in by_kind(objects, "ScaledObject") if "vllm" in o["metadata"]["name"])
    assert pool["spec"]["idleReplicaCount"] == 0
    assert "gateway_requests_total" in pool["spec"]["triggers"][-1]["metadata"]["query"]
    args = pod_spec(next(d for d in by_kind(objects, "Deployment") if "vllm" in d["metadata"]["name"]))["containers"][
        0
    ]["args"]
    assert "--quantization=awq" in args


def test_lora_pools_serve_their_adapters_and_the_gateway_knows_them(tmp_path: Path) -> None:
    pool = copy.deepcopy(yaml.safe_load((CHART / "values.yaml").read_text())["vllm"]["pools"][0])
    pool["lora"] = {
        "enabled": True,
        "maxLoras": 2,
        "maxLoraRank": 32,
        "modules": [{"name": "captioner", "path": "/adapters/captioner"}],
        "runtimeLoading": True,
        "volume": {"existingClaim": "adapters", "mountPath": "/adapters"},
    }
    values = {"vllm": {"pools": [pool]}, "gateway": {"responsesIdSecret": {"existingSecret": "ids", "key": "k"}}}
    objects = render(tmp_path, values)
    vllm = pod_spec(next(d for d in by_kind(objects, "Deployment") if "vllm" in d["metadata"]["name"]))
    container = vllm["containers"][0]
    args = container["args"]
    assert "--enable-lora" in args and "--max-loras=2" in args and "--max-lora-rank=32" in args
    assert args[args.index("--lora-modules") + 1] == "captioner=/adapters/captioner"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "adapters")
    assert mount == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}
    volume = next(v for v in vllm["volumes"] if v["name"] == "adapters")
    assert volume["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    proxy = Settings.model_validate(yaml.safe_load(by_kind(objects, "ConfigMap")[0]["data"]["gateway.yaml"]))
    assert [(m.name, m.path) for m in proxy.models[0].lora_modules] == [("captioner", "/adapters/captioner")]
    assert proxy.models[0].adapter_roots == ["/adapters"]
    gateway = pod_spec(next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("gateway")))
    secret = next(e for e in gateway["containers"][0]["env"] if e["name"] == "GATEWAY_RESPONSES__ID_SECRET")
    assert secret["valueFrom"]["secretKeyRef"] == {"name": "ids", "key": "k"}


def test_a_milvus_backed_retrieval_tier_is_stateless_and_scales_out(tmp_path: Path) -> None:
    milvus = {"uri": "http://milvus.milvus.svc:19530", "tokenSecret": {"existingSecret": "milvus", "key": "token"}}
    objects = render(tmp_path, {"retrieval": {"backend": "milvus", "replicas": 3, "milvus": milvus}})
    assert not [s for s in by_kind(objects, "StatefulSet") if s["metadata"]["name"].endswith("retrieval")]
    retrieval = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("retrieval"))
    assert retrieval["spec"]["replicas"] == 3
    spec = pod_spec(retrieval)
    assert "volumeClaimTemplates" not in retrieval["spec"]
    assert all("persistentVolumeClaim" not in v for v in spec["volumes"]), "no PVC: the index is in Milvus"
    token = next(e for e in spec["containers"][0]["env"] if e["name"] == "GATEWAY_SEARCH__MILVUS_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "milvus", "key": "token"}
    budget = next(p for p in by_kind(objects, "PodDisruptionBudget") if p["metadata"]["name"].endswith("retrieval"))
    assert budget["spec"]["selector"]["matchLabels"] == retrieval["spec"]["selector"]["matchLabels"]
    config = Settings.model_validate(yaml.safe_load(by_kind(objects, "ConfigMap")[0]["data"]["retrieval.yaml"]))
    assert config.search.backend == "milvus" and config.search.milvus_uri == milvus["uri"]
    assert config.search.milvus_consistency == "Strong" and config.search.milvus_token is None
    assert not config.batch.enabled, "no volume: no batch state"
    for obj in (retrieval, budget):
        kubernetes_validate.validate(copy.deepcopy(obj), KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"retrieval": {"backend": "milvus"}}, "uri"),
        ({"retrieval": {"backend": "milvus", "milvus": {"uri": "milvus:19530"}}}, "uri"),
        ({"vllm": {"pools": [{"name": "p", "quantization": "int3"}]}}, "quantization"),
        ({"gateway": {"config": {"api_keys": ["sk-plain-text"]}}}, "api_keys"),
        ({"gateway": {"config": {"rate_limits_redis_url": "redis://:pw@redis:6379"}}}, "rate_limits_redis_url"),
        ({"gateway": {"apiKeys": {"existingSecret": "s", "key": "k", "value": "sk-plain"}}}, "value"),
        ({"gateway": {"port": 70000}}, "port"),
        ({"keda": {"enabled": False}}, "autoscaling needs keda.enabled"),
        ({"vllm": {"pools": [{"name": "p", "lora": {"maxLoraRank": 7}}]}}, "maxLoraRank"),
        ({"vllm": {"pools": [{"name": "p", "lora": {"modules": [{"name": "x", "path": "rel"}]}}]}}, "path"),
    ],
)
def test_bad_values_fail_at_install(tmp_path: Path, values: dict[str, Any], complaint: str) -> None:
    from helm_sdkpy.exceptions import InstallError

    with pytest.raises(InstallError) as caught:
        render(tmp_path, values)
    assert complaint in str(caught.value)


def test_service_monitors_select_services_and_ports_that_exist(tmp_path: Path) -> None:
    objects = render(tmp_path, {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}})
    monitors = by_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["name"].rsplit("-", 1)[1] for m in monitors} == {"gateway", "vllm", "retrieval"}
    services = by_kind(objects, "Service")
    vllm_policy = next(p for p in by_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-vllm"))
    scrape_rule = vllm_policy["spec"]["ingress"][1]
    assert scrape_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        wanted = monitor["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert selected, monitor["metadata"]["name"]
        port = monitor["spec"]["endpoints"][0]["port"]
        assert all(port in {p["name"] for p in s["spec"]["ports"]} for s in selected)


def test_the_prometheus_rule_carries_the_rules_file_that_promtool_accepts(tmp_path: Path) -> None:
    objects = render(tmp_path, {"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}})
    rule = by_kind(objects, "PrometheusRule")[0]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    rules_file = CHART / "files" / "prometheus-rules.yaml"
    assert rule["spec"] == yaml.safe_load(rules_file.read_text()), "the file, as-is"
    promtool = shutil.which("promtool")
    assert promtool is not None, "scripts/setup installs Debian's prometheus (with promtool)"
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    readme = (CHART.parents[1] / "README.md").read_text()
    assert all(f"`{alert}`" in readme for alert in alerts), "README lists each alert and what to do"
    off = tmp_path / "off"
    off.mkdir()
    assert not by_kind(render(off, {}), "PrometheusRule"), "off unless asked for"
