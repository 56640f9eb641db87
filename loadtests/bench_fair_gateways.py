"""Fair share across two gateways in front of one replica: tenant counters per gateway process against counters
shared through Redis, side by side in one run, on one real vLLM CPU replica started with `--max-num-seqs 4`.

Each arm is a pair of gateway processes (scheduler on) in front of the same replica; the `shared` pair also names
one Redis (Debian's redis-server, started here) as `rate_limits_redis_url`. In each arm, tenant `wide` keeps
`--clients` streamed text chats open through each gateway of the pair, tenant `narrow` as many through the first
gateway only; both ask the same output. Figures: each tenant's share of the tokens served (from the replica's usage
reports) and Jain's index over the two; total tokens/s.

With counters per gateway, the first gateway splits its part of the replica between the two tenants and the
second gives all of its part to `wide`: about 3/4 to `wide`. With shared counters, `wide`'s counter holds what the
second gateway served it, so the first gateway serves `narrow` until the counters meet: the split moves toward
1/2 each, as far as the replica's slots split between the two gateways allows.

    .venv/bin/python loadtests/bench_fair_gateways.py [--seconds 20] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_fairness import (  # noqa: E402
    MODEL,
    Gateway,
    Tally,
    chat,
    closed_loop,
    gateway_in_front,
    shares,
    small_batch_replica,
)
from tests.harness.redis_server import RedisServer  # noqa: E402

KEYS = [{"key": "sk-wide", "namespace": "wide"}, {"key": "sk-narrow", "namespace": "narrow"}]
OUTPUT_TOKENS = 64


def start_gateway(replica: str, redis_url: str | None, workdir: Path) -> Gateway:
    shared = {"rate_limits_redis_url": redis_url} if redis_url else {}
    return gateway_in_front({"name": MODEL, "upstreams": [replica]}, KEYS, workdir, **shared)


async def phase(first: str, second: str, seconds: float, clients: int) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=2 * clients + 8)
    async with (
        httpx.AsyncClient(base_url=first, timeout=300, limits=limits) as at_first,
        httpx.AsyncClient(base_url=second, timeout=300, limits=limits) as at_second,
    ):
        until = time.perf_counter() + seconds
        work = []
        for n in range(clients):
            for who, http in (("wide", at_first), ("wide", at_second), ("narrow", at_first)):
                make = lambda i, n=n, who=who: chat(f"Tell {who} story {n}-{i}.", OUTPUT_TOKENS)  # noqa: E731
                work.append(closed_loop(http, who, f"sk-{who}", make, until, tally))
        await asyncio.gather(*work)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir).start()
        replica, replica_url = small_batch_replica(workdir, args.max_num_seqs)
        arms = {
            "per gateway": [start_gateway(replica_url, None, workdir) for _ in range(2)],
            "shared (Redis)": [start_gateway(replica_url, redis.url, workdir) for _ in range(2)],
        }
        try:
            replica.wait_ready(600)
            for pair in arms.values():
                for process, _ in pair:
                    process.wait_ready(30)
            results = {}
            for arm, pair in arms.items():
                tally = asyncio.run(phase(pair[0][1], pair[1][1], args.seconds, args.clients))
                results[arm] = shares(tally, args.seconds, ("wide", "narrow"))
                print(f"done: {arm}", file=sys.stderr)
        finally:
            for pair in arms.values():
                for process, _ in pair:
                    process.stop()
            replica.stop()
            redis.stop()
    print(
        f"\nOne vLLM CPU replica, --max-num-seqs {args.max_num_seqs}, two gateways; {args.seconds:.0f} s an arm; "
        f"{args.clients} clients of `wide` on each gateway and of `narrow` on the first; {OUTPUT_TOKENS} tokens each"
    )
    print("\n| tenant counters | wide / narrow token share | Jain's index | tokens/s |")
    print("|---|---|---|---|")
    for arm, (wide, narrow, jain, rate) in results.items():
        print(f"| {arm} | {wide:.2f} / {narrow:.2f} | {jain:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
