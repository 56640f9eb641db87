"""Response ids: the replica and the namespace they name, tampering, expiry; the body splice; adapter paths."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import UpstreamTimeout
from gateway.responses.ids import ResponseIds
from gateway.responses.serving import responses_stream_error, with_request_id
from gateway.upstream.adapters import allowed_adapter_path

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


def test_an_id_names_its_replica_for_its_namespace_only() -> None:
    ids = ResponseIds(b"s" * 32, ttl=60)
    minted = ids.mint("alice", B, now=1000)
    resolved = ids.resolve(minted, "alice", now=1030)
    assert resolved is not None and resolved.issued_at == 1000
    assert ids.holder(resolved, [(A, "a"), (B, "b")]) == "b"
    assert ids.holder(resolved, [(A, "a")]) is None, "the replica left the pool"
    assert ids.resolve(minted, "bob", now=1030) is None
    assert ids.resolve(minted, "alice", now=1061) is None, "expired"
    assert ResponseIds(b"t" * 32, ttl=60).resolve(minted, "alice", now=1030) is None, "another gateway's secret"


@pytest.mark.parametrize(
    "mutate", [lambda s: s[:-1] + ("0" if s[-1] != "0" else "1"), lambda s: s[:10] + "ff" + s[12:]]
)
def test_a_tampered_id_resolves_to_nothing(mutate: object) -> None:
    ids = ResponseIds(b"s" * 32, ttl=60)
    minted = ids.mint("alice", A, now=1000)
    assert callable(mutate)
    assert ids.resolve(mutate(minted), "alice", now=1001) is None


@pytest.mark.parametrize("bad", ["", "resp_", "resp_zz" + "0" * 62, "msg_" + "0" * 64, "resp_" + "0" * 63, "x" * 500])
def test_foreign_shapes_resolve_to_nothing(bad: str) -> None:
    assert ResponseIds(b"s" * 32, ttl=60).resolve(bad, "alice") is None


def test_an_id_in_upper_case_hex_is_not_the_same_id() -> None:
    """Hardening round 3, class 9: one spelling is accepted (the minted one, lower case)."""
    ids = ResponseIds(b"s" * 32, ttl=60)
    minted = ids.mint("alice", A, now=1000)
    assert ids.resolve(minted, "alice", now=1001) is not None
    assert ids.resolve("resp_" + minted.removeprefix("resp_").upper(), "alice", now=1001) is None


def test_two_mints_differ() -> None:
    ids = ResponseIds.with_random_secret(ttl=60)
    assert ids.mint("alice", A) != ids.mint("alice", A)


def test_the_request_id_is_spliced_into_the_clients_bytes() -> None:
    body = b'  {"model":"m", "input":"hi"}'
    spliced = with_request_id(body, "resp_1")
    assert spliced == b'{"request_id":"resp_1","model":"m", "input":"hi"}'
    assert orjson.loads(spliced) == {"request_id": "resp_1", "model": "m", "input": "hi"}


def test_a_stream_error_is_numbered_after_the_last_event() -> None:
    tail = b'event: response.output_text.delta\ndata: {"type":"x","sequence_number":41}\n\n'
    frame = responses_stream_error(UpstreamTimeout("stopped"), tail)
    name, data = frame.rstrip(b"\n").split(b"\n", 1)
    assert name == b"event: error"
    event = orjson.loads(data.removeprefix(b"data: "))
    assert event == {
        "type": "error",
        "code": "upstream_timeout",
        "message": "stopped",
        "param": None,
        "sequence_number": 42,
    }


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/adapters/a", True),
        ("/adapters/team/a", True),
        ("/adapters", False),
        ("/adapters/", False),
        ("/adapters/../etc", False),
        ("/adapters/./a", False),
        ("/adapters//a", False),
        ("/adaptersx/a", False),
        ("adapters/a", False),
        ("s3://bucket/a", False),
        ("/adapters/a\x00b", False),
        ("/adapters\\..\\etc", False),
        ("/adapters/a\n", False),
        ("/adapters/a\x1b[0m", False),
        ("/adapters/a\x7f", False),
    ],
)
def test_adapter_paths_stay_inside_the_roots(path: str, allowed: bool) -> None:
    assert allowed_adapter_path(path, ["/adapters"]) is allowed
