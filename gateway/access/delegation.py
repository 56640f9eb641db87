"""Batch-line credentials: how the batch executor sends a line as the key that created the batch.

Only digests of API keys are held, so the executor cannot present the owner's key. It presents instead a bearer
token naming the owner's key digest and the batch, valid for minutes and signed with a secret that the gateways
sharing the work hold (role `all`: this process; the chart: the proxy tier and the state tier). The gateway that
receives a line resolves it to the owner's identity as configured *now* (a revoked key's lines are refused), in
the `flex` band at most — a line can do nothing its owner could not do online, and never ahead of online work.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import orjson

PREFIX = b"gw-batch."
LIFETIME = 600.0  # seconds a minted credential is accepted; one is minted per line sent


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class Delegation:
    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def with_random_secret(cls) -> Delegation:
        return cls(secrets.token_bytes(32))

    def _sign(self, payload: bytes) -> bytes:
        return _b64(hmac.new(self._secret, payload, hashlib.sha256).digest())

    def mint(self, key_digest: str, batch_id: str, now: float | None = None) -> str:
        """A bearer token for one line of `batch_id`, sent as the key whose SHA-256 digest is `key_digest` (""
        when no keys are configured)."""
        expires = int((now if now is not None else time.time()) + LIFETIME)
        payload = _b64(orjson.dumps({"k": key_digest, "b": batch_id, "e": expires}))
        return (PREFIX + payload + b"." + self._sign(payload)).decode()

    def verify(self, token: bytes, now: float | None = None) -> tuple[str, str] | None:
        """(key digest, batch id) for a genuine, unexpired token; None for anything else."""
        if not token.startswith(PREFIX) or len(token) > 1024:
            return None
        payload, _, signature = token[len(PREFIX) :].partition(b".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            claims = orjson.loads(_unb64(payload))
            digest, batch_id, expires = str(claims["k"]), str(claims["b"]), float(claims["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires < (now if now is not None else time.time()):
            return None
        return digest, batch_id
