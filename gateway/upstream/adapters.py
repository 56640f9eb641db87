"""LoRA adapters on the replicas: which each one serves, and loading or unloading one on all of a pool's.

A replica's adapters are read from its own `/v1/models` (adapters carry `parent` = the base model) at each health
check, so routing follows what the replica really serves, not what it was configured with. Adapters loaded
through the gateway are re-applied to a replica that comes back without them (a restart loses them).
"""

from __future__ import annotations

import logging
import os
import posixpath
from typing import TYPE_CHECKING

import aiohttp
import orjson

from gateway.upstream.errors import TransportError, map_upstream_errors, read_bounded

if TYPE_CHECKING:
    from gateway.upstream.pool import Replica, ReplicaSet

log = logging.getLogger("gateway.adapters")
MAX_MODELS_BYTES = 1024 * 1024  # a /v1/models answer past this is not read (256 adapters fit in a few KB)


async def listed_adapters(
    session: aiohttp.ClientSession, replica: Replica, base_model: str, within: aiohttp.ClientTimeout
) -> frozenset[str] | None:
    """The adapter names the replica's /v1/models lists under `base_model`, or None if it did not answer."""
    try:
        with map_upstream_errors():
            async with session.get(f"{replica.base_url}/v1/models", timeout=within) as response:
                if response.status != 200:
                    return None
                body = await read_bounded(response, MAX_MODELS_BYTES)
    except (TransportError, TimeoutError):
        return None
    if body is None:
        return None
    try:
        cards = orjson.loads(body).get("data", [])
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return frozenset(
        card["id"]
        for card in cards
        if isinstance(card, dict) and isinstance(card.get("id"), str) and card.get("parent") == base_model
    )


async def sync_adapters(
    session: aiohttp.ClientSession, replica_set: ReplicaSet, replica: Replica, within: aiohttp.ClientTimeout
) -> None:
    listed = await listed_adapters(session, replica, replica_set.pool.name, within)
    if listed is None:
        return
    for name, loaded in list(replica_set.dynamic_adapters.items()):
        if name not in listed and await load_on(session, replica, name, loaded.path, within) is None:
            log.info("adapter %s re-applied to replica %s", name, replica.base_url)
            listed = listed | {name}
    replica.adapters = listed


async def load_on(
    session: aiohttp.ClientSession, replica: Replica, name: str, path: str, within: aiohttp.ClientTimeout
) -> str | None:
    """Load one adapter on one replica: None when it serves it, else why not (vLLM's own message)."""
    body = {"lora_name": name, "lora_path": path}
    return await _post(session, f"{replica.base_url}/v1/load_lora_adapter", body, within)


async def unload_on(
    session: aiohttp.ClientSession, replica: Replica, name: str, within: aiohttp.ClientTimeout
) -> str | None:
    return await _post(session, f"{replica.base_url}/v1/unload_lora_adapter", {"lora_name": name}, within)


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, str], within: aiohttp.ClientTimeout
) -> str | None:
    try:
        with map_upstream_errors():
            async with session.post(url, json=body, timeout=within) as response:
                if response.status == 200:
                    return None
                text = (await response.content.read(4096)).decode("utf-8", "replace")
    except (TransportError, TimeoutError):
        return "the replica did not answer"
    try:
        message = orjson.loads(text).get("error", {}).get("message")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    return str(message or text or f"status {response.status}")[:512]


def allowed_adapter_path(path: str, roots: list[str]) -> bool:
    """An absolute, already-normal path (no `..`, no `//`, no URL, no control character) strictly inside one of
    `roots` — and, where the gateway sees the same volume as the replicas (mount it read-only to get this), its
    real path too, so a symlink inside a root cannot point a replica outside it."""
    if not path.startswith("/") or "://" in path or "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    if posixpath.normpath(path) != path:
        return False
    if not _inside(path, roots):
        return False
    if not os.path.lexists(path):
        return True  # not visible here: the replicas' volume is not mounted into the gateway
    return _inside(os.path.realpath(path), [os.path.realpath(root) for root in roots if root.startswith("/")])


def _inside(path: str, roots: list[str]) -> bool:
    return any(path.startswith(root.rstrip("/") + "/") for root in roots if root.startswith("/"))
