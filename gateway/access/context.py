"""Who is calling and which request this is: set once by the gateway middleware, read by every route.

Held in the ASGI scope's `state` under one key, as one typed object, so a route never reads loose, untyped
entries (and a route reached without the middleware fails loudly instead of reading a default).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from gateway.access.keys import Identity

KEY = "gateway.request"


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str
    identity: Identity


def set_context(scope: MutableMapping[str, Any], context: RequestContext) -> None:
    scope.setdefault("state", {})[KEY] = context


def context_of(scope: MutableMapping[str, Any]) -> RequestContext:
    context: RequestContext = scope["state"][KEY]
    return context
