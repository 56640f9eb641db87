"""The local stack: vLLM's CPU build on the tiny offline checkpoint, and the gateway in front of it.

Run by `scripts/local-stack` (which does the set-up first). It lives beside the tests' process harness, not in
the product: the gateway package never starts vLLM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from gateway.config import load_settings
from gateway.server.serve import serve
from tests.harness.processes import vllm_process

ADAPTER = "tiny-lora"
LOCAL_BANNER = """
==============================================================================================
 vlm-gateway local stack is up
   gateway : http://127.0.0.1:{gateway_port}/v1     (model "{model}"{adapter_note})
   vLLM    : http://127.0.0.1:{vllm_port}           (CPU build, log: {vllm_log})
   chat    : http://127.0.0.1:{gateway_port}/ui/chat     (in a browser: stream, attach images, stop)
   search  : http://127.0.0.1:{gateway_port}/ui
   metrics : http://127.0.0.1:{gateway_port}/metrics
   embeddings: model "clip-tiny-random" (random-weight CLIP, 64-d) at /v1/embeddings

 !! The model is a tiny RANDOM-WEIGHT Qwen2.5-VL built offline: its answers are gibberish. !!
 !! The serving path (images, streaming, limits, failover, metrics) is the real one.        !!

 Try it:
   curl -s http://127.0.0.1:{gateway_port}/v1/chat/completions -H 'content-type: application/json' \\
     -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'
   python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:{gateway_port}/v1', api_key='none'); \\
print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0])"
 Ctrl-C stops both.
==============================================================================================
"""


def run_local_stack(
    vllm_python: Path,
    model_dir: Path,
    *,
    model: str,
    gateway_port: int,
    vllm_port: int,
    log_dir: Path,
    lora_dir: Path | None = None,
) -> None:
    """vLLM's CPU build on the tiny checkpoint (and its LoRA adapter, when given), then the gateway in this
    process in front of it."""
    limits = {"image": 2, "video": 1}
    adapters = {ADAPTER: lora_dir} if lora_dir is not None else {}
    vllm = vllm_process(
        vllm_python,
        model_dir,
        served_name=model,
        port=vllm_port,
        log_path=log_dir / "vllm.log",
        limit_mm_per_prompt=limits,
        max_model_len=8192,
        lora_modules=adapters,
    )
    print(f"starting vLLM (CPU) on :{vllm_port}; this takes about a minute...", flush=True)
    started = time.monotonic()
    vllm.start()
    try:
        vllm.wait_ready(timeout=900)
        print(f"vLLM ready after {time.monotonic() - started:.0f}s", flush=True)
        pool = {
            "name": model,
            "upstreams": [f"http://127.0.0.1:{vllm_port}"],
            "limit_mm_per_prompt": limits,
            "max_model_len": 8192,
            "lora_modules": [{"name": name, "path": str(path)} for name, path in adapters.items()],
        }
        settings = load_settings(port=gateway_port, models=[pool], embeddings={"clip_model": "tiny-random"})
        # uvicorn re-raises SIGTERM once it has shut down; exiting through Python lets `finally` stop vLLM too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(
            LOCAL_BANNER.format(
                gateway_port=gateway_port,
                vllm_port=vllm_port,
                model=model,
                vllm_log=vllm.log_path,
                adapter_note=f', adapter "{ADAPTER}"' if adapters else "",
            ),
            flush=True,
        )
        serve(settings)
    finally:
        vllm.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vLLM CPU build on the tiny offline model + the gateway")
    parser.add_argument("--vllm-python", type=Path, required=True, help="python of vLLM's own virtualenv")
    parser.add_argument("--model-dir", type=Path, required=True, help="checkpoint to serve (tiny one by default)")
    parser.add_argument("--model", default="tiny-qwen-vl", help="served model name")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--vllm-port", type=int, default=8000)
    parser.add_argument("--log-dir", type=Path, default=Path(".cache/logs"))
    parser.add_argument("--lora-dir", type=Path, default=None, help=f"a LoRA adapter to serve as {ADAPTER!r}")
    args = parser.parse_args(argv)
    run_local_stack(
        args.vllm_python,
        args.model_dir,
        model=args.model,
        gateway_port=args.port,
        vllm_port=args.vllm_port,
        log_dir=args.log_dir,
        lora_dir=args.lora_dir,
    )


if __name__ == "__main__":
    main()
