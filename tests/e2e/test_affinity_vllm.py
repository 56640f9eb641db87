"""Cache-affinity routing against two real vLLM CPU replicas, read through each replica's own counters."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.e2e.conftest import MODEL, Replica, gateway_args, wait_for
from tests.e2e.test_chat_vllm import client
from tests.support import RunningGateway, metric_value, run_gateway

WORDS = "Describe this photo in detail."  # the same words in every conversation, as real clients send


def _photo(seed: int) -> str:
    image = Image.new("RGB", (112, 112), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    image.putpixel((seed % 112, seed // 112 % 112), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _served(replica: Replica) -> float:
    return metric_value(replica.metrics(), "vllm:request_success_total")


def _turn(gateway: RunningGateway, history: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    reply = client(gateway).chat.completions.create(
        model=MODEL,
        messages=history,
        max_tokens=4,
        extra_body={"ignore_eos": True, **extra},  # type: ignore[arg-type]
    )
    text = reply.choices[0].message.content or "..."
    return [*history, {"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]


def _opening(seed: int) -> list[dict[str, Any]]:
    image = {"type": "image_url", "image_url": {"url": _photo(seed)}}
    return [
        {"role": "system", "content": "You describe photos."},
        {"role": "user", "content": [{"type": "text", "text": WORDS}, image]},
    ]


def _which(replicas: list[Replica], before: list[float]) -> Replica:
    """The one replica whose served count went up by one since `before`."""
    found: list[Replica] = []

    def one_more() -> bool:
        deltas = [_served(r) - b for r, b in zip(replicas, before, strict=True)]
        found[:] = [r for r, d in zip(replicas, deltas, strict=True) if d == 1]
        return sorted(deltas) == [0.0] * (len(replicas) - 1) + [1.0]

    assert wait_for(one_more, timeout=10)
    return found[0]


def _conversation(gateways: list[RunningGateway], replicas: list[Replica], seed: int, turns: int) -> list[str]:
    """Runs one conversation, turn by turn (through the gateways in rotation); the replica of each turn."""
    history, landed = _opening(seed), []
    for turn in range(turns):
        before = [_served(r) for r in replicas]
        history = _turn(gateways[turn % len(gateways)], history)
        landed.append(_which(replicas, before).url)
    return landed


@pytest.fixture
def affine(tmp_path: Path, log_dir: Path, live_replicas: list[Replica]) -> Iterator[RunningGateway]:
    with run_gateway(gateway_args(tmp_path, live_replicas), log_dir) as running:
        yield running


def test_each_conversation_stays_on_one_replica_and_images_spread_them(
    affine: RunningGateway, live_replicas: list[Replica]
) -> None:
    """Twelve conversations with the same words and their own photos: every turn of one lands where its first
    did (its cached image and prefix), while the conversations spread over both replicas."""
    homes = []
    for seed in range(12):
        landed = _conversation([affine], live_replicas, seed, turns=3)
        assert len(set(landed)) == 1, f"conversation {seed} moved: {landed}"
        homes.append(landed[0])
    assert set(homes) == {r.url for r in live_replicas}, "same words, different images: they map apart"
    assert affine.metric("gateway_routing_decisions_total", {"outcome": "affine"}) == 36


def test_two_gateways_send_a_conversation_to_the_same_replica(
    tmp_path: Path, log_dir: Path, live_replicas: list[Replica]
) -> None:
    args = gateway_args(tmp_path, live_replicas)
    with run_gateway(args, log_dir) as first, run_gateway(args, log_dir) as second:
        for seed in range(100, 106):
            landed = _conversation([first, second], live_replicas, seed, turns=4)
            assert len(set(landed)) == 1, f"the gateways disagree on conversation {seed}: {landed}"


def test_a_hot_conversation_spills_instead_of_piling_on_its_replica(
    affine: RunningGateway, live_replicas: list[Replica]
) -> None:
    before = [_served(r) for r in live_replicas]
    history = _opening(7)

    def call(_: int) -> None:
        client(affine).chat.completions.create(
            model=MODEL,
            messages=history,  # type: ignore[arg-type]
            max_tokens=400,
            extra_body={"ignore_eos": True, "prompt_cache_key": "one-hot-conversation"},
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(call, range(8)))
    assert wait_for(lambda: sum(_served(r) for r in live_replicas) - sum(before) == 8, timeout=10)
    deltas = [_served(r) - b for r, b in zip(live_replicas, before, strict=True)]
    assert min(deltas) >= 2, f"bounded load: both replicas took part of the hot key ({deltas})"
    assert affine.metric("gateway_routing_decisions_total", {"outcome": "spilled"}) >= 2


def test_a_conversation_follows_its_replica_out_and_back(affine: RunningGateway, live_replicas: list[Replica]) -> None:
    """kill -9 the conversation's replica: the next turn moves to the other; once it is back, it returns."""
    history = _opening(42)
    before = [_served(r) for r in live_replicas]
    history = _turn(affine, history)
    home = _which(live_replicas, before)
    other = next(r for r in live_replicas if r is not home)
    home.process.kill()
    before_other = _served(other)
    history = _turn(affine, history)
    assert wait_for(lambda: _served(other) - before_other == 1, timeout=10), "moved to the survivor"
    assert affine.metric("gateway_routing_decisions_total", {"outcome": "moved"}) >= 1 or (
        affine.metric("gateway_upstream_retries_total") >= 1
    ), "routed past the dead replica, or failed over from it before the first byte"
    home.ensure_running()
    healthy = {"model": MODEL, "replica": home.url}
    assert wait_for(lambda: affine.metric("gateway_replica_healthy", healthy) == 1, timeout=30)
    before = [_served(r) for r in live_replicas]
    _turn(affine, history)
    assert _which(live_replicas, before) is home, "back home once the replica is healthy again"
