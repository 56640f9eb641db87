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
from tests.support import RunningGateway, run_gateway, write_config

ADMIN, WRITER_A, READER_A, WRITER_B = "sk-admin-1", "sk-writer-a", "sk-reader-a", "sk-writer-b"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("search")
    keys = [
        {"key": ADMIN, "scopes": ["read", "write", "admin"], "namespace": "ops"},
        {"key": WRITER_A, "scopes": ["read", "write"], "namespace": "team-a"},
        {"sha256": hash_api_key(READER_A), "scopes": ["read"], "namespace": "team-a"},
        {"key": WRITER_B, "scopes": ["read", "write"], "namespace": "team-b"},
    ]
    config = write_config(
        root / "g.yaml",
        [],
        keys=keys,
        embeddings={"clip_model": "tiny-random"},
        search={"index_dir": str(root / "index")},
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
    assert "indexed 2 images into 'media' (4 already done)" in capsys.readouterr().out
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


async def test_concurrent_creates_of_one_name_give_one_201_and_409s(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30, headers=_auth(ADMIN)) as client:
        replies = await asyncio.gather(*[client.post("/v1/collections", json={"name": "raced"}) for _ in range(8)])
        assert sorted(r.status_code for r in replies) == [201] + [409] * 7
        added = await client.post("/v1/collections/raced/items", json={"items": [{"id": "a", "text": "a cat"}]})
        assert added.status_code == 200, added.text
