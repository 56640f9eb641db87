"""The chat page in a real headless Chromium, against a real gateway in front of real vLLM replicas: an image and a
question stream back an answer, a second turn carries the first, Stop aborts the replica's request, and a wrong key
shows the gateway's own message."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import API_KEY, MODEL, Replica, wait_for
from tests.media_server import png_bytes
from tests.support import RunningGateway, wait_until


def _quiet_for(replicas: list[Replica], seconds: float) -> bool:
    before = sum(r.generated_tokens() for r in replicas)
    time.sleep(seconds)
    return sum(r.generated_tokens() for r in replicas) == before


def _finish(page: Any) -> None:
    """Wait for the turn the page is answering: its bubble appears as Stop enables, and Stop disables at the end."""
    page.wait_for_selector("#stop[disabled]", state="attached", timeout=120_000)


def test_chat_page_streams_answers_keeps_history_and_stops(
    gateway: RunningGateway, live_replicas: list[Replica], browser: Any, tmp_path: Path, log_dir: Path
) -> None:
    page = browser.new_page()
    sent: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None,
    )
    page.goto(f"{gateway.base_url}/ui/chat")
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector(f'#model option[value="{MODEL}"]', state="attached")

    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(96, 72, (200, 40, 40)))
    page.set_input_files("#images", str(photo))
    page.fill("#message", "What colour is this?")
    page.fill("#max", "8")
    page.click("#send")
    page.wait_for_selector(".turn.assistant", timeout=120_000)
    _finish(page)
    answers = page.query_selector_all(".turn.assistant")
    assert len(answers) == 1 and answers[0].inner_text().strip(), "the answer streamed into the page"
    assert page.query_selector(".turn.user img") is not None, "the attached image is shown in the turn"
    first = sent[0]
    assert first["stream"] is True and first["model"] == MODEL
    assert [p["type"] for p in first["messages"][0]["content"]] == ["text", "image_url"]

    page.fill("#message", "And in one word?")
    page.click("#send")
    page.wait_for_selector(".turn.assistant >> nth=1", timeout=120_000)
    _finish(page)
    roles = [m["role"] for m in sent[1]["messages"]]
    assert roles == ["user", "assistant", "user"], "the second turn carries the first"

    generated_before = sum(r.generated_tokens() for r in live_replicas)
    page.fill("#message", "Tell me a very long story.")
    page.fill("#max", "1500")
    page.fill("#params", '{"ignore_eos": true}')  # the random-weight model may otherwise stop at once
    page.click("#send")
    page.wait_for_selector(".turn.assistant >> nth=2", timeout=120_000)
    streaming = lambda: bool(page.inner_text(".turn.assistant >> nth=2").strip())  # noqa: E731
    assert wait_until(streaming, 60), "the long answer started streaming"
    page.click("#stop")
    page.wait_for_selector("#stop[disabled]", state="attached")
    assert page.inner_text("#status") == "Stopped."
    # Aborted upstream: the replica's token counter stops moving, well short of the 1,500 asked for.
    settled = wait_for(lambda: _quiet_for(live_replicas, 2.0), 30)
    assert settled, "the replica kept generating for a page that stopped"
    assert sum(r.generated_tokens() for r in live_replicas) - generated_before < 1500
    page.screenshot(path=str(log_dir / "ui-chat.png"))

    page.fill("#key", "sk-wrong")
    page.fill("#message", "hello")
    page.click("#send")
    page.wait_for_selector(".turn.error", timeout=30_000)
    assert "key" in page.inner_text(".turn.error").lower(), "the gateway's own message is shown"
