"""The Batch API end to end: the OpenAI SDK, a gateway process and a real vLLM replica (CASES G5-G8).

One gateway lets the replica hold one request at a time, so the order requests are dispatched in is the order
they run in. One batch of text and image chats (one line the chat schema refuses, one image URL the media guard
refuses) runs while another key sends interactive chats — they go first —, survives `kill -9` of the gateway, and
completes with each custom_id once; a second batch is cancelled, a third expires."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.e2e.conftest import MODEL, VLLM_LIMITS
from tests.support import RunningGateway, eventually, png_data_url, run_gateway_async, write_config

CHAT = "/v1/chat/completions"
KEYS = [{"key": "sk-batch", "namespace": "team-batch"}, {"key": "sk-live", "namespace": "team-live"}]
CONCURRENCY = 6  # lines in flight: with one slot on the replica, five wait in the flex band
TOKENS = 160  # per line: each holds the one slot long enough (~0.5 s here) for all three chats to arrive
TEXT_LINES = 24


def _line(custom_id: str, content: Any, tokens: int = TOKENS, **body: Any) -> dict[str, Any]:
    request = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "ignore_eos": True,
        **body,
    }
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": request}


def _file(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


async def _submit(sdk: AsyncOpenAI, path: Path, window: str = "24h") -> str:
    upload = await sdk.files.create(file=path.open("rb"), purpose="batch")
    batch = await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window=window)  # type: ignore[arg-type]
    return batch.id


async def _completed(sdk: AsyncOpenAI, batch_id: str) -> int:
    return (await sdk.batches.retrieve(batch_id)).request_counts.completed  # type: ignore[union-attr]


async def _until(sdk: AsyncOpenAI, batch_id: str, status: str, timeout: float = 240) -> Any:
    async def reached() -> bool:
        return (await sdk.batches.retrieve(batch_id)).status == status

    assert await eventually(reached, timeout), f"{batch_id} never became {status}"
    return await sdk.batches.retrieve(batch_id)


async def _records(sdk: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in (await sdk.files.content(file_id)).content.splitlines()]


def _sdk(gateway: RunningGateway, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=120)


async def _interactive_goes_first(gateway: RunningGateway) -> None:
    """Chats of another key, sent while five lines wait, are dispatched ahead of them: counted where the order is
    decided, the flex band's dispatches (each leaves the queue through its wait histogram). Once a chat waits, at
    most one line per chat that had not yet arrived can start before the chats are done; first-come-first-served
    would start the five waiting lines first."""
    live = _sdk(gateway, "sk-live")
    await live.models.list()  # the SDK's first call sets up its client: the chats below then leave together

    def metric(name: str, band: str) -> float:
        return gateway.metric(name, {"band": band})

    async def lines_waiting() -> bool:
        return metric("gateway_queue_requests", "flex") >= CONCURRENCY - 1

    assert await eventually(lines_waiting, 120), "the batch's lines never waited in the flex band"
    chats_waited = metric("gateway_queue_wait_seconds_count", "default")

    async def chat(n: int) -> None:
        stream = await live.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"live {n}"}], max_tokens=4, stream=True
        )
        async for _ in stream:
            pass

    chats = [asyncio.create_task(chat(n)) for n in range(3)]

    async def a_chat_waits() -> bool:
        return (
            metric("gateway_queue_requests", "default") >= 1
            or metric("gateway_queue_wait_seconds_count", "default") > chats_waited
        )

    assert await eventually(a_chat_waits, 60), "no chat ever waited behind the running line"
    before = metric("gateway_queue_wait_seconds_count", "flex")
    await asyncio.gather(*chats)
    started = metric("gateway_queue_wait_seconds_count", "flex") - before
    assert started <= 2, f"{started} waiting batch lines started before the interactive chats finished"


async def _first_batch(tmp_path: Path, args: list[str], log_dir: Path) -> None:
    refused_url = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/private.png"}}
    image = {"type": "image_url", "image_url": {"url": png_data_url(448, 448)}}  # 256 visual tokens
    lines = [_line(f"text-{n}", f"Say something about {n}.") for n in range(TEXT_LINES)]
    lines += [_line(f"image-{n}", [image, {"type": "text", "text": "Describe it."}]) for n in range(2)]
    lines += [_line("bad-max-tokens", "hi", tokens=-1), _line("refused-url", [refused_url])]
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway, "sk-batch")
        batch_id = await _submit(sdk, _file(tmp_path / "first.jsonl", lines))
        await _interactive_goes_first(gateway)

        async def halfway() -> bool:
            return await _completed(sdk, batch_id) >= 8

        assert await eventually(halfway, 240)
        gateway.process.kill()  # SIGKILL: no shutdown of any kind
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway, "sk-batch")
        done = await _until(sdk, batch_id, "completed")
        output, errors = await _records(sdk, done.output_file_id), await _records(sdk, done.error_file_id)
        other = _sdk(gateway, "sk-live")
        assert (await other.batches.list()).data == [] and (await other.files.list()).data == []
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(batch_id)

    total = TEXT_LINES + 4
    counts = (done.request_counts.total, done.request_counts.completed, done.request_counts.failed)
    assert counts == (total, total - 2, 2)
    ids = Counter(r["custom_id"] for r in output + errors)
    assert set(ids.values()) == {1} and len(ids) == total, "each custom_id exactly once across the kill"
    assert all(r["response"]["status_code"] == 200 for r in output)
    usage = [r["response"]["body"]["usage"] for r in output]
    assert all(u["completion_tokens"] == TOKENS for u in usage)
    images = [u for r, u in zip(output, usage, strict=True) if r["custom_id"].startswith("image-")]
    texts = [u for r, u in zip(output, usage, strict=True) if r["custom_id"].startswith("text-")]
    assert min(u["prompt_tokens"] for u in images) > max(u["prompt_tokens"] for u in texts), "images reached vLLM"
    codes = {e["custom_id"]: (e["response"]["status_code"], e["response"]["body"]["error"]) for e in errors}
    assert codes["bad-max-tokens"][0] == 400 and codes["bad-max-tokens"][1]["param"] == "max_tokens"
    assert codes["refused-url"] == (400, codes["refused-url"][1]) and codes["refused-url"][1]["code"] == (
        "media_url_refused"
    )


async def _cancel_and_expiry(tmp_path: Path, args: list[str], log_dir: Path) -> None:
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway, "sk-batch")
        cancelled_id = await _submit(sdk, _file(tmp_path / "cancel.jsonl", [_line(f"c{n}", "hi") for n in range(30)]))

        async def started() -> bool:
            return await _completed(sdk, cancelled_id) >= 2

        assert await eventually(started, 120)
        await sdk.batches.cancel(cancelled_id)
        cancelled = await _until(sdk, cancelled_id, "cancelled")
        kept = await _records(sdk, cancelled.output_file_id)
        assert len(kept) == cancelled.request_counts.completed < 30

        lines = [_line(f"e{n}", "hi", tokens=64) for n in range(40)]
        expired_id = await _submit(sdk, _file(tmp_path / "expire.jsonl", lines), window="4s")
        expired = await _until(sdk, expired_id, "expired", timeout=60)
        output, errors = await _records(sdk, expired.output_file_id), await _records(sdk, expired.error_file_id)
        assert len(output) == expired.request_counts.completed < 40
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        assert sorted(r["custom_id"] for r in output + errors) == sorted(f"e{n}" for n in range(40))
        assert gateway.metric("gateway_queue_requests", {"band": "flex"}) == 0, "nothing of them still waits"


def test_a_batch_runs_behind_interactive_work_survives_kill_9_and_can_be_cancelled_or_expire(
    tmp_path: Path, log_dir: Path, saturable_replica: str
) -> None:
    pool = {
        "name": MODEL,
        "upstreams": [saturable_replica],
        "limit_mm_per_prompt": VLLM_LIMITS,
        "scheduling": {"initial_limit": 1, "max_limit": 1},
    }
    settings = {"keys": KEYS, "batch": {"dir": str(tmp_path / "batch"), "concurrency": CONCURRENCY}}
    args = ["--config", str(write_config(tmp_path / "batch.yaml", [pool], health_check_interval=1, **settings))]
    asyncio.run(_first_batch(tmp_path, args, log_dir))
    asyncio.run(_cancel_and_expiry(tmp_path, args, log_dir))
