"""API keys: only SHA-256 digests are held, and a presented key is compared against every digest in constant time."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gateway.config import ALL_SCOPES, RateLimits, Scope, Settings
from gateway.errors import PermissionDenied

BEARER = b"bearer "


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str  # a digest prefix, never the key
    scopes: frozenset[Scope]
    namespace: str

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"This API key lacks the '{scope}' scope.")


ANONYMOUS = Identity("anonymous", frozenset(ALL_SCOPES), "default")


class KeyChecker:
    def __init__(self, settings: Settings) -> None:
        entries: list[tuple[bytes, frozenset[Scope], str | None]] = [
            (bytes.fromhex(d), frozenset(ALL_SCOPES), None) for d in settings.api_key_hashes
        ]
        entries += [(bytes.fromhex(k.sha256 or ""), frozenset(k.scopes), k.namespace) for k in settings.keys]
        self._entries = entries
        self.rate_limits: dict[str, RateLimits] = {
            (k.sha256 or "")[:12]: k.rate_limits for k in settings.keys if k.rate_limits is not None
        }

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def identify(self, authorization: bytes | None) -> Identity | None:
        """Who is calling, or None when the header is missing or names no configured key."""
        if not authorization or authorization[:7].lower() != BEARER:
            return None
        presented = hashlib.sha256(authorization[7:].strip()).digest()
        match: tuple[bytes, frozenset[Scope], str | None] | None = None
        # Compare against every digest, without an early exit, so timing says nothing about which one matched.
        for entry in self._entries:
            if hmac.compare_digest(presented, entry[0]):
                match = entry
        if match is None:
            return None
        key_id = match[0].hex()[:12]
        return Identity(key_id, match[1], match[2] or key_id)
