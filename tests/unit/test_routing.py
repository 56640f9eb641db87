"""Cache-affinity routing: the key, the rendezvous order, bounded load, and the outcomes it reports."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.chat.checks import media_parts
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.serving import routing_key
from gateway.config import ModelPool
from gateway.media.images import PreparedMedia
from gateway.metrics import GatewayMetrics
from gateway.upstream.pool import ReplicaSet
from gateway.upstream.routing import Outcome, affinity_key, rendezvous_order


class _Member:
    def __init__(self, url: str) -> None:
        self.base_url = url
        self.outstanding = 0


def _chat(*messages: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": list(messages)})


def _key(request: ChatCompletionRequest, hashes: list[str], namespace: str = "ns", session: str | None = None) -> bytes:
    media = media_parts(request)
    prepared = [PreparedMedia(f"data:{h}", h, 1, 1, 1, 1) for h in hashes]
    return routing_key(request, namespace, session, media, prepared)


IMAGE = {"type": "image_url", "image_url": {"url": "https://img.example/a.jpg"}}
SYSTEM = {"role": "system", "content": "You describe photos."}


def _first_turn() -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}


def test_later_turns_keep_the_first_turns_key() -> None:
    first = _chat(SYSTEM, _first_turn())
    third = _chat(
        SYSTEM,
        _first_turn(),
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And its colour?"},
    )
    assert _key(first, ["h1"]) == _key(third, ["h1"])


def test_same_words_with_different_images_key_apart_and_same_image_keys_alike() -> None:
    request = _chat(SYSTEM, _first_turn())
    assert _key(request, ["h1"]) != _key(request, ["h2"])
    as_data_url = _chat(
        SYSTEM,
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {**IMAGE, "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    )
    assert _key(request, ["h1"]) == _key(as_data_url, ["h1"]), "the content hash, not the URL, names the image"


def test_keys_are_salted_by_namespace_and_explicit_keys_win() -> None:
    request = _chat(SYSTEM, _first_turn())
    assert _key(request, ["h1"], "team-a") != _key(request, ["h1"], "team-b")
    assert _key(request, ["h1"], session="s-1") == _key(_chat({"role": "user", "content": "x"}), [], session="s-1")
    assert _key(request, ["h1"], "team-a", "s-1") != _key(request, ["h1"], "team-b", "s-1")
    explicit = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "y"}], "prompt_cache_key": "conv-9"}
    )
    assert _key(explicit, [], session="s-1") == affinity_key("ns", "conv-9", [], [])


def test_membership_changes_move_only_the_keys_that_must_move() -> None:
    members = [_Member(f"http://10.0.0.{i}:8000") for i in range(4)]
    keys = [os.urandom(16) for _ in range(8000)]
    before = {k: rendezvous_order(k, members)[0].base_url for k in keys}
    joined = [*members, _Member("http://10.0.0.9:8000")]
    after_join = {k: rendezvous_order(k, joined)[0].base_url for k in keys}
    moved = [k for k in keys if before[k] != after_join[k]]
    assert 0.15 < len(moved) / len(keys) < 0.25, "about 1/5 of keys move to the newcomer"
    assert all(after_join[k] == "http://10.0.0.9:8000" for k in moved), "and only to it"
    left = members[1:]
    after_leave = {k: rendezvous_order(k, left)[0].base_url for k in keys}
    assert all(after_leave[k] == before[k] for k in keys if before[k] != members[0].base_url)
    spread = {url: list(before.values()).count(url) / len(keys) for url in set(before.values())}
    assert all(0.2 < share < 0.3 for share in spread.values()), spread


@given(st.binary(min_size=1, max_size=64))
@settings(max_examples=200)
def test_the_order_is_a_pure_function_of_key_and_members(key: bytes) -> None:
    members = [_Member(f"http://r{i}") for i in range(5)]
    shuffled = members[::-1]
    assert [m.base_url for m in rendezvous_order(key, members)] == [m.base_url for m in rendezvous_order(key, shuffled)]


def _pool(n: int, **fields: Any) -> ReplicaSet:
    return ReplicaSet(ModelPool(name="m", upstreams=[f"http://r{i}" for i in range(n)], **fields), GatewayMetrics())


def test_a_hot_key_spills_past_the_load_bound_deterministically() -> None:
    replicas = _pool(2)
    key = b"hot conversation"
    own, other = rendezvous_order(key, replicas.replicas)
    outcomes = []
    for _ in range(8):
        chosen, outcome = replicas.pick(set(), key)
        assert chosen is not None
        replicas.acquire(chosen)
        outcomes.append(outcome)
    assert outcomes[0] is Outcome.AFFINE and Outcome.SPILLED in outcomes
    assert own.outstanding <= 5 and other.outstanding >= 3, "bounded: ceil(1.25 x mean) at each placement"


def test_a_down_replica_moves_its_keys_and_gets_them_back() -> None:
    replicas = _pool(3)
    key = b"conversation 7"
    own = rendezvous_order(key, replicas.replicas)[0]
    assert replicas.pick(set(), key) == (own, Outcome.AFFINE)
    replicas.mark_down(own)
    moved, outcome = replicas.pick(set(), key)
    assert moved is not own and outcome is Outcome.MOVED
    assert replicas.pick(set(), key)[0] is moved, "it moves to one place, not around"
    replicas.mark_up(own)
    assert replicas.pick(set(), key) == (own, Outcome.AFFINE)
    assert replicas.pick({own}, key)[0] is moved, "failover goes to the key's next replica"


def test_least_outstanding_pools_ignore_the_key() -> None:
    replicas = _pool(2, routing="least_outstanding")
    a, b = replicas.replicas
    replicas.acquire(a)
    assert replicas.pick(set(), b"any") == (b, None)


async def test_grants_of_one_dispatch_count_against_the_load_bound() -> None:
    """The scheduler grants a burst before any request holds its lease: the bound counts grants too."""
    from gateway.scheduling.bands import Band
    from gateway.scheduling.scheduler import Ticket

    replicas = _pool(2)
    key = b"hot conversation"
    own, other = rendezvous_order(key, replicas.replicas)
    place = lambda room: replicas.pick(set(), key, room)[0]  # noqa: E731
    grants = [await replicas.scheduler.acquire(Ticket("t", 1.0, Band.DEFAULT, 1.0, 1, place)) for _ in range(8)]
    assert own.granted <= 5 and other.granted >= 3, "bounded at each grant, as at each lease"
    for grant in grants:
        grant.release()
    assert own.granted == other.granted == 0
