"""The route → scope table: every /v1 route the gateway serves has its scope; anything else needs admin."""

from __future__ import annotations

import pytest

from gateway.access.scopes import required_scope
from gateway.config import ScopedKey


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/chat/completions", "read"),
        ("POST", "/v1/completions", "read"),
        ("POST", "/v1/embeddings", "read"),
        ("POST", "/v1/search", "read"),
        ("GET", "/v1/models", "read"),
        ("GET", "/v1/collections", "read"),
        ("GET", "/v1/collections/media/items/a/b.png", "read"),
        ("POST", "/v1/collections/media/items", "write"),
        ("DELETE", "/v1/collections/media/items/a", "write"),
        ("POST", "/v1/collections", "admin"),
        ("DELETE", "/v1/collections/media", "admin"),
        ("POST", "/v1/collections/media/snapshot", "admin"),
        ("GET", "/v1/something-new", "admin"),
        ("PUT", "/v1/collections/media/items", "admin"),
    ],
)
def test_each_route_declares_its_scope(method: str, path: str, scope: str) -> None:
    assert required_scope(method, path) == scope


def test_a_key_that_names_no_scopes_gets_read_only() -> None:
    assert ScopedKey(key="sk-x").scopes == ["read"]  # type: ignore[arg-type]
