"""Response ids that say which replica holds a stored response and whose it is, with nothing stored here.

vLLM keeps a stored response in the memory of the replica that made it, and takes the id from the request's
`request_id`. The gateway therefore mints the id itself, per attempt, as

    resp_ + hex( nonce[12] | issued_at[4, big-endian seconds] | replica_tag[6] | mac[10] )

where `replica_tag` is an HMAC of the replica's base URL and `mac` an HMAC over the rest plus the caller's key
namespace. Any gateway replica holding the same secret can then route `GET`, `cancel` and `previous_response_id`
to the right vLLM replica, refuse another namespace's id (404, as if it did not exist) and expire it after the
TTL, without a shared table: no memory grows with the number of responses, and no Redis round trip is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

PREFIX = "resp_"
_NONCE, _ISSUED, _TAG, _MAC = 12, 4, 6, 10
_LENGTH = _NONCE + _ISSUED + _TAG + _MAC

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ResolvedId:
    replica_tag: bytes
    issued_at: int


class ResponseIds:
    def __init__(self, secret: bytes, ttl: float) -> None:
        self._secret = secret
        self.ttl = ttl

    @classmethod
    def with_random_secret(cls, ttl: float) -> ResponseIds:
        return cls(secrets.token_bytes(32), ttl)

    def _digest(self, *parts: bytes) -> bytes:
        return hmac.new(self._secret, b"\x00".join(parts), hashlib.sha256).digest()

    def replica_tag(self, base_url: str) -> bytes:
        return self._digest(b"replica", base_url.encode())[:_TAG]

    def mint(self, namespace: str, base_url: str, now: float | None = None) -> str:
        head = (
            secrets.token_bytes(_NONCE)
            + struct.pack(">I", int(now if now is not None else time.time()) & 0xFFFFFFFF)
            + self.replica_tag(base_url)
        )
        return PREFIX + (head + self._digest(b"owner", head, namespace.encode())[:_MAC]).hex()

    def resolve(self, response_id: str, namespace: str, now: float | None = None) -> ResolvedId | None:
        """The id's replica tag, if the id is one of ours, belongs to `namespace` and has not expired."""
        if not response_id.startswith(PREFIX) or len(response_id) != len(PREFIX) + 2 * _LENGTH:
            return None
        if not response_id.islower():
            return None  # one spelling, the minted one: vLLM would take upper-case hex for another id
        try:
            raw = bytes.fromhex(response_id[len(PREFIX) :])
        except ValueError:
            return None
        head, mac = raw[:-_MAC], raw[-_MAC:]
        if not hmac.compare_digest(mac, self._digest(b"owner", head, namespace.encode())[:_MAC]):
            return None
        (issued,) = struct.unpack(">I", head[_NONCE : _NONCE + _ISSUED])
        if (now if now is not None else time.time()) - issued > self.ttl:
            return None
        return ResolvedId(head[_NONCE + _ISSUED :], issued)

    def holder(self, resolved: ResolvedId, candidates: Iterable[tuple[str, T]]) -> T | None:
        """The candidate (base URL, value) whose URL the id's tag names."""
        for base_url, value in candidates:
            if hmac.compare_digest(self.replica_tag(base_url), resolved.replica_tag):
                return value
        return None
