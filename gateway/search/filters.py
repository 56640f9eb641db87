"""Metadata filters: one closed grammar, read once, then either run as a predicate (FAISS) or written as a Milvus
boolean expression.

A filter is `{key: value}` (equality) or `{key: {"in": [values]}}` (membership); every condition must hold. Values
compare as JSON does: `true` is not `1`, `1` equals `1.0`, and `null` matches a missing key. The Milvus expression
never carries a client's key or value as text: each key becomes a dynamic field named by a digest and each value
a fixed-length hex digest (see `item_fields`), so no input can become expression syntax.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest

# A metadata document in, whether the item passes: what a request's `filter` compiles to for the FAISS engine.
Predicate = Callable[[dict[str, Any]], bool]
Typed = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    allowed: frozenset[Typed]  # typed values (see `typed`); ("literal", None) admits a missing key

    @property
    def admits_missing(self) -> bool:
        return ("literal", None) in self.allowed


def parse_filter(spec: dict[str, Any] | None) -> list[Condition]:
    """The request's filter as conditions; InvalidRequest names the key whose shape is wrong. The request model has
    already bounded the keys and values (gateway/search/protocol.py)."""
    conditions: list[Condition] = []
    for key, value in (spec or {}).items():
        if isinstance(value, dict):
            if set(value) != {"in"}:
                raise InvalidRequest(f"filter.{key} must be a value or {{'in': [values]}}.", param=f"filter.{key}")
            allowed = value["in"]
        else:
            allowed = [value]
        conditions.append(Condition(key, frozenset(typed(v) for v in allowed)))
    return conditions


def typed(value: Any) -> Typed:
    """A hashable key that keeps JSON's types apart (Python's `True == 1` and `1 == 1.0` would merge them)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, int | float):
        return ("number", value)  # 1 and 1.0 are one JSON number, and equal (with equal hashes) in Python too
    return (type(value).__name__, value)


def predicate(conditions: list[Condition]) -> Predicate | None:
    """The conditions as a predicate on one item's metadata (membership is a set lookup)."""
    if not conditions:
        return None

    def matches(metadata: dict[str, Any]) -> bool:
        for condition in conditions:
            value = metadata.get(condition.key)
            if isinstance(value, dict | list) or typed(value) not in condition.allowed:
                return False
        return True

    return matches


# -- Milvus: digests stored beside each item, and the expression that queries them ---------------------------------


def _digest(*parts: str | int | bool) -> str:
    # repr spells each str, int and bool one way and quotes strings: no two different tuples share a spelling.
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _canonical(value: Typed) -> Typed | None:
    """One spelling per JSON value, so that 1 and 1.0 hash alike; None for a value no filter can match (NaN)."""
    kind, raw = value
    if kind == "number" and isinstance(raw, float):
        if math.isnan(raw):
            return None
        if raw.is_integer():
            return (kind, int(raw))
        return (kind, repr(raw))
    return value


def value_token(key: str, value: Typed) -> str | None:
    canonical = _canonical(value)
    return None if canonical is None else _digest("value", key, canonical[0], canonical[1])


def key_field(key: str) -> str:
    """The dynamic field an item's value for `key` is stored in: a valid Milvus identifier whatever the key."""
    return "m" + _digest("key", key)[:16]


def namespace_token(namespace: str) -> str:
    return _digest("namespace", namespace)


NESTED = "~"  # a nested value's stand-in: the key is present, and no filter token (a hex digest) equals it
# A key an earlier version of the item had and this one lacks. Milvus Lite's upsert merges onto the old row, so a
# dropped key must be overwritten, and it then reads as missing (as a key never written does).
MISSING = ""


def is_key_field(name: str) -> bool:
    return len(name) == 17 and name[0] == "m" and all(c in "0123456789abcdef" for c in name[1:])


def item_fields(metadata: dict[str, Any]) -> dict[str, str]:
    """An item's filterable fields: a scalar's value token under its key's field; a nested value marks its key as
    present (it matches no filter, but is not "missing"); null adds nothing (it reads as missing)."""
    fields = {}
    for key, value in metadata.items():
        if value is None:
            continue
        token = NESTED if isinstance(value, dict | list) else value_token(key, typed(value))
        fields[key_field(key)] = token if token is not None else NESTED
    return fields


def milvus_expression(conditions: list[Condition], namespace: str) -> str | None:
    """The conditions in Milvus' expression language over the items' dynamic fields, scoped to the namespace;
    None when a condition admits nothing (an empty "in"), so the search returns no hits.

    Every name and operand is a hex digest made here (the namespace's too): nothing a client sent is spliced in."""
    clauses = [f'ns == "{namespace_token(namespace)}"']
    for condition in conditions:
        field = key_field(condition.key)
        tokens = sorted({t for v in condition.allowed if v[1] is not None and (t := value_token(condition.key, v))})
        alternatives = []
        if tokens:
            alternatives.append(f"{field} in [" + ", ".join(f'"{t}"' for t in tokens) + "]")
        if condition.admits_missing:
            alternatives.append(f'not exists {field} or {field} == "{MISSING}"')
        if not alternatives:
            return None
        clauses.append("(" + " or ".join(alternatives) + ")")
    return " and ".join(clauses)
