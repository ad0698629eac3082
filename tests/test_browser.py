"""The call inspector in a real browser: Debian's Chromium driven by Playwright, watching a
call placed with `voicebot call` against `voicebot serve` on the real default models."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.audio import float_to_pcm, write_wav
from bot.calllog import list_calls, read_call
from bot.engines.tts import PiperTts
from bot.tools.scenarios import phone_band
from bot.tools.subserver import free_port, server_process

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "What are your opening hours on Saturday?"

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    (sync_playwright is None or not os.path.exists(CHROMIUM)) and not os.environ.get("CI"),
    reason="needs Playwright (pip, the test extra) and Chromium (apt-get install chromium)",
)


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def question_wav(path: Path) -> Path:
    piper = PiperTts(progress=False)  # the caller: a voice other than the bot's
    audio = phone_band(np.concatenate(list(piper.synthesize(QUESTION))), piper.native_rate)
    write_wav(str(path), float_to_pcm(audio), 8000)
    return path


def test_a_call_shows_up_live_then_with_its_recording_and_waterfall(
    page: Page, tmp_path: Path
) -> None:
    wav = question_wav(tmp_path / "question.wav")
    http = free_port()
    env = {"VOICEBOT_CALLS_DIR": str(tmp_path / "calls"), "VOICEBOT_HTTP_PORT": str(http)}
    with server_process("assistant", env) as (port, _):
        page.goto(f"http://127.0.0.1:{http}/")
        page.wait_for_selector("text=Calls")
        assert page.locator("#rows tr").count() == 0
        caller = subprocess.Popen(
            [sys.executable, "-m", "bot", "call", f"127.0.0.1:{port}", str(wav)]
            + ["--greeting-wait", "8", "--quiet", "1.5", "--answer-timeout", "20"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # Live: the call appears at the top with its state, which changes as it goes (the
            # page records each state it shows).
            page.evaluate(
                "window.seen = []; new MutationObserver(() => {"
                " const c = document.querySelector('#rows tr.live td.status');"
                " if (c && window.seen.at(-1) !== c.textContent) window.seen.push(c.textContent);"
                " }).observe(document.getElementById('rows'), {childList: true, subtree: true});"
            )
            page.wait_for_selector("#rows tr.live", timeout=20_000)
            assert caller.wait(60) == 0, caller.stdout.read() if caller.stdout else ""
        finally:
            caller.kill()
        # Ended: the same row, no longer live, with its end reason.
        page.wait_for_selector("#rows tr:not(.live) >> text=caller hung up", timeout=10_000)
        seen = page.evaluate("window.seen")
        assert len(seen) >= 3 and "listening" in seen, seen  # e.g. greeting, listening, speaking
        [folder] = list_calls(tmp_path / "calls")
        end = read_call(folder).end
        assert end is not None
        page.click(f"text={folder.name}")
        page.wait_for_selector("h1:has-text('Call')")
        check_call_page(page, end, read_call(folder).events)


def check_call_page(page: Page, end: dict[str, Any], events: list[dict[str, Any]]) -> None:
    [turn] = [e for e in events if e["event"] == "turn"]
    section = page.locator(".turn").first
    assert "saturday" in str(section.text_content()).lower()
    assert section.locator(".step").count() == 6  # the waterfall, end of turn to first frame
    assert section.locator(".step .ms").last.text_content() == (
        f"{turn['marks_ms']['first_frame_out']:.0f} ms"
    )
    # The recording loads in the player with the call's length.
    page.wait_for_function("document.getElementById('audio').readyState >= 1", timeout=10_000)
    duration = page.evaluate("document.getElementById('audio').duration")
    assert duration == pytest.approx(end["recording_s"], abs=0.05)
    # The waveform is drawn (both channels have sound: the question, the greeting and answer).
    drawn = page.evaluate(
        "(() => { const c = document.getElementById('wave');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; })()"
    )
    assert drawn > 1000
    # Clicking the turn plays the recording from the turn's place in it.
    section.click()
    page.wait_for_function("!document.getElementById('audio').paused", timeout=5_000)
    at = page.evaluate("document.getElementById('audio').currentTime")
    assert turn["at_s"] - 0.05 <= at <= turn["at_s"] + 1.0
