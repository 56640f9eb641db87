"""API keys: only SHA-256 digests are held, and a presented key is compared against every digest in constant time."""

from __future__ import annotations

import hashlib
import hmac

from gateway.config import Settings

BEARER = b"bearer "


class KeyChecker:
    def __init__(self, settings: Settings) -> None:
        self._digests = [bytes.fromhex(d) for d in settings.api_key_hashes]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: bytes | None) -> str | None:
        """The caller's key id (a digest prefix, never the key) or None when the header is missing or wrong."""
        if not authorization or authorization[:7].lower() != BEARER:
            return None
        presented = hashlib.sha256(authorization[7:].strip()).digest()
        match: bytes | None = None
        # Compare against every digest, without an early exit, so timing says nothing about which one matched.
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                match = digest
        return match.hex()[:12] if match is not None else None
