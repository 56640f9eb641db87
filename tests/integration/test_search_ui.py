"""The /ui search page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.cli import main as cli_main
from tests.media_server import png_bytes
from tests.support import SEARCH_BACKENDS, RunningGateway, run_gateway, search_settings, write_config

KEY = "sk-ui-admin"
COLOURS = {"red.png": (230, 20, 20), "green.png": (20, 200, 40), "blue.png": (20, 40, 230), "grey.png": (128,) * 3}


@pytest.fixture(scope="module", params=SEARCH_BACKENDS)
def gateway(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, request: pytest.FixtureRequest
) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("ui")
    config = write_config(
        root / "g.yaml",
        [],
        api_keys=[KEY],
        embeddings={"clip_model": "tiny-random"},
        search=search_settings(root, request.param),
    )
    photos = root / "photos"
    photos.mkdir()
    for name, colour in COLOURS.items():
        (photos / name).write_bytes(png_bytes(96, 72, colour))
    (photos / "captions.csv").write_text("red.png,a bright red square\n")
    with run_gateway(["--config", str(config)], log_dir) as running:
        running.wait_for_encoder()
        cli_main(
            [
                "index",
                "add",
                str(photos),
                "--collection",
                "photos",
                "--url",
                running.base_url,
                "--api-key",
                KEY,
                "--captions",
                str(photos / "captions.csv"),
            ]
        )
        yield running


def test_text_and_image_search_from_the_page(
    gateway: RunningGateway, browser: object, tmp_path: Path, log_dir: Path
) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{gateway.base_url}/ui")
    page.fill("#key", KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#collection option", state="attached")  # selectors, not eval: the page's CSP forbids it
    assert page.inner_text("#collection") == "photos (5)"  # 4 images + 1 caption item
    page.fill("#text", "a bright red square")
    page.click("#go")
    page.wait_for_selector(".card")
    cards = page.query_selector_all(".card")
    assert len(cards) == 5
    assert cards[0].get_attribute("data-id") == "red.png#caption"
    assert "results in" in page.inner_text("#status")
    query_image = tmp_path / "query.png"
    query_image.write_bytes(png_bytes(96, 72, COLOURS["blue.png"]))
    page.fill("#text", "")
    page.set_input_files("#image", str(query_image))
    page.click("#go")
    page.wait_for_selector('#results > .card:first-child[data-id="blue.png"]')
    first = page.query_selector(".card")
    assert first is not None and first.query_selector("img") is not None, "image hits show their thumbnail"
    page.screenshot(path=str(log_dir / "ui-search.png"))


def test_a_wrong_key_shows_the_gateway_error(gateway: RunningGateway, browser: object) -> None:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.goto(f"{gateway.base_url}/ui")
    page.evaluate("localStorage.clear()")
    page.fill("#key", "sk-wrong")
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#status.error")
    assert "Incorrect or missing API key" in page.inner_text("#status")


def test_both_pages_and_their_assets_carry_the_security_headers(gateway: RunningGateway) -> None:
    assets = [f"/ui/assets/{name}" for name in ("ui.css", "common.js", "search.js", "chat.js")]
    for path in ("/ui", "/ui/chat", *assets):
        response = httpx.get(f"{gateway.base_url}{path}")
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "img-src 'self' data:" in policy and "default-src 'none'" in policy
        assert response.headers["x-frame-options"] == "DENY"
    pages = {path: httpx.get(f"{gateway.base_url}{path}").text for path in ("/ui", "/ui/chat")}
    assert 'href="/ui/chat"' in pages["/ui"] and 'href="/ui"' in pages["/ui/chat"], "each page links the other"
    assert "<script>" not in "".join(pages.values()) and "style=" not in "".join(pages.values()), "nothing inline"
    for probe in ("../search.html", "chat.html", "..%2Fconfig.py", "nope.js"):
        refused = httpx.get(f"{gateway.base_url}/ui/assets/{probe}")
        assert refused.status_code == 404 and refused.json()["error"]["code"], probe
