"""Search through a real gateway with the tiny CLIP: text/image/vector queries, filters, tenancy, scopes (E3, E4)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import hash_api_key
from tests.media_server import png_bytes
from tests.support import SEARCH_BACKENDS, RunningGateway, run_gateway, search_settings, write_config

ADMIN, WRITER_A, READER_A, WRITER_B = "sk-admin-1", "sk-writer-a", "sk-reader-a", "sk-writer-b"
ADMIN_B, OPERATOR, DEFAULT_KEY, NO_SCOPES = "sk-admin-b", "sk-operator", "sk-default", "sk-none"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
def gateway(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, request: pytest.FixtureRequest
) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("search")
    keys = [
        {"key": ADMIN, "scopes": ["read", "write", "admin"], "namespace": "ops"},
        {"key": WRITER_A, "scopes": ["read", "write"], "namespace": "team-a"},
        {"sha256": hash_api_key(READER_A), "scopes": ["read"], "namespace": "team-a"},
        {"key": WRITER_B, "scopes": ["read", "write"], "namespace": "team-b"},
        {"key": ADMIN_B, "scopes": ["read", "write", "admin"], "namespace": "team-b"},
        {"key": OPERATOR, "scopes": ["read", "operator"], "namespace": "platform"},
        {"key": DEFAULT_KEY, "namespace": "team-c"},  # no scopes named: the least, read
        {"key": NO_SCOPES, "scopes": [], "namespace": "team-c"},
    ]
    config = write_config(
        root / "g.yaml",
        [],
        keys=keys,
        embeddings={"clip_model": "tiny-random"},
        search=search_settings(root, request.param),
    )
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        client = httpx.Client(base_url=running.base_url, timeout=30, headers=_auth(ADMIN))
        assert client.post("/v1/collections", json={"name": "media"}).status_code == 201
        yield running


def _client(gateway: RunningGateway, key: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=30, headers=_auth(key))


def _image(colour: tuple[int, int, int]) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(80, 60, colour)).decode()


def test_text_image_and_vector_queries_with_filters(gateway: RunningGateway) -> None:
    writer = _client(gateway, WRITER_A)
    items = [
        {"id": "red", "image_url": _image((230, 20, 20)), "metadata": {"kind": "photo", "year": 2024}},
        {"id": "blue", "image_url": _image((20, 20, 230)), "metadata": {"kind": "photo", "year": 2025}},
        {"id": "caption", "text": "a red square on white", "metadata": {"kind": "caption", "year": 2025}},
    ]
    response = writer.post("/v1/collections/media/items", json={"items": items})
    assert response.status_code == 200, response.text
    by_image = writer.post(
        "/v1/search", json={"collection": "media", "query": {"image_url": _image((230, 20, 20))}, "top_k": 3}
    ).json()["data"]
    assert by_image[0]["id"] == "red" and by_image[0]["score"] > 0.999
    by_text = writer.post(
        "/v1/search",
        json={"collection": "media", "query": {"text": "a red square on white"}, "top_k": 1, "include_vectors": True},
    ).json()["data"]
    assert by_text[0]["id"] == "caption" and len(by_text[0]["vector"]) == 64
    by_vector = writer.post(
        "/v1/search", json={"collection": "media", "query": {"vector": by_text[0]["vector"]}, "top_k": 1}
    ).json()["data"]
    assert by_vector[0]["id"] == "caption"
    photos_2025 = writer.post(
        "/v1/search",
        json={
            "collection": "media",
            "query": {"text": "anything"},
            "top_k": 10,
            "filter": {"kind": "photo", "year": {"in": [2025, 2026]}},
        },
    )
    assert [hit["id"] for hit in photos_2025.json()["data"]] == ["blue"]


def test_tenants_cannot_see_each_others_items(gateway: RunningGateway) -> None:
    a, b = _client(gateway, WRITER_A), _client(gateway, WRITER_B)
    assert (
        a.post("/v1/collections/media/items", json={"items": [{"id": "secret", "text": "team a plans"}]}).status_code
        == 200
    )
    assert b.get("/v1/collections/media/items/secret").status_code == 404
    hits = b.post("/v1/search", json={"collection": "media", "query": {"text": "team a plans"}, "top_k": 50})
    assert hits.status_code == 200 and all(h["id"] != "secret" for h in hits.json()["data"])
    assert b.delete("/v1/collections/media/items/secret").json()["deleted"] is False
    assert a.get("/v1/collections/media/items/secret").status_code == 200, "B's delete did not touch A's item"
    b_view = b.get("/v1/collections").json()["data"][0]
    assert b_view["items"] == 0, "another tenant's item count is not disclosed"
    same_id = b.post("/v1/collections/media/items", json={"items": [{"id": "secret", "text": "team b notes"}]})
    assert same_id.status_code == 200
    assert (
        a.get("/v1/collections/media/items/secret").json()["vector"]
        != b.get("/v1/collections/media/items/secret").json()["vector"]
    )


def test_read_only_key_cannot_write_or_administer(gateway: RunningGateway) -> None:
    reader = _client(gateway, READER_A)
    attempts = [
        reader.post("/v1/collections/media/items", json={"items": [{"id": "x", "text": "nope"}]}),
        reader.delete("/v1/collections/media/items/red"),
        reader.post("/v1/collections", json={"name": "mine", "dimensions": 4}),
        reader.delete("/v1/collections/media"),
        reader.post("/v1/collections/media/snapshot"),
    ]
    for response in attempts:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["type"] == "permission_error"
    assert reader.post("/v1/search", json={"collection": "media", "query": {"text": "red"}}).status_code == 200
    assert reader.get("/v1/collections/media/items/red").status_code == 200, "reader shares team-a's namespace"
    writer = _client(gateway, WRITER_A)
    assert writer.post("/v1/collections", json={"name": "nope", "dimensions": 4}).status_code == 403


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"items": [{"id": "z", "vector": [0.0] * 64}]}, 400),  # zero vector
        ({"items": [{"id": "w", "vector": [1.0] * 3}]}, 400),  # wrong dimensions
        ({"items": [{"id": "t", "text": "a", "vector": [1.0] * 64}]}, 400),  # two contents
        ({"items": [{"id": "d", "text": "a"}, {"id": "d", "text": "b"}]}, 400),  # duplicate ids
        ({"items": [{"id": "m", "text": "a", "metadata": {"blob": "x" * 20_000}}]}, 400),  # metadata cap
        ({"items": [{"id": "i", "image_url": "http://169.254.169.254/latest"}]}, 400),  # media guard applies
        ({"items": [{"id": "n", "text": "a", "metadata": {"n": 2**70}}]}, 400),  # beyond 64-bit: found by schemathesis
        ({"items": [{"id": "f", "vector": [1e39] + [0.5] * 63}]}, 400),  # beyond float32: would be stored as inf
    ],
)
def test_bad_items_are_refused_whole(gateway: RunningGateway, body: dict[str, object], status: int) -> None:
    writer = _client(gateway, WRITER_B)
    response = writer.post("/v1/collections/media/items", json=body)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_search_bounds_and_unknown_collection(gateway: RunningGateway) -> None:
    reader = _client(gateway, READER_A)
    assert (
        reader.post("/v1/search", json={"collection": "media", "query": {"text": "x"}, "top_k": 5000}).status_code
        == 400
    )
    assert reader.post("/v1/search", json={"collection": "nope", "query": {"text": "x"}}).status_code == 404
    assert (
        reader.post(
            "/v1/search", json={"collection": "media", "query": {"text": "x"}, "filter": {"k": {"nin": [1]}}}
        ).status_code
        == 400
    )


def test_index_add_ingests_a_folder_with_captions_and_resumes(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main as cli_main

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    colours = {f"img{i}.png": (20 * i, 255 - 20 * i, 90) for i in range(6)}
    for name, colour in list(colours.items())[:4]:
        (folder / name).write_bytes(png_bytes(64, 48, colour))
    (folder / "captions.csv").write_text("img0.png,a green field\nimg5.png,a red sunset\n")
    argv = [
        "index",
        "add",
        str(folder),
        "--collection",
        "media",
        "--url",
        gateway.base_url,
        "--api-key",
        WRITER_A,
        "--captions",
        str(folder / "captions.csv"),
        "--batch-size",
        "3",
    ]
    cli_main(argv)
    assert "indexed 4 images" in capsys.readouterr().out
    for name, colour in list(colours.items())[4:]:
        (folder / "sub" / name).write_bytes(png_bytes(64, 48, colour))
    cli_main(argv)
    assert "indexed 2 images into 'media' (4 already done, 0 not images" in capsys.readouterr().out
    reader = _client(gateway, READER_A)
    image_query = {
        "image_url": "data:image/png;base64," + base64.b64encode(png_bytes(64, 48, colours["img3.png"])).decode()
    }
    hit = reader.post(
        "/v1/search", json={"collection": "media", "query": image_query, "top_k": 1, "filter": {"kind": "image"}}
    ).json()["data"][0]
    assert hit["id"] == "img3.png" and hit["metadata"]["path"] == "img3.png"
    caption = reader.post(
        "/v1/search",
        json={"collection": "media", "query": {"text": "a green field"}, "top_k": 1, "filter": {"kind": "caption"}},
    ).json()["data"][0]
    assert caption["id"] == "img0.png#caption"
    assert reader.get("/v1/collections/media/items/img0.png").json()["metadata"]["caption"] == "a green field"


def test_index_add_stays_in_its_folder_and_skips_what_is_not_an_image(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hardening round 3, class 8: links out of the folder are not followed (a link to a system file is never
    read), a file that is not an image is skipped and counted, and the run goes on."""
    from gateway.cli import main as cli_main

    folder, elsewhere = tmp_path / "shots", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "a.png").write_bytes(png_bytes(32, 32, (10, 200, 30)))
    (folder / "notes.jpg").write_bytes(b"not an image at all")
    (folder / "z.png").write_bytes(png_bytes(32, 32, (200, 10, 30)))
    (folder / "passwd.png").symlink_to("/etc/passwd")
    (elsewhere / "far.png").write_bytes(png_bytes(32, 32, (30, 30, 200)))
    (folder / "linked").symlink_to(elsewhere)
    argv = ["index", "add", str(folder), "--collection", "media", "--url", gateway.base_url, "--api-key", WRITER_A]
    cli_main(argv)
    out = capsys.readouterr().out
    assert "indexed 2 images into 'media' (0 already done, 1 not images, 2 links out of the folder" in out, out
    reader = _client(gateway, READER_A)
    assert reader.get("/v1/collections/media/items/z.png").status_code == 200, "the run went on past the bad file"
    assert reader.get("/v1/collections/media/items/passwd.png").status_code == 404
    cli_main([*argv, "--follow-links"])
    out = capsys.readouterr().out
    assert "indexed 1 images into 'media' (2 already done, 2 not images" in out, out  # far.png; passwd is no image
    assert reader.get("/v1/collections/media/items/linked/far.png").status_code == 200


async def test_concurrent_creates_of_one_name_give_one_201_and_409s(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers=_auth(ADMIN)) as client:
        replies = await asyncio.gather(*[client.post("/v1/collections", json={"name": "raced"}) for _ in range(8)])
        assert sorted(r.status_code for r in replies) == [201] + [409] * 7
        added = await client.post("/v1/collections/raced/items", json={"items": [{"id": "a", "text": "a cat"}]})
        assert added.status_code == 200, added.text


def test_a_mixed_upsert_names_the_failing_item_by_its_own_index(gateway: RunningGateway) -> None:
    """Vectors and images in one request: the image error points at the image's own items[i]."""
    items = [
        {"id": "v0", "vector": [1.0] * 64},
        {"id": "v1", "vector": [0.5] * 64},
        {"id": "ok", "image_url": _image((10, 200, 10))},
        {"id": "bad", "image_url": "data:image/png;base64,aGVsbG8="},
    ]
    response = _client(gateway, WRITER_A).post("/v1/collections/media/items", json={"items": items})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "items[3].image_url"
    assert _client(gateway, WRITER_A).get("/v1/collections/media/items/v0").status_code == 404, "nothing written"


def test_validation_errors_name_the_whole_field_path(gateway: RunningGateway) -> None:
    """FastAPI's routes use the chat path's mapper: `query.text`, not `text`; no "Value error, " prefix."""
    reader = _client(gateway, READER_A)
    too_long = reader.post("/v1/search", json={"collection": "media", "query": {"text": "x" * 20_000}})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "query.text"
    two = reader.post("/v1/search", json={"collection": "media", "query": {"text": "a", "vector": [1.0]}})
    assert two.status_code == 400
    error = two.json()["error"]
    assert error["param"] == "query" and not error["message"].startswith("query: Value error")


def test_admin_acts_only_on_its_own_namespaces_collections(gateway: RunningGateway) -> None:
    """One tenant's admin cannot delete or snapshot another's collection; an operator can."""
    admin_b, operator = _client(gateway, ADMIN_B), _client(gateway, OPERATOR)
    assert admin_b.delete("/v1/collections/media").status_code == 404
    assert admin_b.post("/v1/collections/media/snapshot").status_code == 404
    assert _client(gateway, WRITER_A).get("/v1/collections/media/items/red").status_code in (200, 404)
    assert (
        _client(gateway, READER_A).post("/v1/search", json={"collection": "media", "query": {"text": "x"}}).is_success
    )
    assert admin_b.post("/v1/collections", json={"name": "b-own", "dimensions": 4}).status_code == 201
    assert admin_b.post("/v1/collections/b-own/snapshot").status_code == 200
    assert _client(gateway, ADMIN).delete("/v1/collections/b-own").status_code == 404, "ops' admin is not b's"
    assert operator.post("/v1/collections/media/snapshot").status_code == 200
    assert operator.delete("/v1/collections/b-own").status_code == 204
    assert operator.post("/v1/collections", json={"name": "op-made", "dimensions": 4}).status_code == 201


@pytest.mark.parametrize("key", [DEFAULT_KEY, NO_SCOPES])
def test_least_scoped_keys_reach_only_read_routes(gateway: RunningGateway, key: str) -> None:
    client = _client(gateway, key)
    writes = [
        client.post("/v1/collections/media/items", json={"items": [{"id": "x", "text": "nope"}]}),
        client.delete("/v1/collections/media/items/x"),
        client.post("/v1/collections", json={"name": "mine", "dimensions": 4}),
        client.delete("/v1/collections/media"),
    ]
    assert [r.status_code for r in writes] == [403] * 4
    reads = [
        client.post("/v1/search", json={"collection": "media", "query": {"text": "red"}}),
        client.get("/v1/collections"),
        client.get("/v1/models"),
        client.post("/v1/embeddings", json={"model": "clip-tiny-random", "input": "a cat"}),
    ]
    expected = 200 if key == DEFAULT_KEY else 403
    assert [r.status_code for r in reads] == [expected] * 4, [r.text for r in reads]


def test_filter_lists_are_bounded(gateway: RunningGateway) -> None:
    reader = _client(gateway, READER_A)
    query = {"collection": "media", "query": {"text": "x"}}
    too_long = reader.post("/v1/search", json={**query, "filter": {"k": {"in": list(range(1025))}}})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"].startswith("filter")
    spread = {f"k{i}": {"in": list(range(1000))} for i in range(5)}
    in_all = reader.post("/v1/search", json={**query, "filter": spread})
    assert in_all.status_code == 400 and "in all" in in_all.json()["error"]["message"]
    assert reader.post("/v1/search", json={**query, "filter": {"k": {"in": list(range(1024))}}}).status_code == 200


def test_json_types_stay_apart_in_filters(gateway: RunningGateway) -> None:
    writer = _client(gateway, WRITER_B)
    items = [
        {"id": "t-true", "vector": [1.0] * 64, "metadata": {"flag": True}},
        {"id": "t-one", "vector": [1.0] * 64, "metadata": {"flag": 1}},
        {"id": "t-list", "vector": [1.0] * 64, "metadata": {"flag": [1]}},
    ]
    assert writer.post("/v1/collections/media/items", json={"items": items}).status_code == 200
    query = {"collection": "media", "query": {"vector": [1.0] * 64}, "top_k": 10}
    ones = writer.post("/v1/search", json={**query, "filter": {"flag": {"in": [1, 2]}}}).json()["data"]
    trues = writer.post("/v1/search", json={**query, "filter": {"flag": True}}).json()["data"]
    assert [h["id"] for h in ones] == ["t-one"] and [h["id"] for h in trues] == ["t-true"]


async def test_heavy_filtered_searches_never_stall_the_event_loop(gateway: RunningGateway) -> None:
    """F3: 30,000 items searched with 1,024-value filters by 8 callers at once; liveness, an item GET and a write
    answer meanwhile (the shard locks and the scans are in worker threads)."""
    writer = _client(gateway, WRITER_A)
    assert writer.post("/v1/collections", json={"name": "big", "dimensions": 4}).status_code == 403
    admin = _client(gateway, ADMIN)
    assert admin.post("/v1/collections", json={"name": "big", "dimensions": 4}).status_code == 201
    for start in range(0, 30_000, 1000):
        batch = [
            {"id": f"i{n}", "vector": [1.0, n % 7, 1.0, 0.5], "metadata": {"k": n}} for n in range(start, start + 1000)
        ]
        assert writer.post("/v1/collections/big/items", json={"items": batch}).status_code == 200
    body = {
        "collection": "big",
        "query": {"vector": [1, 2, 3, 4]},
        "top_k": 5,
        "filter": {"k": {"in": list(range(0, 30_000, 30))}},
    }
    headers = _auth(WRITER_A)
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=60, headers=headers) as client:
        searches = [asyncio.create_task(client.post("/v1/search", json=body)) for _ in range(8)]
        await asyncio.sleep(0.05)
        live = await client.get("/health/live", timeout=2)
        got = await client.get("/v1/collections/big/items/i7", timeout=5)
        wrote = await client.post(
            "/v1/collections/big/items", json={"items": [{"id": "late", "vector": [1, 1, 1, 1]}]}, timeout=5
        )
        results = await asyncio.gather(*searches)
    assert live.status_code == 200 and got.status_code == 200 and wrote.status_code == 200
    assert all(r.status_code == 200 and len(r.json()["data"]) == 5 for r in results)
    assert all(h["metadata"]["k"] % 30 == 0 for h in results[0].json()["data"])


HOSTILE = ['"', "'", '") or ns != "', "\\", '\\"', "a] or true or [b", "exists", "${x}", "\x00", "🙂", " ", ""]


def test_filter_keys_and_values_never_become_expression_syntax(gateway: RunningGateway) -> None:
    """Each hostile string, as a metadata key and as a value, matches exactly the items a literal comparison
    would: nothing more (no injected `or`), nothing less (no error), on either engine."""
    writer = _client(gateway, WRITER_B)
    items = [
        {"id": f"h{i}", "vector": [1.0] * 64, "metadata": {text: text, "probe": text}} for i, text in enumerate(HOSTILE)
    ]
    items.append({"id": "plain", "vector": [1.0] * 64, "metadata": {"probe": "plain"}})
    assert writer.post("/v1/collections/media/items", json={"items": items}).status_code == 200
    query = {"collection": "media", "query": {"vector": [1.0] * 64}, "top_k": 100}
    for i, text in enumerate(HOSTILE):
        by_value = writer.post("/v1/search", json={**query, "filter": {"probe": text}})
        assert by_value.status_code == 200, by_value.text
        assert [h["id"] for h in by_value.json()["data"]] == [f"h{i}"], text
        by_key = writer.post("/v1/search", json={**query, "filter": {text: {"in": [text, "other"]}}})
        assert [h["id"] for h in by_key.json()["data"]] == [f"h{i}"], text
    missing = writer.post("/v1/search", json={**query, "filter": {'"': None, "probe": {"in": ["plain", '"']}}})
    assert [h["id"] for h in missing.json()["data"]] == ["plain"], "null matches a missing key only"


def test_a_re_upsert_replaces_the_item_whole(gateway: RunningGateway) -> None:
    """Upsert is idempotent by id and replaces: a key the new version dropped no longer matches a filter, and
    reads as missing (Milvus Lite's upsert merges rows; the gateway must not inherit that)."""
    writer = _client(gateway, WRITER_B)
    first = {"id": "swap", "vector": [1.0] * 64, "metadata": {"colour": "red", "size": 3}}
    second = {"id": "swap", "vector": [1.0] * 64, "metadata": {"size": 4}}
    for item in (first, first, second):
        assert writer.post("/v1/collections/media/items", json={"items": [item]}).status_code == 200
    query = {"collection": "media", "query": {"vector": [1.0] * 64}, "top_k": 100}
    red = writer.post("/v1/search", json={**query, "filter": {"colour": "red"}}).json()["data"]
    assert "swap" not in [h["id"] for h in red]
    no_colour = writer.post("/v1/search", json={**query, "filter": {"colour": None, "size": 4}}).json()["data"]
    assert [h["id"] for h in no_colour] == ["swap"]
    assert writer.get("/v1/collections/media/items/swap").json()["metadata"] == {"size": 4}


def test_image_items_keep_a_bounded_display_copy(gateway: RunningGateway) -> None:
    """Each image item stores a JPEG display copy (longer side <= 448 px, <= 32 KiB): returned by GET and, when
    asked, by search; text and vector items have none."""
    import io

    from PIL import Image

    from tests.media_server import noisy_jpeg

    writer = _client(gateway, WRITER_A)
    large = "data:image/jpeg;base64," + base64.b64encode(noisy_jpeg(1600, 900)).decode()
    items = [
        {"id": "display/photo", "image_url": large, "metadata": {"set": "display"}},
        {"id": "display/small", "image_url": _image((10, 200, 30)), "metadata": {"set": "display"}},
        {"id": "display/text", "text": "a caption only", "metadata": {"set": "display"}},
    ]
    assert writer.post("/v1/collections/media/items", json={"items": items}).status_code == 200
    photo = writer.get("/v1/collections/media/items/display/photo").json()
    header, _, encoded = photo["image_url"].partition(",")
    assert header == "data:image/jpeg;base64"
    data = base64.b64decode(encoded)
    shown = Image.open(io.BytesIO(data))
    assert shown.format == "JPEG" and max(shown.size) <= 448 and len(data) <= 32 * 1024
    assert shown.size[0] > shown.size[1], "the aspect ratio is kept"
    small = Image.open(
        io.BytesIO(
            base64.b64decode(
                writer.get("/v1/collections/media/items/display/small").json()["image_url"].partition(",")[2]
            )
        )
    )
    assert small.size == (80, 60), "an image already within the size is not enlarged"
    assert "image_url" not in writer.get("/v1/collections/media/items/display/text").json()
    query = {"collection": "media", "query": {"text": "photo"}, "top_k": 3, "filter": {"set": "display"}}
    plain = writer.post("/v1/search", json=query).json()["data"]
    assert len(plain) == 3 and all("image_url" not in hit for hit in plain)
    shown_hits = writer.post("/v1/search", json={**query, "include_images": True}).json()["data"]
    with_images = {hit["id"] for hit in shown_hits if "image_url" in hit}
    assert with_images == {"display/photo", "display/small"}
    other = _client(gateway, WRITER_B).post("/v1/search", json={**query, "include_images": True}).json()["data"]
    assert other == [], "another namespace's display copies are never returned"
