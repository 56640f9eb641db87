"""One gateway process holding 1,000 concurrent streams against the mock upstream: no errors, no stalls.

Each stream is 64 tokens paced 20 ms apart (~1.3 s when nothing stalls). Reports errors, stream durations, the
longest gap between two chunks any client saw, and the gateway's peak RSS and CPU time.

    .venv/bin/python loadtests/streams_1000.py [--streams 1000] [--tokens 64] [--pace-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from bench_proxies import process_tree_cpu  # run as a script: loadtests/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]
MOCK_PORT, GATEWAY_PORT = 9320, 9321


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return 1024 * int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


async def one_stream(
    session: aiohttp.ClientSession, port: int, body: bytes, tokens: int
) -> tuple[bool, float, float, str]:
    started = time.perf_counter()
    last, longest_gap, chunks, tail = started, 0.0, 0, b""
    try:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body) as response:
            if response.status != 200:
                return False, 0.0, 0.0, f"status {response.status}"
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                longest_gap = max(longest_gap, now - last)
                last = now
                chunks += chunk.count(b"data: ")
                tail = (tail + chunk)[-64:]
    except (aiohttp.ClientError, TimeoutError) as error:
        return False, 0.0, 0.0, type(error).__name__
    complete = tail.endswith(b"data: [DONE]\n\n") and chunks >= tokens + 2
    return complete, time.perf_counter() - started, longest_gap, "" if complete else f"incomplete ({chunks} events)"


async def drive(port: int, streams: int, tokens: int) -> list[tuple[bool, float, float, str]]:
    body = json.dumps(
        {
            "model": "mock",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        return await asyncio.gather(*[one_stream(session, port, body, tokens) for _ in range(streams)])


def summary(args: argparse.Namespace, label: str, results: list[tuple[bool, float, float, str]]) -> None:
    ok = [r for r in results if r[0]]
    failures = [r[3] for r in results if not r[0]]
    ideal = args.tokens * args.pace_ms / 1000
    print(f"{label}: {len(ok)}/{args.streams} streams complete, {len(failures)} failed {sorted(set(failures))[:5]}")
    if ok:
        durations = sorted(r[1] for r in ok)
        print(
            f"  stream time min {durations[0]:.2f} s, median {statistics.median(durations):.2f} s, "
            f"max {durations[-1]:.2f} s (paced ideal {ideal:.2f} s); "
            f"longest gap between chunks {max(r[2] for r in ok) * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pace-ms", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streams-"))
    mock = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "loadtests/mock_upstream.py"),
            "--port",
            str(MOCK_PORT),
            "--tokens",
            str(args.tokens),
            "--paced-max-tokens",
            str(args.tokens),
            "--pace-ms",
            str(args.pace_ms),
        ],
        stdout=(work / "mock.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gateway_argv = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", f"http://127.0.0.1:{MOCK_PORT}"]
    gateway_argv += ["--model", "mock", "--port", str(GATEWAY_PORT), "--log-level", "warning"]
    gateway = subprocess.Popen(
        gateway_argv,
        env={**os.environ, "GATEWAY_EMBEDDINGS__ENABLED": "false"},
        stdout=(work / "gateway.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{GATEWAY_PORT}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        summary(args, "direct to the mock", asyncio.run(drive(MOCK_PORT, args.streams, args.tokens)))
        rss_before, cpu_before = rss(gateway.pid), process_tree_cpu(gateway.pid)
        peak = [rss_before]

        async def sample_rss() -> None:
            while True:
                peak[0] = max(peak[0], rss(gateway.pid))
                await asyncio.sleep(0.1)

        async def through_gateway() -> list[tuple[bool, float, float, str]]:
            sampler = asyncio.create_task(sample_rss())
            try:
                return await drive(GATEWAY_PORT, args.streams, args.tokens)
            finally:
                sampler.cancel()

        summary(args, "through one gateway process", asyncio.run(through_gateway()))
        cpu_after = process_tree_cpu(gateway.pid)
        print(
            f"gateway RSS {rss_before / 2**20:.0f} MiB before, peak {peak[0] / 2**20:.0f} MiB; "
            f"CPU {cpu_after - cpu_before:.2f} s for {args.streams} streams"
        )
    finally:
        for process in (gateway, mock):
            os.killpg(process.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
