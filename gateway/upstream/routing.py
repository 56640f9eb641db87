"""Which replica a request goes to: cache affinity with bounded load, or least outstanding requests.

vLLM's prefix cache and its multimodal caches are per replica, so the turns of one conversation should land
where the earlier turns did. The affinity key names the conversation (see `affinity_key`); the replica for a key
is a pure function of the key and the pool's members (rendezvous hashing), so every gateway replica picks the
same vLLM replica with no shared state, and a member joining or leaving moves only the keys it must. Load is
bounded: a replica that would hold more than ceil((1 + epsilon) x the pool's mean outstanding) is passed over for
the next one in the key's order, as are down, cooling and breaker-open replicas.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

# Of a conversation's leading text, this many characters (after its media hashes) name it: vLLM's prefix cache
# matches prefixes, so a longer tail would not make two conversations share more cache.
KEY_TEXT_CHARS = 4096


class Outcome(enum.Enum):
    AFFINE = "affine"  # the key's own replica
    SPILLED = "spilled"  # its own replica was over the load bound
    MOVED = "moved"  # its own replica was down, cooling or breaker-open


class Member(Protocol):
    base_url: str
    outstanding: int


def affinity_key(namespace: str, explicit: str | None, leading_texts: Iterable[str], media: Sequence[str]) -> bytes:
    """The conversation's key, salted by namespace: a client's `prompt_cache_key` or session header if given,
    else the leading part of the conversation — its media content hashes and the start of its text."""
    digest = hashlib.blake2b(digest_size=16, person=b"vlm-affinity")
    digest.update(namespace.encode() + b"\0")
    if explicit is not None:
        digest.update(b"explicit\0" + explicit.encode())
        return digest.digest()
    for content_hash in media:
        digest.update(b"media\0" + content_hash.encode())
    budget = KEY_TEXT_CHARS
    for text in leading_texts:
        if budget <= 0:
            break
        part = text[:budget]
        budget -= len(part)
        digest.update(b"text\0" + part.encode("utf-8", "surrogatepass"))
    return digest.digest()


def _score(key: bytes, member: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + member.encode(), digest_size=8).digest(), "big")


M = TypeVar("M", bound=Member)


def rendezvous_order(key: bytes, members: Sequence[M]) -> list[M]:
    """The members in the key's order of preference (highest random weight first)."""
    return sorted(members, key=lambda member: _score(key, member.base_url), reverse=True)


def load_bound(loads: Sequence[int], epsilon: float) -> int:
    """The most requests a member may hold, counting the one being placed, given each available member's load."""
    total = sum(loads) + 1
    return max(1, math.ceil((1 + epsilon) * total / max(1, len(loads))))
