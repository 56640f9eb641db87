"""Search quality and speed per index kind, on synthetic clustered 512-d unit vectors, in one run.

For each size: recall@10 of HNSW and IVF against exact search, and single-query QPS of each kind, measured
through the gateway's own Shard (what /v1/search runs). With --e2e, also /v1/search p50 through a real gateway
process holding the same vectors. With --engines, both engines side by side through a real gateway's /v1/search:
upsert throughput, single-query QPS, recall@10 against exact search, and resident memory (the gateway's, plus
Milvus Lite's own process).
    .venv/bin/python loadtests/bench_search.py --sizes 100000 1000000 --e2e
    .venv/bin/python loadtests/bench_search.py --sizes 100000 --engines faiss milvus --kind hnsw
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/ helpers, for --e2e

import httpx
import numpy as np

from gateway.search.config import IndexSpec
from gateway.search.index import Shard

DIM = 512


def clustered(count: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, count // 100), DIM)).astype(np.float32)
    labels = rng.integers(0, len(centres), count + queries)
    data = centres[labels] + 0.35 * rng.normal(size=(count + queries, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data[:count], data[count:]


def load_shard(vectors: np.ndarray, spec: IndexSpec) -> tuple[Shard, float]:
    shard = Shard(DIM, IndexSpec(kind="flat"))  # fill without triggering builds, then build once
    for i, vector in enumerate(vectors):
        shard.upsert(str(i), vector, {})
    shard.spec = spec
    started = time.perf_counter()
    if spec.kind != "flat":
        shard._ann, shard._ann_rows = spec.build(DIM, vectors), len(vectors)
    return shard, time.perf_counter() - started


def run_queries(shard: Shard, queries: np.ndarray) -> tuple[list[list[str]], float]:
    results, started = [], time.perf_counter()
    for query in queries:
        results.append([hit.item_id for hit in shard.search(query, 10, None)])
    return results, len(queries) / (time.perf_counter() - started)


def recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return statistics.mean(len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True))


def e2e_p50(vectors: np.ndarray, queries: np.ndarray, log_dir: Path) -> float:
    from tests.support import run_gateway, write_config

    config = write_config(
        log_dir / "bench.yaml",
        [],
        search={"index_dir": str(log_dir / "index"), "snapshot_every": 10_000_000, "max_items_per_request": 2000},
    )
    with (
        run_gateway(["--config", str(config)], log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=600) as client,
    ):
        client.post("/v1/collections", json={"name": "bench", "dimensions": DIM}).raise_for_status()
        for start in range(0, len(vectors), 2000):
            items = [{"id": str(start + i), "vector": v.tolist()} for i, v in enumerate(vectors[start : start + 2000])]
            client.post("/v1/collections/bench/items", json={"items": items}).raise_for_status()
        latencies = []
        for query in queries[:300]:
            body = {"collection": "bench", "query": {"vector": query.tolist()}, "top_k": 10}
            started = time.perf_counter()
            client.post("/v1/search", json=body).raise_for_status()
            latencies.append(time.perf_counter() - started)
        return statistics.median(latencies) * 1000


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def engine_row(engine: str, kind: str, vectors: np.ndarray, queries: np.ndarray, log_dir: Path, settle: float) -> str:
    """One engine behind a real gateway: the same items, the same queries, the same client."""
    import re

    from tests.support import run_gateway, search_settings, write_config

    search = search_settings(log_dir, engine, snapshot_every=10_000_000, max_items_per_request=1000)
    config = write_config(log_dir / f"{engine}.yaml", [], search=search)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    with (
        run_gateway(["--config", str(config)], log_dir) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=600) as client,
    ):
        index = {"kind": kind, "min_rows_for_ann": 1}
        client.post("/v1/collections", json={"name": "bench", "dimensions": DIM, "index": index}).raise_for_status()
        started = time.perf_counter()
        for start in range(0, len(vectors), 1000):
            chunk = vectors[start : start + 1000]
            items = [{"id": str(start + i), "vector": v.tolist()} for i, v in enumerate(chunk)]
            client.post("/v1/collections/bench/items", json={"items": items}).raise_for_status()
        upserts = len(vectors) / (time.perf_counter() - started)
        client.post("/v1/collections/bench/snapshot").raise_for_status()  # Milvus: flush, so segments get indexed
        time.sleep(settle)  # FAISS rebuilds its ANN index, Milvus indexes sealed segments, in the background
        found, started = [], time.perf_counter()
        for query in queries:
            body = {"collection": "bench", "query": {"vector": query.tolist()}, "top_k": 10}
            found.append([int(h["id"]) for h in client.post("/v1/search", json=body).raise_for_status().json()["data"]])
        qps = len(queries) / (time.perf_counter() - started)
        hit = statistics.mean(len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, exact, strict=True))
        assert gateway.process.proc is not None
        memory = _rss_mib(gateway.process.proc.pid)
        children = re.findall(r"Milvus Lite started \(pid (\d+)\)", gateway.log())
        if children:
            memory += _rss_mib(int(children[-1]))
    return f"{len(vectors):>9} {engine:>7} {kind:>5} {upserts:>10.0f} {qps:>9.1f} {hit:>10.3f} {memory:>9.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100_000])
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--e2e", action="store_true", help="also /v1/search p50 through a gateway (first size)")
    parser.add_argument("--engines", nargs="+", choices=["faiss", "milvus"], help="compare engines via /v1/search")
    parser.add_argument("--kind", default="hnsw", choices=["flat", "hnsw", "ivf"], help="index kind for --engines")
    parser.add_argument("--settle", type=float, default=90.0, help="--engines: seconds for background index builds")
    args = parser.parse_args()
    if args.engines:
        print(f"{'vectors':>9} {'engine':>7} {'kind':>5} {'upserts/s':>10} {'QPS':>9} {'recall@10':>10} {'RSS MiB':>9}")
        for size in args.sizes:
            vectors, queries = clustered(size, min(args.queries, 300))
            for engine in args.engines:
                with tempfile.TemporaryDirectory() as tmp:
                    print(engine_row(engine, args.kind, vectors, queries, Path(tmp), args.settle), flush=True)
        return
    specs = [
        IndexSpec(kind="flat"),
        IndexSpec(kind="hnsw", m=32, ef_construction=80, ef_search=64),
        IndexSpec(kind="ivf", nprobe=16),
    ]
    # Search-time knobs swept on one build of each index.
    sweeps: dict[str, list[int]] = {"flat": [0], "hnsw": [32, 64, 128], "ivf": [4, 8, 16]}
    print(f"{'vectors':>9} {'kind':>5} {'knob':>13} {'build s':>8} {'QPS (1 query)':>14} {'recall@10':>10}")
    for size in args.sizes:
        vectors, queries = clustered(size, args.queries)
        truth: list[list[str]] = []
        for spec in specs:
            shard, build = load_shard(vectors, spec)
            for value in sweeps[spec.kind]:
                knob = ""
                if spec.kind == "hnsw":
                    shard._ann.hnsw.efSearch, knob = value, f"efSearch={value}"
                elif spec.kind == "ivf":
                    shard._ann.nprobe, knob = value, f"nprobe={value}"
                found, qps = run_queries(shard, queries)
                if spec.kind == "flat":
                    truth = found
                print(
                    f"{size:>9} {spec.kind:>5} {knob:>13} {build:>8.1f} {qps:>14.0f} {recall(found, truth):>10.3f}",
                    flush=True,
                )
            del shard
        if args.e2e and size == args.sizes[0]:
            with tempfile.TemporaryDirectory() as tmp:
                print(
                    f"{size:>9} /v1/search p50 through the gateway (flat, vector query): "
                    f"{e2e_p50(vectors, queries, Path(tmp)):.2f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
