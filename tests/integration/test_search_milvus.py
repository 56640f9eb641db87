"""The Milvus backend's own faults, with real processes: Milvus Lite as the gateway's child and as a separate server
(the http URI path a cluster takes), kill -9 of each, two gateways sharing one Milvus, and a collection moved between
the engines with the CLI. The search API itself runs against both engines in test_search_api.py."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.cli import main as cli_main
from tests.harness.processes import free_port
from tests.support import RunningGateway, run_gateway, wait_until, write_config

DIM = 16


LOAD_PHASE = 1.0  # how long the writer and searcher run before and after a fault


def _vector(rng: random.Random) -> list[float]:
    raw = np.array([rng.uniform(-1, 1) for _ in range(DIM)], np.float32)
    return (raw / np.linalg.norm(raw)).tolist()


def _args(tmp_path: Path, uri: str, name: str = "milvus.yaml") -> list[str]:
    search = {"backend": "milvus", "milvus_uri": uri, "milvus_timeout": 10, "snapshot_every": 50}
    return ["--config", str(write_config(tmp_path / name, [], search=search))]


def _create(client: httpx.Client, name: str = "c") -> None:
    response = client.post("/v1/collections", json={"name": name, "dimensions": DIM})
    assert response.status_code == 201, response.text


def _present(client: httpx.Client, ids: set[str]) -> set[str]:
    found = set()
    for item_id in ids:
        response = client.get(f"/v1/collections/c/items/{item_id}")
        assert response.status_code in (200, 404), response.text
        if response.status_code == 200:
            found.add(item_id)
    return found


class LiteProcess:
    """`milvus-lite server` on its own: what the gateway reaches over http, as it would a Milvus server."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir)]
        self.process = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(self.port)])
        from pymilvus import MilvusClient

        def listening() -> bool:
            try:
                MilvusClient(uri=self.uri, timeout=1).list_collections(timeout=1)
            except Exception:
                return False
            return True

        assert wait_until(listening, 30), "milvus-lite server did not listen"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[LiteProcess]:
    server = LiteProcess(tmp_path / "server.db")
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


def _lite_child_pid(gateway: RunningGateway) -> int:
    found = re.findall(r"Milvus Lite started \(pid (\d+)\)", gateway.log())
    assert found, "the gateway logs the Lite child it started"
    return int(found[-1])


def test_kill_9_of_the_gateway_loses_no_acknowledged_write(tmp_path: Path, log_dir: Path) -> None:
    """D1 for Milvus: the gateway (and with it its Lite child) is killed mid-ingest; every write it acknowledged
    is there after a restart on the same file. Milvus owns durability here; this checks that it keeps it."""
    args = _args(tmp_path, str(tmp_path / "lite.db"))
    acknowledged: set[str] = set()
    rng = random.Random(11)
    for cycle in range(2):
        with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            if cycle == 0:
                _create(client)
            stop = threading.Event()

            def ingest(client: httpx.Client = client, stop: threading.Event = stop, cycle: int = cycle) -> None:
                batch = 0
                while not stop.is_set():
                    items = [{"id": f"k{cycle}-{batch}-{n}", "vector": _vector(rng)} for n in range(5)]
                    try:
                        response = client.post("/v1/collections/c/items", json={"items": items})
                    except httpx.TransportError:
                        return  # killed mid-request: not acknowledged
                    if response.status_code == 200:
                        acknowledged.update(item["id"] for item in items)
                    batch += 1

            writer = threading.Thread(target=ingest)
            writer.start()
            time.sleep(1.5 + rng.random())
            gateway.process.signal(signal.SIGKILL)
            stop.set()
            writer.join(10)
        assert acknowledged, "some writes were acknowledged before the kill"
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        assert _present(client, acknowledged) == acknowledged


def test_milvus_down_answers_503_then_recovers_without_a_restart(
    tmp_path: Path, log_dir: Path, lite: LiteProcess
) -> None:
    """E-cases for an external Milvus: killed under load, searches and writes get 503 with Retry-After and readiness
    names the backend; once it is back, the same gateway serves again, with every acknowledged item."""
    rng = random.Random(12)
    with run_gateway(_args(tmp_path, lite.uri), log_dir) as gateway:
        client = httpx.Client(base_url=gateway.base_url, timeout=15)
        _create(client)
        kept = [{"id": f"a{n}", "vector": _vector(rng)} for n in range(20)]
        assert client.post("/v1/collections/c/items", json={"items": kept}).status_code == 200
        query = {"collection": "c", "query": {"vector": kept[0]["vector"]}, "top_k": 3}
        assert client.post("/v1/search", json=query).json()["data"][0]["id"] == "a0"
        statuses: list[int] = []
        acknowledged: set[str] = set()
        stop = threading.Event()

        def load() -> None:  # a writer and a searcher, back to back, through the kill
            with httpx.Client(base_url=gateway.base_url, timeout=15) as own:
                n = 0
                while not stop.is_set():
                    item = {"id": f"w{n}", "vector": _vector(random.Random(n))}
                    wrote = own.post("/v1/collections/c/items", json={"items": [item]})
                    statuses.extend([wrote.status_code, own.post("/v1/search", json=query).status_code])
                    if wrote.status_code == 200:
                        acknowledged.add(item["id"])
                    n += 1

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(LOAD_PHASE)  # the writer and searcher run before the fault
        lite.kill()
        assert wait_until(lambda: client.post("/v1/search", json=query).status_code == 503, 30)
        search = client.post("/v1/search", json=query)
        write = client.post("/v1/collections/c/items", json={"items": [{"id": "lost", "vector": _vector(rng)}]})
        for refused in (search, write):
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            assert refused.json()["error"]["code"] == "index_unavailable"
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "milvus" in ready.text
        assert gateway.metric("gateway_index_backend_errors_total", {"backend": "milvus"}) >= 1
        lite.start()
        assert wait_until(lambda: client.get("/health/ready").status_code == 200, 30), client.get("/health/ready").text
        time.sleep(LOAD_PHASE)
        stop.set()
        loader.join(30)
        assert set(statuses) <= {200, 503} and 503 in statuses and statuses[-1] == 200, sorted(set(statuses))
        assert client.post("/v1/search", json=query).json()["data"][0]["id"] == "a0"
        wanted = {i["id"] for i in kept} | acknowledged
        assert _present(client, wanted | {"lost"}) == wanted, "every acknowledged write, and only those"
        client.close()


def test_a_killed_lite_child_is_started_again(tmp_path: Path, log_dir: Path) -> None:
    rng = random.Random(13)
    with run_gateway(_args(tmp_path, str(tmp_path / "lite.db")), log_dir) as gateway:
        client = httpx.Client(base_url=gateway.base_url, timeout=15)
        _create(client)
        item = {"id": "x", "vector": _vector(rng)}
        assert client.post("/v1/collections/c/items", json={"items": [item]}).status_code == 200
        first = _lite_child_pid(gateway)
        subprocess.run(["kill", "-9", str(first)], check=True)
        started_again = lambda: _lite_child_pid(gateway) != first and client.get("/health/ready").status_code == 200  # noqa: E731
        assert wait_until(started_again, 30), "the gateway starts Lite again and serves"
        assert client.get("/v1/collections/c/items/x").json()["vector"] == pytest.approx(item["vector"], abs=1e-6)
        client.close()


def test_two_gateways_share_one_milvus(tmp_path: Path, log_dir: Path, lite: LiteProcess) -> None:
    """Stateless retrieval replicas: a collection created and written through one gateway is listed and searched
    through another at once (Strong consistency: read-your-writes across replicas), and dropped through either."""
    rng = random.Random(14)
    with (
        run_gateway(_args(tmp_path, lite.uri, "a.yaml"), log_dir) as first,
        run_gateway(_args(tmp_path, lite.uri, "b.yaml"), log_dir) as second,
    ):
        a = httpx.Client(base_url=first.base_url, timeout=15)
        b = httpx.Client(base_url=second.base_url, timeout=15)
        _create(a)
        assert b.post("/v1/collections", json={"name": "c", "dimensions": DIM}).status_code == 409
        for n in range(5):
            item = {"id": f"s{n}", "vector": _vector(rng), "metadata": {"n": n}}
            assert a.post("/v1/collections/c/items", json={"items": [item]}).status_code == 200
            query = {"collection": "c", "query": {"vector": item["vector"]}, "top_k": 1, "filter": {"n": n}}
            assert [h["id"] for h in b.post("/v1/search", json=query).json()["data"]] == [f"s{n}"]
        assert [c["name"] for c in b.get("/v1/collections").json()["data"]] == ["c"]
        assert b.delete("/v1/collections/c").status_code == 204
        assert a.post("/v1/search", json={"collection": "c", "query": {"vector": [1.0] * DIM}}).status_code == 404
        a.close()
        b.close()


def test_a_collection_moves_from_faiss_to_milvus_and_back(tmp_path: Path, log_dir: Path) -> None:
    rng = random.Random(15)
    items: list[dict[str, Any]] = [
        {"id": f"m{n}", "vector": _vector(rng), "metadata": {"n": n, "tag": "x" if n % 2 else None}} for n in range(30)
    ]
    faiss_config = write_config(tmp_path / "f.yaml", [], search={"index_dir": str(tmp_path / "index")})
    with (
        run_gateway(["--config", str(faiss_config)], log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):
        _create(client)
        assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
    first = tmp_path / "from-faiss.tar.gz"
    cli_main(["index", "export", "--index-dir", str(tmp_path / "index"), "--collection", "c", "--out", str(first)])
    lite_file = str(tmp_path / "lite.db")
    cli_main(["index", "restore", "--milvus-uri", lite_file, str(first)])
    with pytest.raises(SystemExit):  # already there
        cli_main(["index", "restore", "--milvus-uri", lite_file, str(first)])
    with (
        run_gateway(_args(tmp_path, lite_file), log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):
        query = {"collection": "c", "query": {"vector": items[7]["vector"]}, "top_k": 1, "filter": {"tag": "x"}}
        assert client.post("/v1/search", json=query).json()["data"][0]["id"] == "m7"
        assert client.get("/v1/collections/c/items/m4").json()["metadata"] == {"n": 4, "tag": None}
    back = tmp_path / "from-milvus.tar.gz"
    cli_main(["index", "export", "--milvus-uri", lite_file, "--collection", "c", "--out", str(back)])
    cli_main(["index", "restore", "--index-dir", str(tmp_path / "index2"), str(back)])
    faiss_again = write_config(tmp_path / "f2.yaml", [], search={"index_dir": str(tmp_path / "index2")})
    with (
        run_gateway(["--config", str(faiss_again)], log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):
        for item in items:
            got = client.get(f"/v1/collections/c/items/{item['id']}").json()
            assert got["metadata"] == item["metadata"]
            assert np.allclose(got["vector"], item["vector"], atol=1e-6)
