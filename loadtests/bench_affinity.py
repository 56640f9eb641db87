"""Cache-affinity routing, measured by vLLM's own cache counters, side by side with the peers in one run.

Two real vLLM CPU replicas serve a random Qwen2.5-VL scaled up (`--scale`, 25 M parameters at 4) so that
prefill and the vision tower cost enough on a CPU for cache hits to show in time to first token. The workload:
`--conversations` conversations of `--turns` turns, each with its own 448x448 photo and the same words, `--clients`
at a time; every arm gets a fresh salt in its system prompt and fresh photos, so no arm inherits another's cache.

Arms, interleaved over `--rounds`:
  gateway-lo        this gateway, routing: least_outstanding
  gateway-affinity  this gateway, routing: affinity (the default), with the fair-share scheduler (the default)
  gateway-fcfs      the same without the scheduler (scheduling.enabled: false): affinity alone, every request
                    passed straight on (what the scheduler's hit rate is held to; saturate the pool with
                    `--max-num-seqs` below `--clients` so the scheduler has work to hold back)
  2-gateways        two gateway processes with affinity; each conversation alternates between them turn by turn
  router-cache      vllm-router --policy cache_aware (its default)
  router-rr         vllm-router --policy round_robin
  oracle            the client pins each conversation to one replica itself

Reported per arm (median over rounds): prefix-cache and multimodal-cache hit rates (deltas of
vllm:prefix_cache_hits/queries and vllm:mm_cache_hits/queries summed over both replicas), requests per replica
as max/mean, and streamed TTFT p50/p99 from the client; then the same for a skewed run, where one conversation
(as several parallel users of one session) sends about a third of the traffic.

    loadtests/setup-bench && .venv/bin/python loadtests/bench_affinity.py [--rounds 2] [--scale 4]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.processes import ManagedProcess, free_port, gateway_process, vllm_process  # noqa: E402
from tests.support import metric_value  # noqa: E402

MODEL = "bench-qwen-vl"
ROUTER = ROOT / ".cache" / "bench-venv" / "bin" / "vllm-router"
WORDS = "Describe this photo: what is in it, and what is happening?"
SHARED = " ".join(f"Rule {i}: answer plainly, name what you see, and say when you are unsure." for i in range(12))
COUNTERS = {
    "prefix_hits": "vllm:prefix_cache_hits_total",
    "prefix_queries": "vllm:prefix_cache_queries_total",
    "mm_hits": "vllm:mm_cache_hits_total",
    "mm_queries": "vllm:mm_cache_queries_total",
    "requests": "vllm:request_success_total",
}


def stack_env() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".cache" / "stack.env").read_text().splitlines():
        name, _, value = line.partition("=")
        values[name] = value
    return values


def scaled_model(python: str, scale: int) -> Path:
    out = ROOT / ".cache" / f"bench-qwen-vl-x{scale}"
    if not (out / ".complete").exists():
        builder = ROOT / "deploy" / "models" / "build_tiny_qwen_vl.py"
        subprocess.run([python, str(builder), str(out), "--scale", str(scale)], check=True)
        (out / ".complete").touch()
    return out


def photo(seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (448, 448), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(40):
        x, y = rng.randrange(448), rng.randrange(448)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image.paste(colour, (x, y, min(448, x + 40), min(448, y + 40)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


@dataclass
class Conversation:
    """One user's conversation: a salted system prompt, its own photo, and the session id its client sends."""

    salt: str
    seed: int
    session: str

    def opening(self) -> list[dict[str, Any]]:
        image = {"type": "image_url", "image_url": {"url": photo(self.seed)}}
        return [
            {"role": "system", "content": f"Session {self.salt}. {SHARED}"},
            {"role": "user", "content": [{"type": "text", "text": WORDS}, image]},
        ]


def stream_turn(client: httpx.Client, url: str, history: list[dict[str, Any]], session: str) -> tuple[float, str]:
    """(time to the first content chunk, the reply) of one streamed turn."""
    body = {"model": MODEL, "messages": history, "max_tokens": 16, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    ttft, text = 0.0, []
    headers = {"x-session-id": session}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content") is not None:
                if not ttft:
                    ttft = time.perf_counter() - started
                text.append(delta[0]["delta"]["content"])
    return ttft, "".join(text) or "..."


def run_conversation(
    route: Callable[[int, int], str], conversation: Conversation, index: int, turns: int
) -> list[float]:
    history, ttfts = conversation.opening(), []
    with httpx.Client() as client:
        for turn in range(turns):
            ttft, reply = stream_turn(client, route(index, turn), history, conversation.session)
            ttfts.append(ttft)
            history = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me more."}]
    return ttfts


class Replicas:
    def __init__(self, python: str, model_dir: Path, work: Path, max_num_seqs: int | None) -> None:
        self.processes: list[ManagedProcess] = []
        self.urls: list[str] = []
        for name in ("a", "b"):
            port = free_port()
            process = vllm_process(
                Path(python),
                model_dir,
                served_name=MODEL,
                port=port,
                log_path=work / f"vllm-{name}.log",
                limit_mm_per_prompt={"image": 2, "video": 1},
                max_model_len=8192,
                max_num_seqs=max_num_seqs,
            )
            process.argv += ["--enable-prefix-caching"]
            self.processes.append(process)
            self.urls.append(f"http://127.0.0.1:{port}")

    def start(self) -> None:
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready(900)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def counters(self) -> list[dict[str, float]]:
        out = []
        for url in self.urls:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            out.append({name: metric_value(text, metric) for name, metric in COUNTERS.items()})
        return out


class Front:
    """A way in for the clients: processes to start, and which URL conversation i's turn t goes to."""

    def __init__(self, name: str, work: Path, replicas: Replicas) -> None:
        self.name, self.work, self.replicas = name, work, replicas
        self.processes: list[ManagedProcess] = []
        self.urls: list[str] = []

    def _gateway(self, routing: str, scheduling: bool = True) -> None:
        config = self.work / f"{self.name}-{len(self.processes)}.yaml"
        pool = {
            "name": MODEL,
            "upstreams": self.replicas.urls,
            "max_model_len": 8192,
            "routing": routing,
            "scheduling": {"enabled": scheduling},
        }
        config.write_text(yaml.safe_dump({"models": [pool], "embeddings": {"enabled": False}}))
        port = free_port()
        self.processes.append(
            gateway_process(["--config", str(config)], port=port, log_path=self.work / f"{self.name}-{port}.log")
        )
        self.urls.append(f"http://127.0.0.1:{port}")

    def _router(self, policy: str) -> None:
        port = free_port()
        argv = [str(ROUTER), "--worker-urls", *self.replicas.urls, "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--policy", policy]
        self.processes.append(ManagedProcess(argv, self.work / f"{self.name}.log", f"http://127.0.0.1:{port}/health"))
        self.urls.append(f"http://127.0.0.1:{port}")

    def start(self) -> None:
        if self.name == "gateway-lo":
            self._gateway("least_outstanding")
        elif self.name == "gateway-affinity":
            self._gateway("affinity")
        elif self.name == "gateway-fcfs":
            self._gateway("affinity", scheduling=False)
        elif self.name == "2-gateways":
            self._gateway("affinity")
            self._gateway("affinity")
        elif self.name == "router-cache":
            self._router("cache_aware")
        elif self.name == "router-rr":
            self._router("round_robin")
        for process in self.processes:
            process.start()
        for process in self.processes:
            process.wait_ready(120)

    def route(self, index: int, turn: int) -> str:
        if self.name == "oracle":
            return self.replicas.urls[index % len(self.replicas.urls)]
        return self.urls[turn % len(self.urls)]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


ARMS = ["gateway-lo", "gateway-affinity", "gateway-fcfs", "2-gateways", "router-cache", "router-rr", "oracle"]


def measure(front: Front, conversations: list[Conversation], turns: int, clients: int) -> dict[str, float]:
    before = front.replicas.counters()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(lambda ic: run_conversation(front.route, ic[1], ic[0], turns), enumerate(conversations))
        )
    time.sleep(1.0)  # vLLM's counters are published as its engine steps
    after = front.replicas.counters()
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]
    total = {k: sum(d[k] for d in delta) for k in COUNTERS}
    requests = [d["requests"] for d in delta]
    ttfts = sorted(t for ts in results for t in ts)
    return {
        "prefix_hit": total["prefix_hits"] / max(1.0, total["prefix_queries"]),
        "mm_hit": total["mm_hits"] / max(1.0, total["mm_queries"]),
        "max_over_mean": max(requests) / max(1e-9, statistics.mean(requests)),
        "split": requests,  # type: ignore[dict-item]
        "ttft_p50": statistics.median(ttfts) * 1000,
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] * 1000,
    }


def workload(salt: str, count: int, skewed: bool) -> list[Conversation]:
    conversations = [Conversation(salt, hash((salt, i)) % 10**9, f"{salt}-{i}") for i in range(count)]
    if skewed:  # one session, used by count // 2 clients at once: about a third of the traffic
        hot = Conversation(salt, hash((salt, "hot")) % 10**9, f"{salt}-hot")
        conversations = [hot] * (count // 2) + conversations
    return conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--arms", nargs="*", default=ARMS)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="each replica's batch (vLLM's default)")
    args = parser.parse_args()
    env = stack_env()
    model_dir = scaled_model(env["VLLM_PYTHON"], args.scale)
    work = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    replicas = Replicas(env["VLLM_PYTHON"], model_dir, work, args.max_num_seqs)
    print(f"starting two vLLM replicas on {model_dir.name} (logs in {work})", flush=True)
    replicas.start()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for round_index in range(args.rounds):
            for kind in ("even", "skewed"):
                for arm in args.arms:
                    front = Front(arm, work, replicas)
                    front.start()
                    try:
                        salt = f"{arm}-{kind}-{round_index}-{os.urandom(3).hex()}"
                        conversations = workload(salt, args.conversations, kind == "skewed")
                        row = measure(front, conversations, args.turns, args.clients)
                    finally:
                        front.stop()
                    results.setdefault((kind, arm), []).append(row)
                    print(f"round {round_index} {kind:6} {arm:16} {row}", flush=True)
    finally:
        replicas.stop()
    for kind in ("even", "skewed"):
        print(f"\n{kind} run (median of {args.rounds} rounds)")
        print("| arm | prefix-cache hit | mm-cache hit | requests max/mean (splits) | TTFT p50 ms | TTFT p99 ms |")
        print("|---|---|---|---|---|---|")
        for arm in args.arms:
            rows = results[(kind, arm)]

            def med(key: str, rows: list[dict[str, float]] = rows) -> float:
                return statistics.median(float(r[key]) for r in rows)

            splits = " ".join("/".join(str(int(x)) for x in r["split"]) for r in rows)  # type: ignore[attr-defined]
            print(
                f"| {arm} | {med('prefix_hit'):.3f} | {med('mm_hit'):.3f} | {med('max_over_mean'):.2f} ({splits}) "
                f"| {med('ttft_p50'):.0f} | {med('ttft_p99'):.0f} |"
            )
    oracle = statistics.median(r["prefix_hit"] for r in results[("even", "oracle")]) if "oracle" in args.arms else 0
    if oracle and "gateway-affinity" in args.arms:
        affine = statistics.median(r["prefix_hit"] for r in results[("even", "gateway-affinity")])
        print(f"\ngateway-affinity prefix-cache hit rate / oracle's: {affine / oracle:.3f}")
    if {"gateway-affinity", "gateway-fcfs"} <= set(args.arms):
        for kind in ("even", "skewed"):
            scheduled, alone = (
                statistics.median(r["prefix_hit"] for r in results[(kind, arm)])
                for arm in ("gateway-affinity", "gateway-fcfs")
            )
            print(
                f"{kind}: prefix-cache hit rate, scheduler - affinity alone: {scheduled - alone:+.3f} (goal >= -0.02)"
            )


if __name__ == "__main__":
    main()
