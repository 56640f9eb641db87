"""The Files and Batches API through the OpenAI SDK, against a gateway process and an in-process fake replica
(CASES G5-G8). The same flow against real vLLM is tests/e2e/test_batch_vllm.py."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from tests.fake_upstream import Behaviour, FakeVllm
from tests.harness.processes import free_port, gateway_process
from tests.support import RunningGateway, eventually, metric_value, run_gateway_async, write_config

KEYS = [
    {"key": "sk-a", "namespace": "team-a"},
    {"key": "sk-b", "namespace": "team-b"},
    {"key": "sk-one-at-a-time", "namespace": "team-c", "rate_limits": {"concurrency": 1}},
]
CHAT = "/v1/chat/completions"


def _line(custom_id: str, text: str = "hi", **body: Any) -> dict[str, Any]:
    content: Any = text
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **body},
    }


def _jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(b"".join((orjson.dumps(line) if not isinstance(line, bytes) else line) + b"\n" for line in lines))
    return path


def _config(tmp_path: Path, fake: FakeVllm, **batch: Any) -> list[str]:
    models = [{"name": "m", "upstreams": [fake.url]}]
    settings = {"keys": KEYS, "batch": {"dir": str(tmp_path / "batch"), **batch}}
    return ["--config", str(write_config(tmp_path / "g.yaml", models, **settings))]


def _sdk(gateway: RunningGateway, key: str = "sk-a", retries: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=retries)


async def _submit(sdk: AsyncOpenAI, path: Path, window: str = "24h") -> Any:
    upload = await sdk.files.create(file=path.open("rb"), purpose="batch")
    return await sdk.batches.create(
        input_file_id=upload.id,
        endpoint=CHAT,
        completion_window=window,  # type: ignore[arg-type]
        metadata={"job": "test"},
    )


async def _until(sdk: AsyncOpenAI, batch_id: str, *statuses: str, timeout: float = 60) -> Any:
    found: Any = None

    async def reached() -> bool:
        nonlocal found
        found = await sdk.batches.retrieve(batch_id)
        return found.status in statuses

    assert await eventually(reached, timeout), f"batch stayed {found.status if found else None}"
    return found


async def _lines(sdk: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await sdk.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines()]


async def test_a_batch_runs_its_lines_as_the_key_and_refuses_a_bad_file_naming_the_line(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    refused_image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/private.png"}}
    good = [_line(f"req-{n}", f"question {n}") for n in range(6)]
    lines = [*good, _line("req-image", [refused_image])]  # type: ignore[arg-type]
    async with run_gateway_async(_config(tmp_path, fake_a), log_dir) as gateway:
        sdk = _sdk(gateway)
        batch = await _submit(sdk, _jsonl(tmp_path / "in.jsonl", lines))
        assert batch.status == "validating" and batch.request_counts.total == 7
        done = await _until(sdk, batch.id, "completed")
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
        assert done.metadata == {"job": "test"} and done.endpoint == CHAT

        output = await _lines(sdk, done.output_file_id)
        assert sorted(r["custom_id"] for r in output) == sorted(f"req-{n}" for n in range(6))
        assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in output)
        assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == "ok"
        errors = await _lines(sdk, done.error_file_id)
        assert [e["custom_id"] for e in errors] == ["req-image"]
        assert errors[0]["response"]["status_code"] == 400
        assert errors[0]["response"]["body"]["error"]["code"] == "media_url_refused"  # the online guard's verdict
        # Every line reached the replica as a flex-band request; the refused image never left the gateway.
        assert fake_a.hits == 6
        assert all(orjson.loads(b)["service_tier"] == "flex" for b in fake_a.bodies)
        exposition = gateway.metrics()
        assert metric_value(exposition, "gateway_batch_lines_total", {"outcome": "completed"}) == 6
        assert metric_value(exposition, "gateway_batches", {"status": "completed"}) == 1

        listed = await sdk.batches.list(limit=5)
        assert [b.id for b in listed.data] == [batch.id]
        files = await sdk.files.list()
        assert {f.purpose for f in files.data} == {"batch", "batch_output"}

        # G5: a file create refuses whole, naming the line.
        bad_files: dict[str, tuple[list[Any], str]] = {
            "not JSON": ([_line("a"), b"{not json"], "Line 2"),
            "duplicate": ([_line("a"), _line("b"), _line("a")], "also on line 1"),
            "two endpoints": ([_line("a"), {**_line("b"), "url": "/v1/embeddings"}], "Line 2"),
            "two models": ([_line("a"), {**_line("b"), "body": {**_line("b")["body"], "model": "m2"}}], "differs"),
            "unknown model": ([{**_line("a"), "body": {"model": "nope", "messages": []}}], "not served"),
            "streaming": ([_line("a", stream=True)], "streaming"),
            "no custom_id": ([{"method": "POST", "url": CHAT, "body": {"model": "m"}}], "custom_id"),
        }
        for name, (content, named) in bad_files.items():
            upload = await sdk.files.create(file=_jsonl(tmp_path / "bad.jsonl", content).open("rb"), purpose="batch")
            with pytest.raises(openai.BadRequestError) as refused:
                await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
            assert named in refused.value.message, (name, refused.value.message)
            assert refused.value.body["param"] == "input_file_id"  # type: ignore[index]

        # G7: another namespace's ids answer exactly as ids that do not exist.
        other = _sdk(gateway, "sk-b")
        missing_file, missing_batch = "file-" + "0" * 24, "batch_" + "0" * 24
        for call in (
            lambda sdk, f, b: sdk.files.retrieve(f),
            lambda sdk, f, b: sdk.files.content(f),
            lambda sdk, f, b: sdk.files.delete(f),
            lambda sdk, f, b: sdk.batches.retrieve(b),
            lambda sdk, f, b: sdk.batches.cancel(b),
        ):
            with pytest.raises(openai.NotFoundError) as theirs:
                await call(other, done.output_file_id, batch.id)
            with pytest.raises(openai.NotFoundError) as nobodys:
                await call(other, missing_file, missing_batch)
            assert theirs.value.body["code"] == nobodys.value.body["code"] == "not_found"  # type: ignore[index]
        assert (await other.batches.list()).data == [] and (await other.files.list()).data == []

        # A deleted file's bytes are gone from disk, and its id is then a 404.
        stored = tmp_path / "batch" / "files" / done.output_file_id
        assert stored.is_file()
        assert (await sdk.files.delete(done.output_file_id)).deleted
        assert not stored.exists()
        with pytest.raises(openai.NotFoundError):
            await sdk.files.retrieve(done.output_file_id)


async def test_a_key_budget_slows_a_batch_down_without_failing_lines(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(whole_delay=0.2)
    async with run_gateway_async(_config(tmp_path, fake_a, concurrency=4), log_dir) as gateway:
        sdk = _sdk(gateway, "sk-one-at-a-time", retries=20)  # its own calls share the key's one slot too
        batch = await _submit(sdk, _jsonl(tmp_path / "in.jsonl", [_line(f"r{n}") for n in range(6)]))
        done = await _until(sdk, batch.id, "completed")
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 0)
        assert gateway.metric("gateway_batch_line_retries_total") > 0, "lines beyond the key's concurrency waited"


async def test_cancel_stops_dispatch_and_keeps_what_finished(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    fake_a.behaviour = Behaviour(whole_delay=0.3)
    async with run_gateway_async(_config(tmp_path, fake_a, concurrency=2), log_dir) as gateway:
        sdk = _sdk(gateway)
        batch = await _submit(sdk, _jsonl(tmp_path / "in.jsonl", [_line(f"r{n}") for n in range(40)]))

        async def some_done() -> bool:
            return (await sdk.batches.retrieve(batch.id)).request_counts.completed >= 3

        assert await eventually(some_done, 30)
        cancelling = await sdk.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = await _until(sdk, batch.id, "cancelled")
        output = await _lines(sdk, done.output_file_id)
        assert len(output) == done.request_counts.completed < 40
        assert len({r["custom_id"] for r in output}) == len(output)
        sent = fake_a.hits
        assert sent <= done.request_counts.completed + 2, "at most the lines in flight were abandoned"
        finished = await _submit(sdk, _jsonl(tmp_path / "one.jsonl", [_line("x")]))
        await _until(sdk, finished.id, "completed")
        with pytest.raises(openai.BadRequestError):
            await sdk.batches.cancel(finished.id)  # too late: it is completed
        assert fake_a.hits == sent + 1, "nothing more of the cancelled batch was sent"


async def test_expiry_reports_the_finished_lines_and_the_rest_as_expired(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(whole_delay=0.5)
    async with run_gateway_async(_config(tmp_path, fake_a, concurrency=2), log_dir) as gateway:
        sdk = _sdk(gateway)
        batch = await _submit(sdk, _jsonl(tmp_path / "in.jsonl", [_line(f"r{n}") for n in range(30)]), window="3s")
        done = await _until(sdk, batch.id, "expired", timeout=30)
        counts = done.request_counts
        assert counts.total == 30 and counts.completed + counts.failed == 30 and 0 < counts.completed < 30
        output, errors = await _lines(sdk, done.output_file_id), await _lines(sdk, done.error_file_id)
        assert len(output) == counts.completed
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        assert sorted(r["custom_id"] for r in output + errors) == sorted(f"r{n}" for n in range(30))
        assert gateway.metric("gateway_batch_lines_total", {"outcome": "expired"}) == len(errors)


async def test_kill_9_mid_batch_then_restart_completes_with_each_custom_id_once(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    fake_a.behaviour = Behaviour(whole_delay=0.1)
    args = _config(tmp_path, fake_a, concurrency=4)
    lines = [_line(f"r{n}") for n in range(60)]
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway)
        batch = await _submit(sdk, _jsonl(tmp_path / "in.jsonl", lines))

        async def some_done() -> bool:
            return (await sdk.batches.retrieve(batch.id)).request_counts.completed >= 10

        assert await eventually(some_done, 30)
        gateway.process.kill()
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway)
        done = await _until(sdk, batch.id, "completed")
        output = await _lines(sdk, done.output_file_id)
    ids = Counter(r["custom_id"] for r in output)
    assert set(ids) == {f"r{n}" for n in range(60)} and set(ids.values()) == {1}
    assert done.request_counts.completed == 60 and done.request_counts.failed == 0
    assert 60 <= fake_a.hits <= 64, "only the lines in flight at the kill ran twice"


async def test_files_and_batches_bounds(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    args = _config(tmp_path, fake_a, max_file_bytes=4096, max_lines=3, max_stored_bytes_per_key=4500)
    async with run_gateway_async(args, log_dir) as gateway:
        sdk = _sdk(gateway)
        too_many = _jsonl(tmp_path / "four.jsonl", [_line(f"r{n}") for n in range(4)])
        upload = await sdk.files.create(file=too_many.open("rb"), purpose="batch")
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
        assert "Line 4" in refused.value.message and "at most 3" in refused.value.message
        with pytest.raises(openai.BadRequestError) as window:
            await sdk.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="25h")  # type: ignore[arg-type]
        assert window.value.body["param"] == "completion_window"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as large:
            await sdk.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
        assert large.value.status_code == 413
        with pytest.raises(openai.BadRequestError) as purpose:
            await sdk.files.create(file=too_many.open("rb"), purpose="fine-tune")
        assert purpose.value.body["param"] == "purpose"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as quota:
            await sdk.files.create(file=("more.jsonl", b"x" * 4000), purpose="batch")
        assert quota.value.body["code"] == "storage_limit_exceeded"  # type: ignore[index]
        async with httpx.AsyncClient(base_url=gateway.base_url) as http:
            keyless = await http.get("/v1/files")
            assert keyless.status_code == 401
            odd = await http.get("/v1/batches/not-a-batch-id", headers={"Authorization": "Bearer sk-a"})
            assert odd.status_code == 404


async def test_the_cli_submits_waits_and_downloads_the_output(tmp_path: Path, log_dir: Path, fake_a: FakeVllm) -> None:
    source = _jsonl(tmp_path / "jobs.jsonl", [_line(f"r{n}") for n in range(3)])
    async with run_gateway_async(_config(tmp_path, fake_a), log_dir) as gateway:
        cli = [sys.executable, "-m", "gateway.cli", "batch", "submit", str(source), "--url", gateway.base_url]
        process = await asyncio.create_subprocess_exec(
            *cli, "--api-key", "sk-a", "--wait", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        output = tmp_path / "jobs.output.jsonl"
        assert f"output: {output}" in out.decode() and "completed (3 completed, 0 failed)" in out.decode()
        assert sorted(orjson.loads(line)["custom_id"] for line in output.read_bytes().splitlines()) == [
            "r0",
            "r1",
            "r2",
        ]
        refused = await asyncio.create_subprocess_exec(
            *cli, "--api-key", "sk-a", "--endpoint", "/v1/embeddings", stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(refused.communicate(), 60)
        assert refused.returncode == 2 and "Line 1 of the input file" in err.decode()


async def test_in_the_chart_topology_lines_go_through_the_proxy_tier_as_their_owner(
    tmp_path: Path, log_dir: Path, fake_a: FakeVllm
) -> None:
    """The state tier (role retrieval) keeps the batch and sends its lines to the proxy tier, whose scheduler
    orders them with everyone's work; the proxy forwards /v1/files and /v1/batches to the state tier. All three
    endpoints a batch may name run: chat and responses on the replica, embeddings on the state tier's encoder."""
    proxy_port, state_port = free_port(), free_port()
    secret = "one-secret-for-both-tiers"
    state = write_config(
        tmp_path / "state.yaml",
        [],
        role="retrieval",
        keys=KEYS,
        embeddings={"clip_model": "tiny-random", "device": "cpu"},
        search={"index_dir": str(tmp_path / "index")},
        batch={"dir": str(tmp_path / "batch"), "dispatch_url": f"http://127.0.0.1:{proxy_port}", "secret": secret},
    )
    proxy = write_config(
        tmp_path / "proxy.yaml",
        [{"name": "m", "upstreams": [fake_a.url]}],
        role="proxy",
        retrieval_url=f"http://127.0.0.1:{state_port}",
        keys=KEYS,
        batch={"secret": secret},
    )
    tiers = [
        gateway_process(["--config", str(config)], port=port, log_path=log_dir / f"tier-{port}.log")
        for config, port in ((state, state_port), (proxy, proxy_port))
    ]
    try:
        for tier in tiers:
            tier.start()
            await asyncio.to_thread(tier.wait_ready, 60)
        gateway = RunningGateway(tiers[1], proxy_port)
        sdk = _sdk(gateway)
        embedding = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings"}
        jobs = {
            CHAT: [_line(f"c{n}") for n in range(3)],
            "/v1/responses": [
                {"custom_id": f"r{n}", "method": "POST", "url": "/v1/responses", "body": {"model": "m", "input": "hi"}}
                for n in range(2)
            ],
            "/v1/embeddings": [{**embedding, "body": {"model": "clip-tiny-random", "input": ["a cat", "a dog"]}}],
        }
        for endpoint, lines in jobs.items():
            upload = await sdk.files.create(file=_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
            created = await sdk.batches.create(
                input_file_id=upload.id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window="24h",
            )
            done = await _until(sdk, created.id, "completed")
            output = await _lines(sdk, done.output_file_id)
            assert [r["response"]["status_code"] for r in output] == [200] * len(lines), (endpoint, output)
        assert len(output[0]["response"]["body"]["data"]) == 2, "both inputs embedded"
        assert fake_a.hits == 5
        proxy_metrics = gateway.metrics()
        assert metric_value(proxy_metrics, "gateway_tenant_tokens_total", {"tenant": "team-a"}) > 0, "as the owner"
        assert (await _sdk(gateway, "sk-b").batches.list()).data == []
    finally:
        for tier in tiers:
            tier.stop(grace=10)
