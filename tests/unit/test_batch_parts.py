"""The batch parts on their own: input checks (CASES G5), the delegated line credential (G8), the store's
exactly-once results (G6) and the file storage's sweep (G7)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from gateway.access.delegation import Delegation
from gateway.access.keys import Identity, KeyChecker
from gateway.batch.executor import BatchExecutor
from gateway.batch.files import FileStorage
from gateway.batch.lines import check_input, read_lines
from gateway.batch.protocol import ListPage, derived_file_ids, new_batch_id, new_file_id, window_seconds
from gateway.batch.service import BatchService, models_check
from gateway.batch.store import BatchStore
from gateway.config import BatchSettings, load_settings
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.metrics import GatewayMetrics

CHAT = "/v1/chat/completions"


def _line(custom_id: str, model: str = "m", **extra: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


def _check(tmp_path: Path, content: bytes, **limits: Any) -> Any:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    allowed = lambda endpoint, model: None if model == "m" else f"model {model!r} is not served here."  # noqa: E731
    options = {"max_lines": 100, "max_line_bytes": 1000, **limits}
    return check_input(path, CHAT, model_check=allowed, **options)


def test_a_valid_file_is_counted_and_blank_lines_and_crlf_are_fine(tmp_path: Path) -> None:
    summary = _check(tmp_path, _line("a") + b"\r\n\n" + _line("b") + b"\n\n")
    assert (summary.lines, summary.model) == (2, "m")


def test_a_batch_may_name_what_the_online_path_serves_its_caller() -> None:
    """A pool's model and a runtime adapter loaded by the caller's namespace, as the online path decides; another
    namespace's adapter is not served to it (an operator key sees every namespace's)."""
    adapters = {"mine": "team-a"}  # runtime adapter -> the namespace that loaded it

    def served(model: str, sees: str | None) -> bool:
        owner = adapters.get(model)
        return model == "m" or (owner is not None and sees in (None, owner))

    check = models_check(served, "clip")
    team_a = Identity("a", frozenset({"read"}), "team-a")
    team_b = Identity("b", frozenset({"read"}), "team-b")
    operator = Identity("o", frozenset({"read", "operator"}), "ops")
    assert check(team_a)(CHAT, "m") is None and check(team_a)(CHAT, "mine") is None
    assert check(team_b)(CHAT, "mine") == "model 'mine' is not served here."
    assert check(operator)(CHAT, "mine") is None
    assert check(team_b)("/v1/embeddings", "clip") is None
    assert check(team_b)("/v1/embeddings", "m") == "model 'm' is not served on /v1/embeddings."
    assert models_check(None, None)(team_b)(CHAT, "anything") is None, "a tier without pools: the receiver checks"


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (_line("a") + b"\n[1, 2]\n", "Line 2 of the input file: not a JSON object"),
        (_line("a") + b"\n" + _line("a"), "Line 2 of the input file: custom_id 'a' is also on line 1"),
        (_line("a", model="other"), "Line 1 of the input file: model 'other' is not served"),
        (_line("a") + b"\n" + _line("b", model="m2"), "Line 2 of the input file: model 'm2' differs"),
        (_line("a", stream=True), "Line 1 of the input file: streaming"),
        (_line("x" * 600), "Line 1 of the input file: custom_id must be"),
        (_line("a") + b"\n" + _line("b", padding="y" * 2000) + b"\n" + _line("c"), "Line 2 of the input file: longer"),
        (b"\n\n", "holds no requests"),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}', "method must be POST"),
    ],
)
def test_a_bad_file_is_refused_naming_its_line(tmp_path: Path, content: bytes, named: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        _check(tmp_path, content)
    assert named in refused.value.message
    assert refused.value.param == "input_file_id"


def test_the_line_limit_names_the_first_line_beyond_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"Line 4 .* at most 3"):
        _check(tmp_path, b"\n".join(_line(str(n)) for n in range(5)), max_lines=3)


def test_reading_back_skips_done_lines_and_a_long_line_is_never_held_whole(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(_line(str(n)) for n in range(5)))
    assert [line.custom_id for line in read_lines(path, CHAT, 1000, {2, 4})] == ["0", "2", "4"]
    path.write_bytes(_line("a") + b"\n" + b"z" * 50_000 + b"\n" + _line("b"))
    with pytest.raises(InvalidRequest, match=r"Line 2 .* longer than 1000"):
        list(read_lines(path, CHAT, 1000, set()))


def test_windows_and_ids() -> None:
    assert window_seconds("24h") == 86400 and window_seconds("90s") == 90 and window_seconds("30m") == 1800
    assert window_seconds("25h") is None and window_seconds("0s") is None and window_seconds("1d") is None
    batch = new_batch_id()
    assert batch != new_batch_id() and len(new_file_id()) == 29
    output, errors = derived_file_ids(batch)
    assert output.endswith("o") and errors.endswith("e") and output[5:-1] == batch[6:]


def test_a_delegated_credential_is_the_owner_in_the_flex_band_until_it_expires_or_the_key_goes() -> None:
    delegation = Delegation(b"s" * 32)
    settings = load_settings(keys=[{"key": "sk-owner", "namespace": "team", "max_service_tier": "priority"}])
    checker = KeyChecker(settings, delegation)
    owner = checker.identify(b"Bearer sk-owner")
    assert owner is not None and owner.batch is None and len(owner.key_digest) == 64

    token = delegation.mint(owner.key_digest, "batch_1")
    line = checker.identify(f"Bearer {token}".encode())
    assert line is not None
    assert (line.namespace, line.key_id, line.scopes) == (owner.namespace, owner.key_id, owner.scopes)
    assert (line.service_tier, line.max_service_tier, line.batch) == ("flex", "flex", "batch_1")

    expired = delegation.mint(owner.key_digest, "batch_1", now=0)
    forged = Delegation(b"t" * 32).mint(owner.key_digest, "batch_1")
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for refused in (expired, forged, tampered, "gw-batch.", "gw-batch.e30.x"):
        assert checker.identify(f"Bearer {refused}".encode()) is None, refused
    assert KeyChecker(settings).identify(f"Bearer {token}".encode()) is None, "no secret here: no delegation"
    revoked = KeyChecker(load_settings(keys=[{"key": "sk-other"}]), delegation)
    assert revoked.identify(f"Bearer {token}".encode()) is None, "a revoked owner's lines are refused"


async def test_the_store_keeps_one_result_per_line_and_moves_only_from_the_statuses_named(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "b.sqlite3")
    await store.open()
    batch = {
        "id": new_batch_id(),
        "namespace": "team",
        "owner": "digest",
        "endpoint": CHAT,
        "model": "m",
        "input_file_id": new_file_id(),
        "completion_window": "24h",
        "status": "in_progress",
        "created_at": 1,
        "expires_at": 2,
        "total": 3,
    }
    await store.add_batch(batch)
    assert await store.record(batch["id"], 1, True, b"one\n")
    assert not await store.record(batch["id"], 1, True, b"again\n"), "a line's result is recorded once"
    assert await store.record(batch["id"], 2, False, b"two\n")
    assert await store.done_lines(batch["id"]) == {1, 2}
    assert not await store.move(batch["id"], "cancelling", only_from=("validating",))
    assert await store.move(batch["id"], "cancelling", when="cancelling_at", only_from=("in_progress",))

    storage = FileStorage(tmp_path)
    output_id, _ = derived_file_ids(batch["id"])

    def write(results: Any) -> dict[str, Any]:
        rows = list(results)
        file = {"namespace": "team", "owner": "digest", "purpose": "batch_output", "created_at": 3}
        size = storage.write_lines(output_id, [r[2] for r in rows if r[1]])
        return {"output": {**file, "id": output_id, "filename": "o", "bytes": size}, "unfinished": 0}

    final = await store.finish(batch["id"], "cancelled", "cancelled_at", write)
    assert (final["status"], final["completed"], final["failed"], final["output_file_id"]) == (
        "cancelled",
        1,
        1,
        output_id,
    )
    assert final["error_file_id"] is None and await store.done_lines(batch["id"]) == set()
    assert storage.path(output_id).read_bytes() == b"one\n"
    assert not await store.move(batch["id"], "in_progress"), "a final batch never moves again"
    await store.close()


def test_the_sweep_removes_bytes_no_file_names(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    kept, orphan = new_file_id(), new_file_id()
    storage.store(io.BytesIO(b"kept"), kept)
    storage.store(io.BytesIO(b"orphan"), orphan)
    (storage.root / f"{new_file_id()}.part").write_bytes(b"half")
    assert storage.sweep({kept}) == 2
    assert [p.name for p in storage.root.iterdir()] == [kept]
    with pytest.raises(ValueError):
        storage.path("../../etc/passwd")


async def test_a_second_gateway_on_the_same_batch_dir_serves_no_batches(tmp_path: Path) -> None:
    """Two executors on one directory would run every line twice: the second process (here, a second service)
    finds the directory held and answers 503 instead."""
    settings = BatchSettings(dir=tmp_path)

    def service() -> BatchService:
        store, storage = BatchStore(tmp_path / "batches.sqlite3"), FileStorage(tmp_path)
        executor = BatchExecutor(
            store, storage, settings, cast(Any, None), "http://127.0.0.1:1", Delegation(b"s"), GatewayMetrics(), 1024
        )
        return BatchService(settings, store, storage, executor, lambda caller: lambda endpoint, model: None, 1024)

    owner = KeyChecker(load_settings(keys=[{"key": "sk-a"}])).identify(b"Bearer sk-a")
    assert owner is not None
    first, second = service(), service()
    await first.start()
    await second.start()
    assert (await first.batches(owner, ListPage(10, None)))["data"] == []
    with pytest.raises(ServiceUnavailable):
        await second.batches(owner, ListPage(10, None))
    await second.stop()
    await first.stop()


async def test_a_batch_dir_that_cannot_be_written_leaves_the_gateway_up_without_batches(tmp_path: Path) -> None:
    """A read-only root file system (the image run with --read-only) must not stop the gateway from starting."""
    (tmp_path / "a-file").write_bytes(b"")
    settings = BatchSettings(dir=tmp_path / "a-file" / "batch")
    store, storage = BatchStore(settings.dir / "batches.sqlite3"), FileStorage(settings.dir)
    executor = BatchExecutor(
        store, storage, settings, cast(Any, None), "http://127.0.0.1:1", Delegation(b"s"), GatewayMetrics(), 1024
    )
    service = BatchService(settings, store, storage, executor, lambda caller: lambda endpoint, model: None, 1024)
    await service.start()
    owner = KeyChecker(load_settings(keys=[{"key": "sk-a"}])).identify(b"Bearer sk-a")
    assert owner is not None
    with pytest.raises(ServiceUnavailable, match=r"cannot write its batch\.dir"):
        await service.batches(owner, ListPage(10, None))
    await service.stop()
