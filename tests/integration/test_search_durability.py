"""Index durability with real processes and real files (CASES D1-D4, D6, D7): kill -9, SIGTERM, a full disk."""

from __future__ import annotations

import http.client
import random
import resource
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from gateway.cli import main as cli_main
from tests.support import run_gateway, write_config

DIM = 16


def _args(tmp_path: Path, index_dir: Path, **search: Any) -> list[str]:
    config = write_config(tmp_path / "search.yaml", [], search={"index_dir": str(index_dir), **search})
    return ["--config", str(config)]


def _vector(rng: random.Random) -> list[float]:
    raw = np.array([rng.uniform(-1, 1) for _ in range(DIM)], np.float32)
    return (raw / np.linalg.norm(raw)).tolist()


def _create(client: httpx.Client, name: str = "c", **index: Any) -> None:
    response = client.post("/v1/collections", json={"name": name, "dimensions": DIM, "index": index or {}})
    assert response.status_code == 201, response.text


def _all_items(client: httpx.Client, ids: set[str], name: str = "c") -> dict[str, dict[str, Any]]:
    found = {}
    for item_id in ids:
        response = client.get(f"/v1/collections/{name}/items/{item_id}")
        if response.status_code == 200:
            found[item_id] = response.json()
        else:
            assert response.status_code == 404, response.text
    return found


def test_kill_9_at_random_points_loses_no_acknowledged_write(tmp_path: Path, log_dir: Path) -> None:
    index_dir = tmp_path / "index"
    args = _args(tmp_path, index_dir, snapshot_every=40)  # snapshots happen often, so kills land inside them too
    rng = random.Random(7)
    acknowledged: dict[str, tuple[list[float], dict[str, Any]]] = {}
    sent: set[str] = set()
    for cycle in range(20):
        with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            if cycle == 0:
                _create(client)
            stop = threading.Event()

            def ingest(client: httpx.Client = client, stop: threading.Event = stop, cycle: int = cycle) -> None:
                n = 0
                while not stop.is_set():
                    batch = []
                    for _ in range(rng.randint(1, 5)):
                        # Some ids are rewritten with new vectors: the last acknowledged version must win.
                        item_id = f"i{rng.randint(0, 400)}" if rng.random() < 0.3 else f"c{cycle}-{n}"
                        n += 1
                        if item_id in {b[0] for b in batch}:
                            continue
                        batch.append((item_id, _vector(rng), {"cycle": cycle, "n": n}))
                    sent.update(b[0] for b in batch)
                    try:
                        response = client.post(
                            "/v1/collections/c/items",
                            json={"items": [{"id": i, "vector": v, "metadata": m} for i, v, m in batch]},
                        )
                    except httpx.HTTPError:
                        return  # the process died under us: this batch was not acknowledged
                    if response.status_code == 200:
                        for item_id, vector, metadata in batch:
                            acknowledged[item_id] = (vector, metadata)

            writer = threading.Thread(target=ingest)
            writer.start()
            time.sleep(rng.uniform(0.2, 0.8))
            gateway.process.kill()  # SIGKILL, no chance to flush anything
            stop.set()
            writer.join()
    assert len(acknowledged) > 300
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        found = _all_items(client, sent)
        for item_id, (vector, metadata) in acknowledged.items():
            assert item_id in found, f"acknowledged {item_id} is gone"
            # An id rewritten after its last ack may hold a newer, unacknowledged version; otherwise exact.
            if found[item_id]["metadata"] == metadata:
                assert np.allclose(found[item_id]["vector"], vector, atol=1e-6)
        assert set(found) <= sent, "phantom ids"
        listed = client.get("/v1/collections").json()["data"][0]
        assert listed["items"] == len(found), "index count == stored count"
        assert gateway.metric("gateway_index_items", {"collection": "c"}) == len(found)
        for item_id, item in list(found.items())[:50]:  # and the index finds them by their own vectors
            hits = client.post(
                "/v1/search", json={"collection": "c", "query": {"vector": item["vector"]}, "top_k": 1}
            ).json()["data"]
            assert hits[0]["id"] == item_id


def test_disk_full_refuses_writes_then_recovers(tmp_path: Path, log_dir: Path) -> None:
    """A real EFBIG from the kernel (RLIMIT_FSIZE) stands in for a full disk: never a 200 for a lost write."""
    index_dir = tmp_path / "index"
    args = _args(tmp_path, index_dir, snapshot_every=1_000_000)
    with run_gateway(args, log_dir) as gateway:
        pid = gateway.process.proc.pid  # type: ignore[union-attr]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        client = httpx.Client(base_url=gateway.base_url, timeout=10)
        _create(client)
        rng = random.Random(1)
        statuses, acked = [], []
        for n in range(200):
            item = {"id": f"x{n}", "vector": _vector(rng)}
            response = client.post("/v1/collections/c/items", json={"items": [item]})
            statuses.append(response.status_code)
            if response.status_code == 200:
                acked.append(item["id"])
            else:
                error = response.json()["error"]
                assert response.status_code == 507 and error["code"] == "index_storage_failed"
        assert 200 in statuses and 507 in statuses
        assert statuses.index(507) > 0 and all(s == 507 for s in statuses[statuses.index(507) :]), (
            "once full, writes pause"
        )
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert (
            client.post(
                "/v1/collections/c/items", json={"items": [{"id": "after", "vector": _vector(rng)}]}
            ).status_code
            == 200
        )
        assert gateway.metric("gateway_index_write_failures_total", {"collection": "c"}) >= 1
        gateway.process.kill()
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        found = _all_items(client, {*acked, "after", *[f"x{n}" for n in range(200)]})
        assert set(found) == {*acked, "after"}, "exactly the acknowledged writes survive"


def test_sigterm_writes_a_final_snapshot(tmp_path: Path, log_dir: Path) -> None:
    index_dir = tmp_path / "index"
    args = _args(tmp_path, index_dir, snapshot_every=1_000_000)
    rng = random.Random(2)
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        _create(client)
        items = [{"id": f"s{n}", "vector": _vector(rng)} for n in range(30)]
        assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
        assert (index_dir / "c" / "wal.log").stat().st_size > 0
    # run_gateway stops with SIGTERM
    assert (index_dir / "c" / "snapshot.bin").stat().st_size > 30 * DIM * 4
    assert (index_dir / "c" / "wal.log").stat().st_size == 0, "everything moved into the snapshot"
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        assert len(_all_items(client, {f"s{n}" for n in range(30)})) == 30


def test_export_and_restore_on_another_node(tmp_path: Path, log_dir: Path) -> None:
    source, target = tmp_path / "node-a", tmp_path / "node-b"
    rng = random.Random(3)
    items = [{"id": f"e{n}", "vector": _vector(rng), "metadata": {"n": n}} for n in range(25)]
    with (
        run_gateway(_args(tmp_path, source), log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):
        _create(client)
        assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
        assert client.post("/v1/collections/c/snapshot").status_code == 200
        late = {"id": "late", "vector": _vector(rng)}  # after the snapshot: only in the WAL
        assert client.post("/v1/collections/c/items", json={"items": [late]}).status_code == 200
        archive = tmp_path / "c.tar.gz"
        cli_main(["index", "export", "--index-dir", str(source), "--collection", "c", "--out", str(archive)])
    cli_main(["index", "restore", "--index-dir", str(target), str(archive)])
    with pytest.raises(SystemExit) as refused:  # "already exists", on stderr, exit 2
        cli_main(["index", "restore", "--index-dir", str(target), str(archive)])
    assert refused.value.code == 2
    with (
        run_gateway(_args(tmp_path, target), log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):
        found = _all_items(client, {*[i["id"] for i in items], "late"})
        assert set(found) == {*[i["id"] for i in items], "late"}
        assert found["e7"]["metadata"] == {"n": 7}
        assert np.allclose(found["late"]["vector"], late["vector"], atol=1e-6)


def test_adds_and_searches_at_once_with_background_rebuilds(tmp_path: Path, log_dir: Path) -> None:
    args = _args(tmp_path, tmp_path / "index")
    rng = random.Random(4)
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=30) as client:
        _create(client, kind="hnsw", min_rows_for_ann=200)
        errors: list[str] = []
        done = threading.Event()

        def searcher() -> None:
            with httpx.Client(base_url=gateway.base_url, timeout=30) as reader:
                while not done.is_set():
                    response = reader.post(
                        "/v1/search",
                        json={"collection": "c", "query": {"vector": _vector(random.Random())}, "top_k": 5},
                    )
                    if response.status_code != 200 or len(response.json()["data"]) > 5:
                        errors.append(response.text)

        readers = [threading.Thread(target=searcher) for _ in range(3)]
        for reader in readers:
            reader.start()
        vectors = {}
        for batch in range(30):
            items = [{"id": f"h{batch}-{n}", "vector": _vector(rng)} for n in range(50)]
            vectors.update({i["id"]: i["vector"] for i in items})
            assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
        done.set()
        for reader in readers:
            reader.join()
        assert errors == []
        assert client.get("/v1/collections").json()["data"][0]["items"] == 1500
        hits = 0
        for item_id in list(vectors)[::50]:
            top = client.post(
                "/v1/search", json={"collection": "c", "query": {"vector": vectors[item_id]}, "top_k": 1}
            ).json()["data"]
            hits += top[0]["id"] == item_id
        assert hits >= 27, "every item stays findable while the HNSW graph is rebuilt and swapped"


def test_corrupt_snapshot_fails_readiness_loudly(tmp_path: Path, log_dir: Path) -> None:
    index_dir = tmp_path / "index"
    args = _args(tmp_path, index_dir)
    rng = random.Random(5)
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        _create(client)
        client.post("/v1/collections/c/items", json={"items": [{"id": "a", "vector": _vector(rng)}]})
    snapshot = index_dir / "c" / "snapshot.bin"
    data = bytearray(snapshot.read_bytes())
    data[-10] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert "checksum" in ready.json()["problems"][0]
        assert client.get("/health/live").status_code == 200
        response = client.get("/v1/collections/c/items/a")
        assert response.status_code == 503 and "cannot be loaded" in response.json()["error"]["message"]
        for shown in (ready.text, response.text):  # F10: no file names reach a client
            assert str(tmp_path) not in shown and "snapshot.bin" not in shown


def test_a_malformed_collection_document_fails_readiness_not_start_up(tmp_path: Path, log_dir: Path) -> None:
    """A restored archive with a valid checksum but a broken document: restore refuses it; placed by hand, the
    gateway still starts, serves its other collections and names the broken one in readiness."""
    import tarfile

    index_dir = tmp_path / "index"
    args = _args(tmp_path, index_dir)
    rng = random.Random(9)
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        _create(client, "good")
        _create(client, "bad")
        client.post("/v1/collections/good/items", json={"items": [{"id": "a", "vector": _vector(rng)}]})
    (index_dir / "bad" / "collection.json").write_bytes(b'{"name": "bad", "dim": "sixteen", "index": {}}')
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(index_dir / "bad" / "collection.json", arcname="bad/collection.json")
    with pytest.raises(SystemExit) as refused:
        cli_main(["index", "restore", "--index-dir", str(tmp_path / "elsewhere"), str(archive)])
    assert refused.value.code == 2 and not (tmp_path / "elsewhere" / "bad").exists()
    with run_gateway(args, log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["problems"] == ["collection 'bad' cannot be loaded: its collection document is malformed"]
        assert client.get("/v1/collections/good/items/a").status_code == 200
        assert client.get("/v1/collections/bad/items/a").status_code == 503


def test_a_collection_from_another_encoder_is_not_served(tmp_path: Path, log_dir: Path) -> None:
    index_dir = tmp_path / "index"

    def args(served_name: str) -> list[str]:
        config = write_config(
            tmp_path / f"{served_name}.yaml",
            [],
            search={"index_dir": str(index_dir)},
            embeddings={"clip_model": "tiny-random", "served_name": served_name},
        )
        return ["--config", str(config)]

    with run_gateway(args("clip-a"), log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=60) as c:
        assert c.post("/v1/collections", json={"name": "pics"}).status_code == 201
        assert c.post("/v1/collections/pics/items", json={"items": [{"id": "t", "text": "hello"}]}).status_code == 200
    with run_gateway(args("clip-b"), log_dir) as gateway, httpx.Client(base_url=gateway.base_url, timeout=60) as c:
        gateway.wait_for_encoder()
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and "holds vectors of 'clip-a'" in ready.json()["problems"][0]
        response = c.post("/v1/search", json={"collection": "pics", "query": {"text": "hello"}})
        assert response.status_code == 503
        assert "holds vectors of 'clip-a'" in response.json()["error"]["message"]


def test_proxies_forward_retrieval_to_the_single_writer(tmp_path: Path, log_dir: Path) -> None:
    """Two stateless proxies in front of one retrieval service: a write through one is found through the other."""
    retrieval_args = [
        "--config",
        str(
            write_config(
                tmp_path / "r.yaml",
                [],
                role="retrieval",
                keys=[{"key": "sk-team", "scopes": ["read", "write", "admin"], "namespace": "team"}],
                search={"index_dir": str(tmp_path / "index")},
            )
        ),
    ]
    with run_gateway(retrieval_args, log_dir) as retrieval:
        proxy_config = write_config(
            tmp_path / "p.yaml",
            [],
            role="proxy",
            retrieval_url=retrieval.base_url,
            keys=[{"key": "sk-team", "scopes": ["read", "write", "admin"]}],
        )
        with (
            run_gateway(["--config", str(proxy_config)], log_dir) as proxy_a,
            run_gateway(["--config", str(proxy_config)], log_dir) as proxy_b,
        ):
            auth = {"Authorization": "Bearer sk-team"}
            a = httpx.Client(base_url=proxy_a.base_url, headers=auth, timeout=10)
            b = httpx.Client(base_url=proxy_b.base_url, headers=auth, timeout=10)
            assert httpx.post(f"{proxy_a.base_url}/v1/search", json={}).status_code == 401, "proxies check keys"
            _create(a)
            vector = _vector(random.Random(6))
            assert (
                a.post("/v1/collections/c/items", json={"items": [{"id": "via-a", "vector": vector}]}).status_code
                == 200
            )
            hits = b.post("/v1/search", json={"collection": "c", "query": {"vector": vector}, "top_k": 1})
            assert hits.status_code == 200 and hits.json()["data"][0]["id"] == "via-a"
            assert b.get("/v1/collections/c/items/via-a").status_code == 200
            retrieval.process.kill()
            down = a.post("/v1/search", json={"collection": "c", "query": {"vector": vector}})
            assert down.status_code == 503 and down.headers["retry-after"] == "1"
            assert down.json()["error"]["message"] == "The retrieval service is unreachable."


def _raw_get(port: int, raw_path: str, key: str) -> tuple[int, bytes]:
    """A GET with its path exactly as given (httpx normalises dot segments; http.client and an attacker do not)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", raw_path, headers={"Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_proxy_forwards_raw_paths_and_refuses_dot_segments(tmp_path: Path, log_dir: Path) -> None:
    """F9 through a real proxy + retrieval pair: encoded dot segments never reach the retrieval service's other
    routes, and a double-encoded item id names the same item as on the retrieval service itself."""
    keys = [{"key": "sk-team", "scopes": ["read", "write", "admin"], "namespace": "team"}]
    retrieval_config = write_config(
        tmp_path / "r.yaml", [], role="retrieval", keys=keys, search={"index_dir": str(tmp_path / "index")}
    )
    with run_gateway(["--config", str(retrieval_config)], log_dir) as retrieval:
        proxy_config = write_config(tmp_path / "p.yaml", [], role="proxy", retrieval_url=retrieval.base_url, keys=keys)
        with run_gateway(["--config", str(proxy_config)], log_dir) as proxy:
            client = httpx.Client(base_url=proxy.base_url, headers={"Authorization": "Bearer sk-team"}, timeout=10)
            _create(client)
            items = [
                {"id": i, "vector": _vector(random.Random(n))} for n, i in enumerate(["a%2Fb", "a/b", "photos/x.png"])
            ]
            assert client.post("/v1/collections/c/items", json={"items": items}).status_code == 200
            for raw in (
                "/v1/collections/%2e%2e/metrics",
                "/v1/collections/..%2fmetrics",
                "/v1/collections/c/items/%2E%2E/%2E%2E/%2E%2E/openapi.json",
                "/v1/collections/../../openapi.json",
                "/v1/collections/c/items/x%2F..%2F..%2F..%2Fmetrics",
            ):
                status, body = _raw_get(proxy.port, raw, "sk-team")
                assert status == 400, (raw, status, body[:200])
                assert b"gateway_" not in body and b"openapi" not in body
            for raw, item in (("a%252Fb", "a%2Fb"), ("a/b", "a/b"), ("photos/x.png", "photos/x.png")):
                via_proxy = _raw_get(proxy.port, f"/v1/collections/c/items/{raw}", "sk-team")
                direct = _raw_get(retrieval.port, f"/v1/collections/c/items/{raw}", "sk-team")
                assert via_proxy[0] == direct[0] == 200, (raw, via_proxy, direct)
                assert orjson.loads(via_proxy[1])["id"] == orjson.loads(direct[1])["id"] == item
            assert client.delete("/v1/collections/c/items/photos/x.png").json()["deleted"] is True
