"""`POST /v1/adapters` and `DELETE /v1/adapters/{name}` (admin): load or unload a LoRA adapter on every replica of
a pool, through vLLM's own `/v1/load_lora_adapter` (which the gateway never exposes).

A path must lie inside one of the pool's `adapter_roots` (paths as the replicas see them: a shared volume), so a
caller cannot make a replica read an arbitrary file or fetch a URL. The gateway remembers what it loaded and
re-applies it to a replica that comes back without it.

An adapter belongs to the namespace whose admin key loaded it: only that namespace (or an `operator` key) may
re-point or unload it, and other namespaces neither see nor use it (to them it is a 404, like a missing one). Its
name is refused with 409 if any served model has it — another namespace's adapter, a configured adapter, a base
model or the embedding model — and a pool holds at most `max_loaded_adapters`.
"""

from __future__ import annotations

import asyncio

import aiohttp
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.access.context import context_of
from gateway.access.keys import Identity
from gateway.config import ADAPTER_NAME_PATTERN
from gateway.errors import Conflict, InvalidRequest, NotFound, UpstreamError
from gateway.server.state import GatewayState
from gateway.upstream.adapters import allowed_adapter_path, load_on, unload_on
from gateway.upstream.pool import LoadedAdapter, ReplicaSet

router = APIRouter()


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, pattern=ADAPTER_NAME_PATTERN)
    path: str = Field(min_length=1, max_length=4096)
    model: str | None = Field(None, max_length=256, description="the base model's pool (needed if several allow it)")


class AdapterState(BaseModel):
    name: str
    parent: str
    replicas: int


def _pool_for(gateway: GatewayState, model: str | None) -> ReplicaSet:
    candidates = [rs for rs in gateway.pools.by_model.values() if rs.pool.adapter_roots]
    if model is not None:
        candidates = [rs for rs in candidates if rs.pool.name == model]
    if not candidates:
        raise InvalidRequest("No model pool allows loading adapters (adapter_roots).", param="model")
    if len(candidates) > 1:
        raise InvalidRequest("Several model pools allow adapters: name one in `model`.", param="model")
    return candidates[0]


def _may_change(identity: Identity, loaded: LoadedAdapter) -> bool:
    return loaded.owner == identity.namespace or "operator" in identity.scopes


@router.post("/v1/adapters", response_model=AdapterState)
async def load_adapter(body: LoadAdapter, request: Request) -> AdapterState:
    gateway: GatewayState = request.app.state.gateway
    identity: Identity = context_of(request.scope).identity
    replicas = _pool_for(gateway, body.model)
    if not allowed_adapter_path(body.path, replicas.pool.adapter_roots):
        raise InvalidRequest("The adapter path must lie inside one of the pool's adapter roots.", param="path")
    taken = Conflict(f"The name '{body.name}' is already a served model.", param="name")
    existing = replicas.dynamic_adapters.get(body.name)
    if existing is not None:
        if not _may_change(identity, existing):
            raise taken
    elif gateway.pools.get(body.name) is not None or body.name == gateway.embeddings.settings.model_name():
        raise taken
    elif len(replicas.dynamic_adapters) >= replicas.pool.max_loaded_adapters:
        raise Conflict(
            f"The pool holds its limit of {replicas.pool.max_loaded_adapters} loaded adapters; unload one first.",
            param="name",
        )
    session = gateway.upstream.session
    targets = [r for r in replicas.replicas if r.healthy]
    timeout = aiohttp.ClientTimeout(total=gateway.settings.adapter_call_timeout)
    errors = await asyncio.gather(*(load_on(session, r, body.name, body.path, timeout) for r in targets))
    loaded = [r for r, error in zip(targets, errors, strict=True) if error is None]
    if not loaded:
        reason = next((e for e in errors if e), "no replica is healthy")
        raise UpstreamError(f"No replica loaded adapter '{body.name}': {reason}")
    owner = existing.owner if existing is not None else identity.namespace
    replicas.dynamic_adapters[body.name] = LoadedAdapter(body.path, owner)
    for replica in loaded:
        replica.adapters = (replica.adapters or frozenset()) | {body.name}
    return AdapterState(name=body.name, parent=replicas.pool.name, replicas=len(loaded))


@router.delete("/v1/adapters/{name}", response_model=AdapterState)
async def unload_adapter(name: str, request: Request) -> AdapterState:
    gateway: GatewayState = request.app.state.gateway
    identity: Identity = context_of(request.scope).identity
    replicas = next(
        (
            rs
            for rs in gateway.pools.by_model.values()
            if name in rs.dynamic_adapters and _may_change(identity, rs.dynamic_adapters[name])
        ),
        None,
    )
    if replicas is None:  # missing, or another namespace's: the same answer
        raise NotFound(f"No adapter '{name[:256]}' was loaded through the gateway.", param="name")
    del replicas.dynamic_adapters[name]  # first: a replica coming back must not get it re-applied
    session = gateway.upstream.session
    targets = [r for r in replicas.replicas if r.healthy]
    timeout = aiohttp.ClientTimeout(total=gateway.settings.adapter_call_timeout)
    await asyncio.gather(*(unload_on(session, r, name, timeout) for r in targets))
    for replica in replicas.replicas:
        if replica.adapters is not None:
            replica.adapters = replica.adapters - {name}
    return AdapterState(name=name, parent=replicas.pool.name, replicas=0)
