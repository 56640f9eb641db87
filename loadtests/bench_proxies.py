"""The gateway's own cost, side by side with its peers, all in front of the same fast mock upstream.

Arms: direct (no proxy), gateway (this project), nginx (a null proxy), vllm-router (Rust, PyPI) and LiteLLM
proxy (Python, PyPI). Each proxy is pinned to core 0 with taskset; the load (wrk, and an aiohttp client for
streams) and the mock run on core 1. Rounds interleave the arms so drift hits all of them alike; the table gives
the median over rounds:

  * p50 / p99 latency at c=1 and what the proxy adds over direct (non-streamed chat, wrk --latency)
  * req/s at c=32 and the proxy's CPU time per request (from /proc, all its processes)
  * streaming time to first byte at c=1 and what the proxy adds
  * a paced stream (64 tokens, 5 ms apart) end to end, against direct: the proxy must not slow streams down

It also writes latency-vs-concurrency per arm to a PNG (matplotlib). Set-up: loadtests/setup-bench (nginx and wrk
from Debian, vllm-router and LiteLLM in their own virtualenv). Run:

    loadtests/setup-bench && .venv/bin/python loadtests/bench_proxies.py [--rounds 5] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".cache" / "bench-venv"
PROXY_CORE, LOAD_CORE = "0", "1"
MOCK_PORT = 9310
PORTS = {
    "direct": MOCK_PORT,
    "gateway": 9311,
    "nginx": 9312,
    "vllm-router": 9313,
    "litellm": 9314,
    "gateway-traced": 9315,  # tracing on: every request sampled, exported over OTLP/HTTP to a local receiver
    "gateway-base": 9316,  # the same gateway at --base-commit (e.g. before a change), for "within noise" claims
}
OTLP_PORT = 9317
BASE_TREE = Path(tempfile.gettempdir()) / "bench-proxies-base-tree"
CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
"""


@dataclass
class Arm:
    name: str
    start: Callable[[Path], subprocess.Popen[bytes] | None]
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{PORTS[self.name]}"


@dataclass
class Round:
    p50: dict[str, float] = field(default_factory=dict)
    p99: dict[str, float] = field(default_factory=dict)
    rps: dict[str, float] = field(default_factory=dict)
    cpu_us: dict[str, float] = field(default_factory=dict)
    ttfb: dict[str, float] = field(default_factory=dict)
    paced: dict[str, float] = field(default_factory=dict)


def pinned(core: str, *argv: str | Path) -> list[str]:
    return ["taskset", "-c", core, *map(str, argv)]


def _popen(argv: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def start_gateway(work: Path, arm: str = "gateway", extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    argv = pinned(PROXY_CORE, sys.executable, "-m", "gateway.cli", "serve")
    argv += ["--upstream", f"http://127.0.0.1:{MOCK_PORT}", "--model", "mock", "--port", str(PORTS[arm])]
    argv += ["--log-level", "warning", "--api-key", "sk-bench"]  # keys checked, as LiteLLM checks its master key
    env = {**os.environ, "GATEWAY_EMBEDDINGS__ENABLED": "false", **(extra_env or {})}  # chat only: no CLIP encoder
    return _popen(argv, work / f"{arm}.log", env=env)


def start_traced_gateway(work: Path) -> subprocess.Popen[bytes]:
    sys.path.insert(0, str(ROOT))
    from tests.otlp_receiver import OtlpReceiver

    OtlpReceiver(port=OTLP_PORT).start()  # in this process, on the load core: it decodes every span it gets
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{OTLP_PORT}", "OTEL_TRACES_SAMPLER": "always_on"}
    return start_gateway(work, "gateway-traced", env)


def start_base_gateway(work: Path) -> subprocess.Popen[bytes]:
    """The gateway as of --base-commit, checked out beside this one and imported first on PYTHONPATH."""
    env = {"PYTHONPATH": str(BASE_TREE)}
    return start_gateway(work, "gateway-base", env)


def start_nginx(work: Path) -> subprocess.Popen[bytes]:
    conf = work / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  upstream mock {{ server 127.0.0.1:{MOCK_PORT}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{PORTS["nginx"]};
    location / {{
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
""")
    return _popen(pinned(PROXY_CORE, shutil.which("nginx") or "/usr/sbin/nginx", "-c", conf), work / "nginx.log")


def start_vllm_router(work: Path) -> subprocess.Popen[bytes]:
    argv = pinned(PROXY_CORE, BENCH_VENV / "bin" / "vllm-router", "--worker-urls", f"http://127.0.0.1:{MOCK_PORT}")
    argv += ["--host", "127.0.0.1", "--port", str(PORTS["vllm-router"]), "--policy", "round_robin"]
    argv += ["--log-level", "warning"]
    return _popen(argv, work / "vllm-router.log")


def start_litellm(work: Path) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n  - model_name: mock\n    litellm_params:\n      model: openai/mock\n"
        f"      api_base: http://127.0.0.1:{MOCK_PORT}/v1\n      api_key: none\n"
        "litellm_settings:\n  set_verbose: false\n  telemetry: false\n"
    )
    argv = pinned(PROXY_CORE, BENCH_VENV / "bin" / "litellm", "--config", config, "--port", str(PORTS["litellm"]))
    argv += ["--host", "127.0.0.1", "--num_workers", "1"]
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "LITELLM_MASTER_KEY": "sk-bench"}
    return _popen(argv, work / "litellm.log", env=env)


ARMS = {
    "direct": lambda _work: None,
    "gateway": start_gateway,
    "nginx": start_nginx,
    "vllm-router": start_vllm_router,
    "litellm": start_litellm,
    "gateway-traced": start_traced_gateway,
    "gateway-base": start_base_gateway,
}


def wait_until_serving(url: str, process: subprocess.Popen[bytes] | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode} (see its log)")
        try:
            response = httpx.post(
                f"{url}/v1/chat/completions", json=CHAT, timeout=5, headers={"Authorization": "Bearer sk-bench"}
            )
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer a chat request within {timeout:.0f} s")


def process_tree_cpu(pid: int) -> float:
    """utime + stime, in seconds, of `pid` and every descendant (nginx's worker, uvicorn's children)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


_DURATION = re.compile(r"([\d.]+)(us|ms|s)\b")


def _seconds(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    assert match, text
    return float(match.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[match.group(2)]


def run_wrk(url: str, connections: int, duration: float, script: Path) -> tuple[float, float, float, int]:
    """p50 and p99 latency (s), req/s and completed requests, from wrk on the load core."""
    argv = pinned(
        LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", script
    )
    out = subprocess.run([*argv, f"{url}/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    p50 = _seconds(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _seconds(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} failed requests at c={connections}")
    return p50, p99, rps, done


def stream_client(url: str, count: int, paced: bool) -> list[tuple[float, float]]:
    """Runs in its own process on the load core: (time to first byte, time to the end) of sequential streams."""
    import aiohttp

    body = json.dumps({**CHAT, "stream": True, **({"max_tokens": 64} if paced else {})})  # the mock paces 64
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}

    async def go() -> list[tuple[float, float]]:
        timings = []
        async with aiohttp.ClientSession() as session:
            for _ in range(count):
                started = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as response:
                    assert response.status == 200, response.status
                    first = None
                    async for _chunk in response.content.iter_any():
                        if first is None:
                            first = time.perf_counter() - started
                    assert first is not None
                    timings.append((first, time.perf_counter() - started))
        return timings

    return asyncio.run(go())


def measure_streams(url: str, count: int, paced: bool = False) -> list[tuple[float, float]]:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from loadtests.bench_proxies import stream_client; "
    code += f"print(json.dumps(stream_client({url!r}, {count}, {paced})))"
    out = subprocess.run(pinned(LOAD_CORE, sys.executable, "-c", code), capture_output=True, text=True, check=True)
    return [tuple(t) for t in json.loads(out.stdout)]  # type: ignore[misc]


def bench_round(arms: list[Arm], duration: float, script: Path, mock_pid: int) -> Round:
    result = Round()
    for arm in arms:
        p50, p99, _, _ = run_wrk(arm.url, 1, duration, script)
        pid = arm.process.pid if arm.process else mock_pid
        cpu_before = process_tree_cpu(pid)
        _, _, rps, done = run_wrk(arm.url, 32, duration, script)
        result.cpu_us[arm.name] = (process_tree_cpu(pid) - cpu_before) / done * 1e6
        result.p50[arm.name], result.p99[arm.name], result.rps[arm.name] = p50, p99, rps
        result.ttfb[arm.name] = statistics.median(t for t, _ in measure_streams(arm.url, 300))
        result.paced[arm.name] = statistics.median(total for _, total in measure_streams(arm.url, 8, paced=True))
    return result


def sweep(arms: list[Arm], script: Path, levels: list[int], duration: float) -> dict[str, list[float]]:
    return {arm.name: [run_wrk(arm.url, c, duration, script)[0] for c in levels] for arm in arms}


def plot(curves: dict[str, list[float]], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, latencies in curves.items():
        axes.plot(levels, [s * 1000 for s in latencies], marker="o", label=name)
    axes.set(xscale="log", yscale="log", xlabel="concurrent connections (wrk)", ylabel="p50 latency (ms)")
    axes.set_title("Chat through each proxy (one core), same mock upstream")
    axes.legend()
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def report(rounds: list[Round], names: list[str]) -> str:
    def med(metric: str, name: str) -> float:
        return statistics.median(getattr(r, metric)[name] for r in rounds)

    lines = [
        "| arm | p50 c=1 | added p50 | p99 c=1 | added p99 | req/s c=32 | CPU µs/req | TTFB c=1 | added TTFB "
        "| paced stream vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(
            f"| {name} | {med('p50', name) * 1e3:.3f} ms | {(med('p50', name) - med('p50', 'direct')) * 1e3:+.3f} ms "
            f"| {med('p99', name) * 1e3:.3f} ms | {(med('p99', name) - med('p99', 'direct')) * 1e3:+.3f} ms "
            f"| {med('rps', name):,.0f} | {med('cpu_us', name):,.0f} | {med('ttfb', name) * 1e3:.3f} ms "
            f"| {(med('ttfb', name) - med('ttfb', 'direct')) * 1e3:+.3f} ms "
            f"| {med('paced', name) / med('paced', 'direct'):.4f}x |"
        )
    if "gateway" in names:
        gw = med("rps", "gateway")
        lines.append("")
        for peer in ("vllm-router", "litellm", "nginx"):
            if peer in names:
                lines.append(f"gateway req/s at c=32 ÷ {peer}: {gw / med('rps', peer):.2f}")
        added50 = (med("p50", "gateway") - med("p50", "direct")) * 1e3
        added99 = (med("p99", "gateway") - med("p99", "direct")) * 1e3
        added_ttfb = (med("ttfb", "gateway") - med("ttfb", "direct")) * 1e3
        slowest = max(r.paced["gateway"] / r.paced["direct"] for r in rounds)
        lines += [
            f"goal added p50 ≤ 0.2 ms: {added50:.3f} ms; added p99 ≤ 0.5 ms: {added99:.3f} ms; "
            f"added TTFB ≤ 0.2 ms: {added_ttfb:.3f} ms; slowest paced stream vs direct ≤ 1.01x: {slowest:.4f}x",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--plot", type=Path, default=ROOT / ".cache" / "bench-proxies.png")
    parser.add_argument("--base-commit", help="the commit the gateway-base arm runs (git worktree in a temp dir)")
    args = parser.parse_args()
    names = [n for n in args.arms.split(",") if n]
    if "gateway-base" in names:
        assert args.base_commit, "the gateway-base arm needs --base-commit"
        if BASE_TREE.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(BASE_TREE)], check=False)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(BASE_TREE), args.base_commit], check=True
        )
    assert names[0] == "direct", "direct comes first: every added figure is measured against it"
    work = Path(tempfile.mkdtemp(prefix="bench-proxies-"))
    script = work / "chat.lua"
    script.write_text(WRK_SCRIPT % json.dumps(CHAT))
    mock_argv = pinned(LOAD_CORE, sys.executable, ROOT / "loadtests" / "mock_upstream.py", "--port", str(MOCK_PORT))
    mock = _popen(mock_argv, work / "mock.log")
    arms = [Arm(name, ARMS[name]) for name in names]
    try:
        for arm in arms:
            arm.process = arm.start(work)
            wait_until_serving(arm.url, arm.process)
        print(f"machine: {os.cpu_count()} cores; proxies on core {PROXY_CORE}, load + mock on core {LOAD_CORE}")
        rounds = []
        for number in range(args.rounds):
            rounds.append(bench_round(arms, args.duration, script, mock.pid))
            print(
                f"round {number + 1}/{args.rounds}: req/s "
                + ", ".join(f"{k} {v:,.0f}" for k, v in rounds[-1].rps.items()),
                flush=True,
            )
        print(report(rounds, names))
        levels = [1, 4, 16, 64, 256]
        plot(sweep(arms, script, levels, max(2.0, args.duration / 2)), levels, args.plot)
        print(f"latency vs concurrency: {args.plot}")
    finally:
        for process in [a.process for a in arms if a.process] + [mock]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        print(f"logs: {work}")


if __name__ == "__main__":
    main()
