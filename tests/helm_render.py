"""Render the Helm chart with real Helm (helm-sdkpy, Helm v4 as a library) and return the manifests it would apply.

helm-sdkpy has no `template` action, and its `install` needs a Kubernetes API server. So this module runs a small
in-memory API server on loopback that answers discovery, stores what Helm creates and echoes it back; the objects
Helm POSTs are exactly the rendered manifests, values schema validation and all. Nothing here is a cluster: no
controller runs, no admission webhook fires.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# group/version -> [(plural, kind, namespaced)] for every kind the chart may render, plus what Helm itself reads.
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "keda.sh/v1alpha1": [
        ("scaledobjects", "ScaledObject", True),
        ("triggerauthentications", "TriggerAuthentication", True),
    ],
    "monitoring.coreos.com/v1": [
        ("servicemonitors", "ServiceMonitor", True),
        ("prometheusrules", "PrometheusRule", True),
    ],
}
KIND_OF = {(gv, plural): kind for gv, entries in RESOURCES.items() for plural, kind, _ in entries}


def _resource_list(group_version: str) -> dict[str, Any]:
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": plural, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs}
            for plural, kind, namespaced in RESOURCES[group_version]
        ],
    }


def _group_list() -> dict[str, Any]:
    groups = []
    for group_version in RESOURCES:
        if "/" not in group_version:
            continue
        group, version = group_version.split("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


class FakeApiServer:
    """Enough of the Kubernetes REST API for `helm install --wait=false`: discovery, create, get, list, update."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}  # request path of the object -> object
        self.created: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        handler = self._handler_class()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if "protobuf" in (self.headers.get("Content-Type") or ""):
                    # Only Helm's own release record arrives as protobuf (client-go's typed Secret client); its
                    # name is all the fake needs, and the client accepts JSON back.
                    name = re.search(rb"sh\.helm\.release\.v1\.[a-z0-9.-]+?\.v[0-9]+", raw)
                    assert name is not None, "unexpected protobuf body"
                    meta = {"name": name.group().decode(), "labels": {"owner": "helm"}}
                    return {"kind": "Secret", "apiVersion": "v1", "metadata": meta, "type": "helm.sh/release.v1"}
                return json.loads(raw or b"{}")  # type: ignore[no-any-return]

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/version":
                    return self._reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
                if path == "/api":
                    return self._reply(
                        200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
                    )
                if path == "/apis":
                    return self._reply(200, _group_list())
                group_version = path.removeprefix("/api/").removeprefix("/apis/")
                if group_version in RESOURCES:
                    return self._reply(200, _resource_list(group_version))
                with api._lock:
                    found = api.objects.get(path)
                    if found is not None:
                        return self._reply(200, found)
                    if _is_collection(path):
                        items = [o for p, o in api.objects.items() if p.rsplit("/", 1)[0] == path]
                        return self._reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items})
                return self._reply(404, _not_found(path))

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                obj = self._body()
                meta = obj.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                meta["resourceVersion"] = "1"
                meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
                if "/namespaces/" in path:
                    meta.setdefault("namespace", path.split("/namespaces/")[1].split("/")[0])
                with api._lock:
                    api.objects[f"{path}/{meta['name']}"] = obj
                    api.created.append(obj)
                self._reply(201, obj)

            def _replace(self) -> None:
                path = urlsplit(self.path).path
                obj = self._body()
                with api._lock:
                    if path not in api.objects:
                        return self._reply(404, _not_found(path))
                    if obj.get("kind"):
                        api.objects[path] = obj
                    obj = api.objects[path]
                self._reply(200, obj)

            do_PUT = _replace
            do_PATCH = _replace

        return Handler


def _is_collection(path: str) -> bool:
    parts = path.strip("/").split("/")
    group_version = "/".join(parts[1:2] if parts[0] == "api" else parts[1:3])
    rest = parts[2:] if parts[0] == "api" else parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    return len(rest) == 1 and (group_version, rest[0]) in KIND_OF


def _not_found(path: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "code": 404,
        "message": f"{path} not found",
    }


def _kubeconfig(directory: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "serving"}}],
        "current-context": "fake",
    }
    path = directory / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


@contextmanager
def _api(directory: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    with FakeApiServer() as api:
        yield api, _kubeconfig(directory, api.url)


def render(chart: Path, values: dict[str, Any], workdir: Path, release: str = "vlm") -> list[dict[str, Any]]:
    """The manifests `helm install` would apply for these values, in Helm's install order (Helm's own release
    Secret left out). Raises helm_sdkpy's InstallError when the values fail the chart's schema or a template."""
    from helm_sdkpy import Configuration, Install

    with _api(workdir) as (api, kubeconfig):
        config = Configuration(namespace="serving", kubeconfig=str(kubeconfig))
        asyncio.run(Install(config).run(release, str(chart), values=values, wait=False, timeout=30))
        return [o for o in api.created if o.get("metadata", {}).get("labels", {}).get("owner") != "helm"]


def lint(chart: Path) -> dict[str, Any]:
    from helm_sdkpy import Configuration, Lint

    return asyncio.run(Lint(Configuration(namespace="serving")).run(str(chart)))  # type: ignore[no-any-return]
