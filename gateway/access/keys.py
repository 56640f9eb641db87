"""API keys: only SHA-256 digests are held, and a presented key is compared against every digest in constant time."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.access.delegation import PREFIX as DELEGATED
from gateway.access.delegation import Delegation
from gateway.config import ALL_SCOPES, RateLimits, Scope, ScopedKey, ServiceTier, Settings
from gateway.errors import PermissionDenied

BEARER = b"bearer "
log = logging.getLogger("gateway.access.keys")


@dataclass(frozen=True, slots=True)
class Identity:
    key_id: str  # a digest prefix, never the key
    scopes: frozenset[Scope]
    namespace: str  # also the key's tenant in the pools' fair share: from the configured keys, a closed set
    service_tier: ServiceTier = "default"
    max_service_tier: ServiceTier = "default"
    weight: float = 1.0
    key_digest: str = ""  # the key's full SHA-256 digest: what a batch records as its owner
    batch: str | None = None  # set when a batch executor sends a line on the key's behalf

    @property
    def sees_adapters_of(self) -> str | None:
        """The namespace whose runtime-loaded adapters this key sees and uses (None: every namespace's, an
        operator key); another namespace's adapter is, to it, a model that does not exist."""
        return None if "operator" in self.scopes else self.namespace

    def require(self, scope: Scope) -> None:
        """Refuses with 403 unless the key holds `scope` (operator holds admin too, on every namespace)."""
        if scope not in self.scopes and not (scope == "admin" and "operator" in self.scopes):
            raise PermissionDenied(f"This API key lacks the '{scope}' scope.")


# With no keys configured every caller is trusted alike: any band may be asked for.
ANONYMOUS = Identity("anonymous", frozenset(ALL_SCOPES), "default", max_service_tier="priority")


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    scopes: frozenset[Scope]
    namespace: str | None
    service_tier: ServiceTier = "default"
    max_service_tier: ServiceTier = "priority"  # the full-rights keys (api_key_hashes) may ask for any band
    weight: float = 1.0


def load_keys_file(path: Path) -> list[ScopedKey]:
    data = yaml.safe_load(path.read_text()) or []
    if not isinstance(data, list):
        raise ValueError("a keys file holds a YAML list of keys")
    return [ScopedKey.model_validate(entry) for entry in data]


class KeyChecker:
    def __init__(self, settings: Settings, delegation: Delegation | None = None) -> None:
        self._settings = settings
        self.delegation = delegation
        self._file_stamp: tuple[float, int] | None = None
        self._entries: list[_Entry] = []
        self.rate_limits: dict[str, RateLimits] = {}
        self._install(self._file_keys())

    def _file_keys(self) -> list[ScopedKey]:
        path = self._settings.keys_file
        if path is None:
            return []
        stat = path.stat()
        self._file_stamp = (stat.st_mtime, stat.st_size)
        return load_keys_file(path)

    def _install(self, file_keys: list[ScopedKey]) -> None:
        settings = self._settings
        keys = [*settings.keys, *file_keys]
        entries = [_Entry(bytes.fromhex(d), frozenset(ALL_SCOPES), None) for d in settings.api_key_hashes]
        entries += [
            _Entry(
                bytes.fromhex(k.sha256 or ""),
                frozenset(k.scopes),
                k.namespace,
                k.service_tier,
                k.max_service_tier,
                k.weight,
            )
            for k in keys
        ]
        self._entries = entries  # one assignment: a request sees the old set or the new one, never half
        self.rate_limits = {(k.sha256 or "")[:12]: k.rate_limits for k in keys if k.rate_limits is not None}

    def reload_if_changed(self) -> bool:
        """Re-read the keys file if it changed; a broken file keeps the keys in force (and says so)."""
        path = self._settings.keys_file
        if path is None:
            return False
        try:
            stat = path.stat()
            if (stat.st_mtime, stat.st_size) == self._file_stamp:
                return False
            self._install(self._file_keys())
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("keys file %s not reloaded (%s); the previous keys stay in force", path, type(exc).__name__)
            return False
        log.info("keys file %s reloaded: %d keys", path, len(self._entries))
        return True

    @property
    def enabled(self) -> bool:
        return self._settings.auth_enabled

    def identify(self, authorization: bytes | None) -> Identity | None:
        """Who is calling, or None when the header is missing or names no configured key."""
        if not authorization or authorization[:7].lower() != BEARER:
            return None
        token = authorization[7:].strip()
        if token.startswith(DELEGATED):
            return self._delegated(token)
        return self._matching(hashlib.sha256(token).digest())

    def _delegated(self, token: bytes) -> Identity | None:
        """A batch line: its owner's identity as configured now, in the flex band."""
        claims = self.delegation.verify(token) if self.delegation is not None else None
        if claims is None:
            return None
        digest, batch_id = claims
        try:
            owner = self._matching(bytes.fromhex(digest))
        except ValueError:
            return None
        if owner is None:
            return None
        return dataclasses.replace(owner, service_tier="flex", max_service_tier="flex", batch=batch_id)

    def _matching(self, presented: bytes) -> Identity | None:
        match: _Entry | None = None
        # Compare against every digest, without an early exit, so timing says nothing about which one matched.
        for entry in self._entries:
            if hmac.compare_digest(presented, entry.digest):
                match = entry
        if match is None:
            return None
        digest = match.digest.hex()
        key_id = digest[:12]
        return Identity(
            key_id,
            match.scopes,
            match.namespace or key_id,
            match.service_tier,
            match.max_service_tier,
            match.weight,
            key_digest=digest,
        )
