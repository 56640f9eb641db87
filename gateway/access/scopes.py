"""The one table of which scope each `/v1` route needs. The middleware checks it before any handler runs, so a
route cannot forget its check; a `/v1` route missing from the table needs `admin` (closed by default).

Scopes: `read` (chat, completions, responses, embeddings, models, search, get items, files and batches),
`write` (index items), `admin` (create collections; delete and snapshot the collections its own namespace
created), `operator` (admin actions on any namespace's collections).
"""

from __future__ import annotations

import re

from gateway.config import Scope

EXACT: dict[tuple[str, str], Scope] = {
    ("POST", "/v1/chat/completions"): "read",
    ("POST", "/v1/completions"): "read",
    ("POST", "/v1/responses"): "read",
    ("POST", "/v1/messages"): "read",
    ("POST", "/v1/messages/count_tokens"): "read",
    ("POST", "/tokenize"): "read",
    ("POST", "/detokenize"): "read",
    ("POST", "/v1/embeddings"): "read",
    ("POST", "/v1/search"): "read",
    ("GET", "/v1/models"): "read",
    ("GET", "/v1/collections"): "read",
    ("POST", "/v1/collections"): "admin",
    ("POST", "/v1/adapters"): "admin",
    # Files and batches: a batch's lines are requests the key could send online, so the same scope.
    ("POST", "/v1/files"): "read",
    ("GET", "/v1/files"): "read",
    ("POST", "/v1/batches"): "read",
    ("GET", "/v1/batches"): "read",
}
SEGMENT = r"[^/]+"
RULES: tuple[tuple[str, str, Scope], ...] = (
    # A stored response is read and cancelled with the scope that created it; the id names its namespace.
    ("GET", rf"/v1/responses/{SEGMENT}", "read"),
    ("POST", rf"/v1/responses/{SEGMENT}/cancel", "read"),
    ("DELETE", rf"/v1/adapters/{SEGMENT}", "admin"),
    ("GET", rf"/v1/files/{SEGMENT}", "read"),
    ("GET", rf"/v1/files/{SEGMENT}/content", "read"),
    ("DELETE", rf"/v1/files/{SEGMENT}", "read"),
    ("GET", rf"/v1/batches/{SEGMENT}", "read"),
    ("POST", rf"/v1/batches/{SEGMENT}/cancel", "read"),
    ("DELETE", rf"/v1/collections/{SEGMENT}", "admin"),
    ("POST", rf"/v1/collections/{SEGMENT}/snapshot", "admin"),
    ("POST", rf"/v1/collections/{SEGMENT}/items", "write"),
    ("GET", rf"/v1/collections/{SEGMENT}/items/.+", "read"),
    ("DELETE", rf"/v1/collections/{SEGMENT}/items/.+", "write"),
)
PATTERNS = [(method, re.compile(pattern), scope) for method, pattern, scope in RULES]


def required_scope(method: str, path: str) -> Scope:
    scope = EXACT.get((method, path))
    if scope is not None:
        return scope
    for rule_method, pattern, rule_scope in PATTERNS:
        if rule_method == method and pattern.fullmatch(path):
            return rule_scope
    return "admin"
