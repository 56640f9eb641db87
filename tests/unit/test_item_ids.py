"""One item-id grammar at the door (hardening round 3, class 6): every id accepted can be named in a route."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from gateway.search.protocol import ItemId

IDS = TypeAdapter(ItemId)


@pytest.mark.parametrize(
    "item_id",
    [
        "a\nb",
        "a\rb",
        "tab\there",
        "nul\x00",
        "del\x7f",
        "sep\u2028x",
        "para\u2029x",
        "nel\x85x",
        "zw\u200bx",
        " a",
        "a ",
        "/a",
        "a/",
        "a//b",
        ".",
        "..",
        "a/./b",
        "a/../b",
        "",
    ],
)
def test_an_id_no_route_could_address_is_refused(item_id: str) -> None:
    with pytest.raises(ValidationError):
        IDS.validate_python(item_id)


@pytest.mark.parametrize("item_id", ["photo-1.jpg", "holiday/2026/beach.png", "a b", "ünïcödé", "x.y..z", "%2F"])
def test_ids_from_names_and_relative_paths_are_kept(item_id: str) -> None:
    assert IDS.validate_python(item_id) == item_id
