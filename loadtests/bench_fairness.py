"""Fair share of a saturated pool: today's pass-through (vLLM's first-come-first-served queue decides) against the
gateway's scheduler, side by side in one run, on one real vLLM CPU replica started with `--max-num-seqs 4` (a
saturated GPU in miniature).

Two gateway processes front the same replica: `fcfs` (`scheduling.enabled: false`) and `scheduler` (the default).
Each phase runs on one arm, then the other, with the same load:

  alone       the light tenant alone: one short streamed text chat every 0.5 s
  flood       the same, while another tenant keeps `--flood` streamed 448x448 image chats open (48 tokens each)
  sizes       two backlogged tenants, 12 open requests each, one asking 10x the output of the other: token share
              of each (prompt + output, from the replicas' usage reports) and Jain's index; total tokens/s
  weights     the same with the big tenant's key weighted 2: its share should be 2/3
  flex        the light tenant while a flex-tier tenant keeps `--flood` requests open (bulk work)
  throughput  one tenant alone keeps `--flood` text chats open: total tokens/s with nothing to share (what the
              limit itself costs; the sizes phase's total also moves with how much of the small tenant is served)

Goals (issue 26): light TTFT p50 under the flood <= 10x alone, every light request completed; equal token shares
within 10% (2:1 within 10%); total tokens/s >= 0.95x FCFS; a flex flood raises the light p99 TTFT by <= 10%.

    .venv/bin/python loadtests/bench_fairness.py [--seconds 20] [--flood 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_affinity import stack_env  # noqa: E402
from tests.harness.processes import ManagedProcess, free_port, gateway_process, vllm_process  # noqa: E402

MODEL = "bench-qwen-vl"
KEYS = {
    "light": {"key": "sk-light", "namespace": "light"},
    "flood": {"key": "sk-flood", "namespace": "flood"},
    "big": {"key": "sk-big", "namespace": "big"},
    "small": {"key": "sk-small", "namespace": "small"},
    "big2": {"key": "sk-big2", "namespace": "big2", "weight": 2},
    "bulk": {"key": "sk-bulk", "namespace": "bulk", "service_tier": "flex", "max_service_tier": "flex"},
}


def photo(seed: int) -> str:
    image = Image.new("RGB", (448, 448), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    for x in range(0, 448, 7):
        image.putpixel((x, (x * seed) % 448), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def chat(text: str, tokens: int, image: str | None = None) -> dict[str, Any]:
    content: Any = (
        text if image is None else [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]
    )
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Result:
    ttft: float | None = None
    tokens: int = 0
    ok: bool = False
    ended: float = 0.0


@dataclass
class Tally:
    results: dict[str, list[Result]] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)
    waited: float = 0.0  # default-band requests that waited in the gateway's queue (scheduler arm)
    limits: list[tuple[float, float]] = field(default_factory=list)  # (replica limit, queued at the gateway)

    def add(self, who: str, result: Result) -> None:
        self.results.setdefault(who, []).append(result)


async def one(http: httpx.AsyncClient, key: str, body: dict[str, Any]) -> Result:
    result = Result()
    started = time.perf_counter()
    tail = b""
    try:
        headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        async with http.stream("POST", "/v1/chat/completions", content=orjson.dumps(body), headers=headers) as reply:
            async for chunk in reply.aiter_bytes():
                if result.ttft is None and b'"content"' in chunk:
                    result.ttft = time.perf_counter() - started
                tail = (tail + chunk)[-2048:]
            result.ok = reply.status_code == 200
    except httpx.HTTPError:
        return result
    at = tail.rfind(b'"usage":')
    if at >= 0:
        usage = orjson.loads(tail[at + 8 : tail.index(b"}", at) + 1])
        result.tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    result.ended = time.perf_counter()
    return result


async def closed_loop(http: httpx.AsyncClient, who: str, key: str, make: Any, until: float, tally: Tally) -> None:
    n = 0
    while time.perf_counter() < until:
        n += 1
        tally.add(who, await one(http, key, make(n)))


async def paced(http: httpx.AsyncClient, who: str, key: str, every: float, until: float, tally: Tally) -> None:
    tasks = []
    n = 0
    while time.perf_counter() < until:
        n += 1
        tasks.append(asyncio.create_task(one(http, key, chat(f"Say hello, number {n}.", 8))))
        await asyncio.sleep(every)
    for result in await asyncio.gather(*tasks):
        tally.add(who, result)


async def phase(url: str, name: str, seconds: float, flood: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=flood + 64, max_keepalive_connections=flood + 64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        until = time.perf_counter() + seconds
        work = []
        if name == "alone":
            work.append(paced(http, "light", "sk-light", 0.5, until, tally))
        elif name in ("flood", "flex"):
            key = "sk-flood" if name == "flood" else "sk-bulk"
            images = [photo(i) for i in range(8)]
            for w in range(flood):
                make = lambda n, w=w: chat(f"Describe photo {w}-{n}.", 48, images[(w + n) % len(images)])  # noqa: E731
                work.append(closed_loop(http, "background", key, make, until, tally))
            await asyncio.sleep(1.0)  # the background fills the replica first
            until += 1.0
            work.append(paced(http, "light", "sk-light", 0.5, until, tally))
        elif name == "throughput":
            for w in range(flood):
                make = lambda n, w=w: chat(f"Write about {w}-{n}.", 48)  # noqa: E731
                work.append(closed_loop(http, "big", "sk-flood", make, until, tally))
        else:
            big_key = "sk-big" if name == "sizes" else "sk-big2"
            for _ in range(12):
                work.append(closed_loop(http, "big", big_key, lambda n: chat(f"Tell a story {n}.", 160), until, tally))
                work.append(
                    closed_loop(http, "small", "sk-small", lambda n: chat(f"Tell a tale {n}.", 16), until, tally)
                )
        before = await served(http)
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_scheduler(http, stop, tally))
        await asyncio.gather(*work)
        stop.set()
        await sampler
        tally.add("window", Result(ttft=seconds))
        after = await served(http)
        tally.served = {tenant: after.get(tenant, 0.0) - before.get(tenant, 0.0) for tenant in after}
        tally.waited = after.get(WAITED, 0.0) - before.get(WAITED, 0.0)
    return tally


async def sample_scheduler(http: httpx.AsyncClient, stop: asyncio.Event, tally: Tally) -> None:
    """The replica's in-flight limit and the requests waiting at the gateway, twice a second (scheduler arm)."""
    while not stop.is_set():
        exposition = (await http.get("/metrics")).text
        limit = queued = 0.0
        for line in exposition.splitlines():
            if line.startswith("gateway_replica_inflight_limit{"):
                limit = float(line.rsplit(" ", 1)[1])
            elif line.startswith("gateway_queue_requests{"):
                queued += float(line.rsplit(" ", 1)[1])
        tally.limits.append((limit, queued))
        await asyncio.sleep(0.5)


WAITED = "(default band waited)"


async def served(http: httpx.AsyncClient) -> dict[str, float]:
    """The gateway's own count of tokens served per tenant (what its fair share equalises), and under WAITED the
    default-band requests that have waited in its queue."""
    exposition = (await http.get("/metrics")).text
    counts: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith("gateway_queue_wait_seconds_count{") and 'band="default"' in line:
            counts[WAITED] = counts.get(WAITED, 0.0) + float(line.rsplit(" ", 1)[1])
        if line.startswith("gateway_tenant_tokens_total{"):
            tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
            counts[tenant] = counts.get(tenant, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def shares(tally: Tally, seconds: float, pair: tuple[str, str] = ("big", "small")) -> tuple[float, float, float, float]:
    """(the first tenant's share of tokens, the second's, Jain's index over the two, total tokens/s)."""
    big, small = (sum(r.tokens for r in tally.results.get(tenant, [])) for tenant in pair)
    total = big + small
    jain = total**2 / (2 * (big**2 + small**2)) if total else float("nan")
    return big / total, small / total, jain, total / seconds


Gateway = tuple[ManagedProcess, str]


def start_gateway(replica: str, enabled: bool, workdir: Path) -> Gateway:
    keys = [{**k} for k in KEYS.values()]
    pool = {"name": MODEL, "upstreams": [replica], "scheduling": {"enabled": enabled}}
    return gateway_in_front(pool, keys, workdir)


def gateway_in_front(pool: dict[str, Any], keys: list[dict[str, Any]], workdir: Path, **settings: Any) -> Gateway:
    """A gateway process (started, not yet ready) serving `pool` to `keys`, its config and log in `workdir`."""
    port = free_port()
    config = {"models": [pool], "keys": keys, "embeddings": {"enabled": False}, "health_check_interval": 1, **settings}
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    process = gateway_process(["--config", str(path)], port=port, log_path=workdir / f"gateway-{port}.log")
    process.start()
    return process, f"http://127.0.0.1:{port}"


def small_batch_replica(workdir: Path, max_num_seqs: int) -> tuple[ManagedProcess, str]:
    """One vLLM CPU replica of the tiny checkpoint whose batch holds `max_num_seqs` sequences (started, not yet
    ready): a saturated GPU in miniature. Shared with bench_batch.py."""
    env = stack_env()
    port = free_port()
    replica = vllm_process(
        Path(env["VLLM_PYTHON"]),
        Path(env["TINY_MODEL_DIR"]),
        served_name=MODEL,
        port=port,
        log_path=workdir / "vllm.log",
        limit_mm_per_prompt={"image": 2, "video": 1},
        max_num_seqs=max_num_seqs,
    )
    replica.start()
    return replica, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--flood", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        replica, replica_url = small_batch_replica(workdir, args.max_num_seqs)
        gateways = [start_gateway(replica_url, enabled, workdir) for enabled in (False, True)]
        try:
            replica.wait_ready(600)
            for process, _ in gateways:
                process.wait_ready(30)
            arms = {"fcfs": gateways[0][1], "scheduler": gateways[1][1]}
            results: dict[tuple[str, str], Tally] = {}
            for name in ("alone", "flood", "sizes", "weights", "flex", "throughput"):
                for arm, url in arms.items():
                    results[(arm, name)] = asyncio.run(phase(url, name, args.seconds, args.flood))
                    print(f"done: {arm} {name}", file=sys.stderr)
            report(results, args)
        finally:
            for process, _ in gateways:
                process.stop()
            replica.stop()


def report(results: dict[tuple[str, str], Tally], args: argparse.Namespace) -> None:
    def light(arm: str, name: str) -> list[Result]:
        return results[(arm, name)].results.get("light", [])

    def ttfts(arm: str, name: str) -> list[float]:
        return [r.ttft for r in light(arm, name) if r.ok and r.ttft is not None]

    print(
        f"\nOne vLLM CPU replica, --max-num-seqs {args.max_num_seqs}; {args.seconds:.0f} s a phase; flood {args.flood}"
    )
    print("\n| figure | FCFS (pass-through) | scheduler | goal |")
    print("|---|---|---|---|")
    alone = {arm: statistics.median(ttfts(arm, "alone")) for arm in ("fcfs", "scheduler")}
    row = lambda label, f, g, goal="": print(f"| {label} | {f} | {g} | {goal} |")  # noqa: E731
    row("light TTFT p50 alone (ms)", f"{alone['fcfs'] * 1000:.0f}", f"{alone['scheduler'] * 1000:.0f}")
    flood = {arm: ttfts(arm, "flood") for arm in ("fcfs", "scheduler")}
    row(
        "light TTFT p50 / p99 under flood (ms)",
        f"{p(flood['fcfs'], 0.5) * 1000:.0f} / {p(flood['fcfs'], 0.99) * 1000:.0f}",
        f"{p(flood['scheduler'], 0.5) * 1000:.0f} / {p(flood['scheduler'], 0.99) * 1000:.0f}",
    )
    row(
        "light p50 under flood / alone",
        f"{p(flood['fcfs'], 0.5) / alone['fcfs']:.1f}x",
        f"{p(flood['scheduler'], 0.5) / alone['scheduler']:.1f}x",
        "<= 10x",
    )
    done = {arm: (sum(r.ok for r in light(arm, "flood")), len(light(arm, "flood"))) for arm in ("fcfs", "scheduler")}
    row(
        "light completed / offered under flood",
        "{}/{}".format(*done["fcfs"]),
        "{}/{}".format(*done["scheduler"]),
        "all",
    )
    sizes = {arm: shares(results[(arm, "sizes")], args.seconds) for arm in ("fcfs", "scheduler")}
    row(
        "10:1 sizes, equal weights: big / small token share (Jain)",
        f"{sizes['fcfs'][0]:.2f} / {sizes['fcfs'][1]:.2f} ({sizes['fcfs'][2]:.2f})",
        f"{sizes['scheduler'][0]:.2f} / {sizes['scheduler'][1]:.2f} ({sizes['scheduler'][2]:.2f})",
        "0.50 / 0.50 within 10%",
    )
    weights = {arm: shares(results[(arm, "weights")], args.seconds) for arm in ("fcfs", "scheduler")}
    row(
        "10:1 sizes, weights 2:1: big / small token share",
        f"{weights['fcfs'][0]:.2f} / {weights['fcfs'][1]:.2f}",
        f"{weights['scheduler'][0]:.2f} / {weights['scheduler'][1]:.2f}",
        "0.67 / 0.33 within 10%",
    )
    for name, pair in (("sizes", ("big", "small")), ("weights", ("big2", "small"))):
        counted = results[("scheduler", name)].served
        big, small = (counted.get(t, 0.0) for t in pair)
        row(
            f"{name}: big / small share of the gateway's own token count",
            "-",
            f"{big / max(big + small, 1):.2f} / {small / max(big + small, 1):.2f}",
        )
    row(
        "total tokens/s, sizes phase (a different mix is served)",
        f"{sizes['fcfs'][3]:.0f}",
        f"{sizes['scheduler'][3]:.0f} ({sizes['scheduler'][3] / sizes['fcfs'][3]:.2f}x)",
    )
    alone_tps = {arm: shares(results[(arm, "throughput")], args.seconds)[3] for arm in ("fcfs", "scheduler")}
    row(
        "total tokens/s, one tenant (throughput phase)",
        f"{alone_tps['fcfs']:.0f}",
        f"{alone_tps['scheduler']:.0f} ({alone_tps['scheduler'] / alone_tps['fcfs']:.2f}x)",
        ">= 0.95x FCFS",
    )
    for name in ("flood", "sizes", "weights", "flex", "throughput"):
        samples = results[("scheduler", name)].limits
        if samples:
            limits, queued = sorted(s[0] for s in samples), sorted(s[1] for s in samples)
            row(
                f"{name}: replica limit median (max) / queued at the gateway median",
                "-",
                f"{limits[len(limits) // 2]:.0f} ({limits[-1]:.0f}) / {queued[len(queued) // 2]:.0f}",
            )
    flex = {arm: ttfts(arm, "flex") for arm in ("fcfs", "scheduler")}
    base = {arm: ttfts(arm, "alone") for arm in ("fcfs", "scheduler")}
    row(
        "light TTFT p50 alone / under a flex flood (ms)",
        f"{p(base['fcfs'], 0.5) * 1000:.0f} / {p(flex['fcfs'], 0.5) * 1000:.0f}",
        f"{p(base['scheduler'], 0.5) * 1000:.0f} / {p(flex['scheduler'], 0.5) * 1000:.0f}",
    )
    row(
        "light TTFT p99 alone / under a flex flood (ms)",
        f"{p(base['fcfs'], 0.99) * 1000:.0f} / {p(flex['fcfs'], 0.99) * 1000:.0f}",
        f"{p(base['scheduler'], 0.99) * 1000:.0f} / {p(flex['scheduler'], 0.99) * 1000:.0f}",
    )
    row(
        "light requests that waited in the gateway's queue under the flex flood",
        "-",
        f"{results[('scheduler', 'flex')].waited:.0f} of {len(light('scheduler', 'flex'))}",
    )
    row(
        "p99 under flex flood / alone",
        f"{p(flex['fcfs'], 0.99) / p(base['fcfs'], 0.99):.2f}x",
        f"{p(flex['scheduler'], 0.99) / p(base['scheduler'], 0.99):.2f}x",
        "<= 1.10x",
    )


if __name__ == "__main__":
    main()
