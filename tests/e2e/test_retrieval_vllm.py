"""Chat grounded in the caller's collection, against real vLLM through the real OpenAI SDK: a folder ingested with
`gateway index add`, then `retrieval` in `extra_body`. vLLM's own prompt_tokens show the injected images arrived
(they grow by the images' visual tokens); the ids used match a direct /v1/search; tenancy, scope, the image limit,
an empty collection, and the same through a role-proxy gateway."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import pytest

from tests.e2e.conftest import MAX_MODEL_LEN, MODEL, VLLM_LIMITS, Replica, checkpoint_dir
from tests.media_server import png_bytes
from tests.support import RunningGateway, run_gateway, write_config

OWNER, OTHER, WRITE_ONLY = "sk-grounding-owner", "sk-grounding-other", "sk-grounding-write-only"
COLOURS = {
    "red.png": (220, 20, 20),
    "green.png": (20, 200, 40),
    "blue.png": (30, 40, 220),
    "yellow.png": (230, 220, 30),
}
CAPTIONS = {"red.png": "a red square", "green.png": "a green field", "blue.png": "a blue sea", "yellow.png": "a sun"}


def _keys() -> list[dict[str, Any]]:
    return [
        {"key": OWNER, "scopes": ["read", "write", "admin"], "namespace": "team-a"},
        {"key": OTHER, "scopes": ["read", "write", "admin"], "namespace": "team-b"},
        {"key": WRITE_ONLY, "scopes": ["write"], "namespace": "team-a"},
    ]


def _models(replicas: list[Replica]) -> list[dict[str, Any]]:
    return [
        {
            "name": MODEL,
            "upstreams": [r.url for r in replicas],
            "limit_mm_per_prompt": VLLM_LIMITS,
            "max_model_len": MAX_MODEL_LEN,
            "tokenizer": str(checkpoint_dir()),
        }
    ]


@pytest.fixture(scope="module")
def grounded(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, replicas: list[Replica]
) -> Iterator[RunningGateway]:
    """One gateway (role all) holding the collection `photos`, ingested from a folder by the CLI."""
    root = tmp_path_factory.mktemp("grounded")
    config = write_config(
        root / "g.yaml",
        _models(replicas),
        keys=_keys(),
        embeddings={"clip_model": "tiny-random"},
        search={"index_dir": str(root / "index")},
        health_check_interval=1,
    )
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        folder = root / "photos"
        folder.mkdir()
        for name, colour in COLOURS.items():
            (folder / name).write_bytes(png_bytes(64, 48, colour))
        (folder / "captions.csv").write_text("".join(f"{name},{text}\n" for name, text in CAPTIONS.items()))
        from gateway.cli import main as cli_main

        cli_main(["index", "add", str(folder), "--collection", "photos", "--url", running.base_url,
                  "--api-key", OWNER, "--captions", str(folder / "captions.csv")])  # fmt: skip
        admin = httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {OWNER}"}, timeout=30)
        assert admin.post("/v1/collections", json={"name": "empty"}).status_code == 201
        yield running


def _sdk(gateway: RunningGateway, key: str = OWNER) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, content: Any, retrieval: dict[str, Any] | None = None) -> tuple[int, list[str]]:
    """(vLLM's prompt_tokens, the ids the gateway says it used) for one non-streamed one-token answer."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=1,
        temperature=0,
        extra_body={"retrieval": retrieval} if retrieval else None,
    )
    completion = raw.parse()
    assert completion.usage is not None
    ids = raw.headers.get("x-retrieval-ids")
    return completion.usage.prompt_tokens, [unquote(i) for i in ids.split(",") if i] if ids else []


def _image(name: str) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64, 48, COLOURS[name])).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def test_grounded_chat_injects_the_hits_vllm_sees_them_and_the_ids_match_search(grounded: RunningGateway) -> None:
    client = _sdk(grounded)
    question = "Which colour fits a red square?"
    plain, none_used = _chat(client, question)
    assert none_used == []
    with_one_image, _ = _chat(client, [_image("green.png"), {"type": "text", "text": question}])
    per_image = with_one_image - plain  # the display copies are the 64x48 originals: the same visual tokens
    assert per_image > 0
    retrieval = {"collection": "photos", "top_k": 2, "kind": "image"}
    tokens, used = _chat(client, question, retrieval)
    direct = httpx.post(
        f"{grounded.base_url}/v1/search",
        headers={"Authorization": f"Bearer {OWNER}"},
        json={"collection": "photos", "query": {"text": question}, "top_k": 2, "filter": {"kind": "image"}},
    ).json()["data"]
    print(f"prompt tokens: plain {plain}, one image +{per_image}, grounded with two hits {tokens}")
    assert used == [hit["id"] for hit in direct], "the hits used are the ones /v1/search returns for the same turn"
    assert tokens >= plain + 2 * per_image, "vLLM's prompt holds both injected images (and the captions)"


def test_a_stream_ends_with_the_retrieval_chunk(grounded: RunningGateway) -> None:
    client = _sdk(grounded)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [_image("blue.png"), {"type": "text", "text": "Like this?"}]}],
        max_tokens=4,
        stream=True,
        extra_body={"retrieval": {"collection": "photos", "top_k": 3, "kind": "image"}},
    )
    chunks = list(stream)
    # The random-weight model may emit tokens that decode to no text: count the answer's chunks, not its text.
    assert len([c for c in chunks if c.choices]) >= 2, "the answer still streams"
    final = chunks[-1]
    assert final.choices == [] and final.id == chunks[0].id
    summary = (final.model_extra or {})["retrieval"]
    assert summary["collection"] == "photos" and len(summary["data"]) == 3
    assert summary["data"][0]["id"] == "blue.png", "an image turn searches with its image"
    images = [hit for hit in summary["data"] if hit["image"]]
    assert len(images) == 1, "limit_mm_per_prompt is 2 and the user sent one: one hit image fits"
    assert all(hit["thumbnail"].startswith("data:image/jpeg") for hit in summary["data"])
    assert all(hit["text"] for hit in summary["data"]), "every hit's caption went in as quoted context"


def test_a_full_prompt_gets_captions_only(grounded: RunningGateway) -> None:
    client = _sdk(grounded)
    own = [_image("red.png"), _image("yellow.png"), {"type": "text", "text": "Compare."}]
    baseline, _ = _chat(client, own)
    tokens, used = _chat(client, own, {"collection": "photos", "top_k": 2, "kind": "image"})
    assert len(used) == 2, "the hits still ground the answer, as captions"
    assert 0 < tokens - baseline < 200, "no image was added beyond the limit: only caption text"


def test_another_namespace_gets_nothing_and_an_empty_collection_grounds_nothing(grounded: RunningGateway) -> None:
    question = "a red square"
    plain, _ = _chat(_sdk(grounded, OTHER), question)
    tokens, used = _chat(_sdk(grounded, OTHER), question, {"collection": "photos", "top_k": 4})
    assert used == [] and tokens == plain, "team-b's search sees none of team-a's items"
    tokens, used = _chat(_sdk(grounded), question, {"collection": "empty", "top_k": 4})
    assert used == [] and tokens == plain


def test_scope_unknown_collection_and_malformed_retrieval_are_refused(grounded: RunningGateway) -> None:
    with pytest.raises(openai.PermissionDeniedError):
        _chat(_sdk(grounded, WRITE_ONLY), "hi", {"collection": "photos"})
    with pytest.raises(openai.NotFoundError) as missing:
        _chat(_sdk(grounded), "hi", {"collection": "nope"})
    assert missing.value.body["param"] == "retrieval.collection"  # type: ignore[index]
    for bad in ({"collection": "photos", "top_k": 99}, {"collection": "photos", "unknown": 1}, {"top_k": 2}):
        with pytest.raises(openai.BadRequestError) as refused:
            _chat(_sdk(grounded), "hi", bad)
        assert str(refused.value.body["param"]).startswith("retrieval")  # type: ignore[index]


def test_a_proxy_gateway_grounds_through_the_retrieval_service(
    grounded: RunningGateway, replicas: list[Replica], tmp_path: Path, log_dir: Path
) -> None:
    config = write_config(
        tmp_path / "proxy.yaml", _models(replicas), keys=_keys(), role="proxy", retrieval_url=grounded.base_url
    )
    with run_gateway(["--config", str(config)], log_dir) as proxy:
        retrieval = {"collection": "photos", "top_k": 2, "kind": "image"}
        through_proxy = _chat(_sdk(proxy), "a blue sea", retrieval)
        direct = _chat(_sdk(grounded), "a blue sea", retrieval)
        assert through_proxy == direct and len(direct[1]) == 2
        assert _chat(_sdk(proxy, OTHER), "a blue sea", retrieval)[1] == [], "the caller's own key decides"
        with pytest.raises(openai.NotFoundError):
            _chat(_sdk(proxy), "hi", {"collection": "nope"})


def test_the_chat_page_grounds_in_a_collection_and_streams_token_by_token(
    grounded: RunningGateway, browser: Any, log_dir: Path
) -> None:
    """The page's picker lists the key's collections; a grounded turn shows the hits' thumbnails above the
    answer, and the answer grows in several steps as chunks arrive (sampled from outside the page)."""
    import os

    page = browser.new_page(viewport={"width": 1100, "height": 720})
    # Every change to an answer bubble, with its time, recorded inside the page (an init script, as a browser
    # extension would run: outside the page's Content-Security-Policy).
    page.add_init_script(
        """window.__updates = [];
        new MutationObserver((changes) => {
          for (const c of changes) {
            const turn = c.target.nodeType === 1 ? c.target : c.target.parentElement;
            if (turn && turn.closest && turn.closest('.turn.assistant')) window.__updates.push(performance.now());
          }
        }).observe(document, {subtree: true, childList: true, characterData: true});"""
    )
    page.goto(f"{grounded.base_url}/ui/chat")
    page.fill("#key", OWNER)
    page.dispatch_event("#key", "change")
    page.wait_for_selector('#ground option[value="photos"]', state="attached")
    page.wait_for_selector(f'#model option[value="{MODEL}"]', state="attached")
    page.select_option("#ground", "photos")
    page.fill("#ground-k", "3")
    page.check("#ground-images")
    page.fill("#message", "Which of my photos shows a red square?")
    page.fill("#max", "600")
    page.fill("#params", '{"ignore_eos": true, "temperature": 0}')
    page.click("#send")
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text))
    try:
        page.wait_for_selector(".sources", timeout=120_000)  # the stream's last chunk has arrived
    except Exception:
        raise AssertionError(f"{page.inner_html('#log')[:2000]} {page.inner_text('#status')} {errors}") from None
    page.wait_for_selector("#stop[disabled]", state="attached", timeout=30_000)
    updates = page.evaluate("window.__updates")
    assert page.inner_text(".turn.assistant").strip(), "the answer is in the page"
    assert len(updates) >= 3, f"the answer grew in steps as chunks arrived, not at once ({len(updates)} updates)"
    assert updates[-1] - updates[0] > 0, "the updates came at different times"
    thumbnails = page.query_selector_all(".sources img.source")
    assert len(thumbnails) == 3, "the three image hits' thumbnails are shown above the answer"
    assert all((t.get_attribute("src") or "").startswith("data:image/jpeg") for t in thumbnails)
    page.screenshot(path=str(log_dir / "ui-chat-grounded.png"))
    if os.environ.get("UPDATE_SCREENSHOTS"):  # the README's picture: `UPDATE_SCREENSHOTS=1 scripts/test -k page`
        page.screenshot(path=str(Path(__file__).resolve().parents[2] / "docs" / "chat-page.png"))
