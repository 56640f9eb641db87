"""The Batch API on a real vLLM CPU replica (`--max-num-seqs 4`), side by side in one run:

  batch        one batch alone on the idle pool: its tokens/s (prompt + output, from the output file's usage
               reports) from create to completed (goal >= 0.8x the capacity)
  capacity     `--workers` closed-loop clients send the same requests online: the pool's idle capacity
  alone        interactive streamed chats, one every 0.5 s, nothing else running: p50/p99 time to first token
  with batch   the same while a large batch runs (cancelled afterwards): p99 goal <= 1.1x alone

and, with `--store`, what one durable line costs: a result committed through the batch store (SQLite, WAL,
synchronous=FULL: the executor's path) against a JSONL append + fsync per line (the log we would write ourselves).

    .venv/bin/python loadtests/bench_batch.py [--seconds 20] [--lines 96] [--max-num-seqs 4] [--flex-reserve 1]
        [--store]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_fairness import MODEL, chat, p, small_batch_replica  # noqa: E402
from tests.harness.processes import free_port, gateway_process  # noqa: E402

KEY = "sk-bench"
TOKENS = 48


def line_body(n: int) -> dict[str, Any]:
    body = chat(f"Write about item {n}.", TOKENS)
    del body["stream"], body["stream_options"]
    return body


async def capacity(http: httpx.AsyncClient, workers: int, seconds: float) -> float:
    until = time.perf_counter() + seconds
    tokens = 0

    async def worker(w: int) -> None:
        nonlocal tokens
        n = 0
        while time.perf_counter() < until:
            n += 1
            reply = await http.post("/v1/chat/completions", json=line_body(w * 10_000 + n))
            if reply.status_code != 200:
                sys.exit(f"capacity: {reply.status_code} {reply.text[:300]}")
            usage = reply.json()["usage"]
            tokens += usage["prompt_tokens"] + usage["completion_tokens"]

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return tokens / (time.perf_counter() - started)


async def submit(http: httpx.AsyncClient, lines: int, first: int = 0) -> str:
    content = b"".join(
        orjson.dumps({"custom_id": f"l{n}", "method": "POST", "url": "/v1/chat/completions", "body": line_body(n)})
        + b"\n"
        for n in range(first, first + lines)
    )
    upload = (await http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", content)})).json()
    create = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch: str = (await http.post("/v1/batches", json=create)).json()["id"]
    return batch


async def until(http: httpx.AsyncClient, batch_id: str, reached: Any) -> dict[str, Any]:
    """The batch, polled every 0.2 s until `reached(batch)`."""
    while True:
        batch: dict[str, Any] = (await http.get(f"/v1/batches/{batch_id}")).json()
        if reached(batch):
            return batch
        await asyncio.sleep(0.2)


async def batch_alone(http: httpx.AsyncClient, lines: int) -> float:
    started = time.perf_counter()
    batch_id = await submit(http, lines)
    batch = await until(http, batch_id, lambda b: b["status"] == "completed")
    seconds = time.perf_counter() - started
    output = (await http.get(f"/v1/files/{batch['output_file_id']}/content")).content.splitlines()
    tokens = 0
    for record in output:
        usage = orjson.loads(record)["response"]["body"]["usage"]
        tokens += usage["prompt_tokens"] + usage["completion_tokens"]
    return tokens / seconds


async def interactive(http: httpx.AsyncClient, seconds: float) -> tuple[list[float], list[str]]:
    """Time to first token of each streamed chat, and what went wrong with those that got none."""
    until = time.perf_counter() + seconds
    failures: list[str] = []

    async def chat_once(n: int) -> float | None:
        started = time.perf_counter()
        body = {**chat(f"Say hello, number {n}.", 8), "ignore_eos": True}
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {(await reply.aread())[:200]!r}")
                    return None
                async for chunk in reply.aiter_bytes():
                    if b'"content"' in chunk:
                        return time.perf_counter() - started
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
            return None
        failures.append("no content")
        return None

    tasks = []
    n = 0
    while time.perf_counter() < until:
        n += 1
        tasks.append(asyncio.create_task(chat_once(n)))
        await asyncio.sleep(0.5)
    return [t for t in await asyncio.gather(*tasks) if t is not None], failures


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        # The gateway may start before the replica's first health check passes (no request is sent meanwhile:
        # the batch below runs with no interactive work about, as a batch alone on an idle pool would).
        for _ in range(120):
            if (await http.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.5)
        await batch_alone(http, args.lines // 4)  # warm-up: the limit grows to the engine's batch
        found: dict[str, Any] = {"batch": await batch_alone(http, args.lines)}
        found["capacity"] = await capacity(http, args.workers, args.seconds)
        found["alone"], found["alone_failed"] = await interactive(http, args.seconds)
        running = await submit(http, 5000, first=100_000)
        await until(http, running, lambda b: b["request_counts"]["completed"] >= 4)
        found["with_batch"], found["with_batch_failed"] = await interactive(http, args.seconds)
        await http.post(f"/v1/batches/{running}/cancel")
    return found


def store_costs(count: int) -> tuple[float, float]:
    """Durable lines per second: through the batch store, and as a JSONL append + fsync each."""
    from gateway.batch.store import BatchStore

    record = orjson.dumps({"custom_id": "x", "response": {"status_code": 200, "body": {"text": "y" * 500}}})
    with tempfile.TemporaryDirectory() as tmp:
        store = BatchStore(Path(tmp) / "s.sqlite3")

        async def through_store() -> float:
            await store.open()
            row = {
                "id": "batch_bench",
                "namespace": "n",
                "owner": "o",
                "endpoint": "/v1/chat/completions",
                "model": "m",
                "input_file_id": "file-x",
                "completion_window": "24h",
                "status": "in_progress",
                "created_at": 0,
                "expires_at": 0,
                "total": count,
            }
            await store.add_batch(row)
            started = time.perf_counter()
            for n in range(count):
                await store.record("batch_bench", n, True, record)
            rate = count / (time.perf_counter() - started)
            await store.close()
            return rate

        sqlite_rate = asyncio.run(through_store())
        started = time.perf_counter()
        with (Path(tmp) / "log.jsonl").open("ab") as log:
            for _ in range(count):
                log.write(record + b"\n")
                log.flush()
                os.fsync(log.fileno())
        return sqlite_rate, count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--lines", type=int, default=96)
    parser.add_argument("--workers", type=int, help="online clients measuring capacity; default 2x the batch")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="the replica's batch")
    parser.add_argument("--flex-reserve", type=int, default=1, help="slots per replica flex work leaves free")
    parser.add_argument("--store", action="store_true", help="also measure the cost of one durable line")
    args = parser.parse_args()
    args.workers = args.workers or 2 * args.max_num_seqs
    if args.store:
        sqlite_rate, log_rate = store_costs(2000)
        print("| durable line, 2,000 in a row | lines/s |\n|---|---|")
        print(f"| batch store (SQLite WAL, synchronous=FULL) | {sqlite_rate:,.0f} |")
        print(f"| JSONL append + fsync | {log_rate:,.0f} |\n")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        replica, replica_url = small_batch_replica(workdir, args.max_num_seqs)
        gateway_port = free_port()
        config = {
            "models": [{"name": MODEL, "upstreams": [replica_url], "scheduling": {"flex_reserve": args.flex_reserve}}],
            "keys": [{"key": KEY, "namespace": "bench"}],
            "embeddings": {"enabled": False},
            "batch": {"dir": str(workdir / "batch")},
            "health_check_interval": 1,
        }
        (workdir / "g.yaml").write_text(yaml.safe_dump(config))
        gateway = gateway_process(
            ["--config", str(workdir / "g.yaml")], port=gateway_port, log_path=workdir / "gateway.log"
        )
        gateway.start()
        try:
            replica.wait_ready(600)
            gateway.wait_ready(30)
            found = asyncio.run(run(f"http://127.0.0.1:{gateway_port}", args))
        finally:
            gateway.stop()
            replica.stop()
    alone, loaded = found["alone"], found["with_batch"]
    print(f"replica --max-num-seqs {args.max_num_seqs}, flex_reserve {args.flex_reserve}\n")
    print("| figure | value | goal |\n|---|---|---|")
    print(f"| pool capacity, {args.workers} online clients (tokens/s) | {found['capacity']:.0f} | |")
    print(f"| one batch of {args.lines} lines alone (tokens/s) | {found['batch']:.0f} | |")
    print(f"| batch / capacity | {found['batch'] / found['capacity']:.2f}x | >= 0.8x |")
    for q in (0.5, 0.99):
        ms = f"{p(alone, q) * 1e3:.0f} / {p(loaded, q) * 1e3:.0f}"
        print(f"| interactive TTFT p{q * 100:.0f} alone / with a batch (ms) | {ms} | |")
    print(f"| p99 with a batch / alone | {p(loaded, 0.99) / p(alone, 0.99):.2f}x | <= 1.1x |")
    print(f"| interactive requests measured alone / with a batch | {len(alone)} / {len(loaded)} | |")
    for failure in found["alone_failed"] + found["with_batch_failed"]:
        print(f"failed: {failure}")


if __name__ == "__main__":
    main()
