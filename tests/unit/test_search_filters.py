"""The filter grammar, read once and written two ways: as a predicate (FAISS) and as a Milvus expression whose
every name and operand is a digest the gateway made (no client text can become syntax)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidRequest
from gateway.search.filters import (
    MISSING,
    NESTED,
    item_fields,
    key_field,
    milvus_expression,
    parse_filter,
    predicate,
    typed,
    value_token,
)

SAFE = re.compile(r'^[a-z0-9 ()\[\]",=!_]*$')  # digests, field names, brackets, quotes, commas, `in`/`or`/...
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text())


@given(
    st.dictionaries(st.text(max_size=40), st.one_of(scalars, st.lists(scalars, max_size=5).map(lambda v: {"in": v})))
)
def test_no_client_text_reaches_the_expression(spec: dict[str, object]) -> None:
    expression = milvus_expression(parse_filter(spec), "team-a")
    if expression is not None:
        assert SAFE.fullmatch(expression), expression
        quoted = re.findall(r'"([^"]*)"', expression)
        assert all(re.fullmatch(r"[0-9a-f]{32}|", q) for q in quoted), quoted


def test_numbers_compare_as_json_does() -> None:
    assert value_token("k", typed(1)) == value_token("k", typed(1.0))
    assert value_token("k", typed(True)) != value_token("k", typed(1))
    assert value_token("k", typed("1")) != value_token("k", typed(1))
    assert value_token("k", typed(2**60 + 1)) != value_token("k", typed(float(2**60)))
    assert value_token("k", typed(float("nan"))) is None


def test_item_fields_mirror_the_predicate() -> None:
    metadata = {"a": 1, "b": [1], "c": None, "d": "x"}
    fields = item_fields(metadata)
    assert fields[key_field("a")] == value_token("a", typed(1))
    assert fields[key_field("b")] == NESTED and key_field("c") not in fields
    assert NESTED != MISSING
    matches = predicate(parse_filter({"c": None, "a": {"in": [1.0, 2]}}))
    assert matches is not None and matches(metadata)
    assert not predicate(parse_filter({"b": None}))(metadata)  # type: ignore[misc]  # nested is present


def test_an_empty_membership_matches_nothing_and_bad_shapes_are_named() -> None:
    assert milvus_expression(parse_filter({"k": {"in": []}}), "ns") is None
    with pytest.raises(InvalidRequest) as refused:
        parse_filter({"k": {"nin": [1]}})
    assert refused.value.param == "filter.k"
