"""The call inspector's HTTP side: the JSON behind its pages, the pages, access, and
``voicebot calls show``'s waterfall (tests/test_browser.py drives the pages in Chromium)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bot.audio import FRAME_SECONDS
from bot.calllog import CallLog
from bot.inspector import Inspector
from bot.recording import RECORDING_FILE, Recorder
from bot.tools.subserver import free_port
from bot.web import folder_live

ROOT = Path(__file__).resolve().parent.parent
MARKS = {
    "speech_end": 0.0,
    "endpoint": 310.0,
    "stt_done": 402.0,
    "llm_first_token": 540.0,
    "first_clause": 611.0,
    "tts_first_audio": 702.0,
    "first_frame_out": 715.0,
}


def a_call(root: Path, call_id: str, *, ended: bool = True, seconds: float = 3.0) -> Path:
    """A call's folder as the bot writes it: its log, and a recording of ``seconds``."""
    log = CallLog(root, call_id)
    log.event("call_start", uuid=call_id, peer="127.0.0.1:5000", profile="assistant")
    log.event("greeting", text="Hello! How can I help you today?")
    log.event(
        "turn",
        index=0,
        at_s=1.2,
        transcript="What are your opening hours on Saturday?",
        reply="Saturday 10 am to 4 pm.",
        marks_ms=MARKS,
        interrupted=False,
    )
    log.event("barge_in", dropped_ms=400)
    rec = Recorder(log.folder / RECORDING_FILE, 8000, 0.0)
    frame = int(8000 * FRAME_SECONDS)
    for i in range(int(seconds / FRAME_SECONDS)):
        sound = (np.sin(np.arange(frame) / 3) * 8000).astype("<i2").tobytes() if i % 10 else None
        rec.caller(i * FRAME_SECONDS, sound or bytes(frame * 2), 8000)
        rec.bot(i * FRAME_SECONDS, bytes(frame * 2), 8000)
    rec.close()
    if ended:
        log.close("caller hung up", duration=seconds)
    return log.folder


@asynccontextmanager
async def inspector(
    root: Path, live: Callable[[], dict[str, str]], *, host: str = "127.0.0.1", token: str = ""
) -> AsyncIterator[httpx.AsyncClient]:
    from aiohttp import web

    app = web.Application()
    Inspector(root, live, host=host, token=token).add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        await runner.cleanup()


def run(main: Any) -> None:
    asyncio.run(main())


def test_the_call_list_puts_live_calls_first_with_their_state(tmp_path: Path) -> None:
    old = a_call(tmp_path, "aaaa-old")
    live = a_call(tmp_path, "bbbb-live", ended=False)

    async def main() -> None:
        async with inspector(tmp_path, lambda: {live.name: "speaking"}) as web:
            rows = (await web.get("/api/calls")).json()
            assert [r["id"] for r in rows] == [live.name, old.name]
            assert rows[0]["live"] and rows[0]["state"] == "speaking"
            assert rows[1] | {"started": None} == {
                "id": old.name,
                "started": None,
                "profile": "assistant",
                "peer": "127.0.0.1:5000",
                "live": False,
                "state": None,
                "duration": 3.0,
                "turns": 1,
                "end": "caller hung up",
                "worst_ms": 715.0,
                "recording": True,
            }
            page = (await web.get("/")).text
            assert "<h1>Calls</h1>" in page and old.name in page

    run(main)


def test_a_call_s_data_turns_waterfall_timeline_waveform_and_recording(tmp_path: Path) -> None:
    folder = a_call(tmp_path, "cccc")

    async def main() -> None:
        async with inspector(tmp_path, dict) as web:
            data = (await web.get(f"/api/calls/{folder.name}")).json()
            [turn] = data["turns"]
            assert turn["at_s"] == 1.2 and turn["reply"] == "Saturday 10 am to 4 pm."
            assert [s["mark"] for s in turn["waterfall"]] == [m for m in MARKS if m != "speech_end"]
            events = [e["event"] for e in data["timeline"]]
            assert events == ["greeting", "barge_in", "call_end"]
            wave_ = (await web.get(f"/api/calls/{folder.name}/waveform")).json()
            assert wave_["seconds"] == 3.0 and len(wave_["left"]) == len(wave_["right"]) == 1200
            assert max(wave_["left"]) > 0.2 and max(wave_["right"]) == 0.0  # the bot was silent
            audio = await web.get(f"/calls/{folder.name}/call.wav", headers={"Range": "bytes=0-43"})
            assert audio.status_code == 206 and audio.content[:4] == b"RIFF"  # seekable
            page = (await web.get(f"/calls/{folder.name}")).text
            assert "Saturday 10 am to 4 pm." in page and "first frame out" in page
            assert page.count("class=step") == 6
            assert (await web.get("/calls/..%2Fetc")).status_code == 404
            assert (await web.get("/api/calls/nothing-here")).status_code == 404

    run(main)


def test_a_live_call_s_stream_follows_it_to_its_end(tmp_path: Path) -> None:
    folder = a_call(tmp_path, "dddd", ended=False)
    states = {folder.name: "listening"}

    async def main() -> None:
        async with (
            inspector(tmp_path, lambda: dict(states)) as web,
            web.stream("GET", f"/api/calls/{folder.name}/stream") as stream,
        ):
            seen: list[dict[str, Any]] = []
            async for line in stream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen.append(json.loads(line[6:]))
                if len(seen) == 1:
                    states[folder.name] = "speaking"
                elif len(seen) == 2:
                    states.clear()  # the call ends: its log gets call_end
                    events = folder / "events.jsonl"
                    with events.open("a") as fh:
                        fh.write(json.dumps({"t": 5.0, "event": "call_end", "reason": "x"}) + "\n")
            # The stream ends by itself once the call has.
            assert [d["summary"]["state"] for d in seen] == ["listening", "speaking", None]
            assert seen[-1]["summary"]["end"] == "x"

    run(main)


def test_off_loopback_the_inspector_needs_its_token(tmp_path: Path) -> None:
    a_call(tmp_path, "eeee")

    async def main() -> None:
        async with inspector(tmp_path, dict, host="0.0.0.0") as web:
            assert (await web.get("/api/calls")).status_code == 403
        async with inspector(tmp_path, dict, host="0.0.0.0", token="s3cret-token") as web:
            assert (await web.get("/api/calls")).status_code == 401
            bad = {"Authorization": "Bearer nope"}
            assert (await web.get("/api/calls", headers=bad)).status_code == 401
            ok = await web.get("/?token=s3cret-token")
            assert ok.status_code == 200 and web.cookies.get("voicebot_token") == "s3cret-token"
            assert (await web.get("/api/calls")).status_code == 200  # the cookie from now on

    run(main)


def test_a_folder_shows_calls_without_an_end_that_still_grow_as_live(tmp_path: Path) -> None:
    growing = a_call(tmp_path, "ffff", ended=False)
    a_call(tmp_path, "gggg")
    assert folder_live(tmp_path)() == {growing.name: "in progress"}


def test_calls_show_prints_each_turn_s_waterfall(tmp_path: Path) -> None:
    folder = a_call(tmp_path, "hhhh")
    out = subprocess.run(
        [sys.executable, "-m", "bot", "calls", "show", "hhhh", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert str(folder) in out
    assert "turn 0 at 1.20 s: 'What are your opening hours on Saturday?'" in out
    bars = [line for line in out.splitlines() if " ms  #" in line]
    assert len(bars) == 6
    # Bars grow with the time: the first frame out is the longest, 40 marks wide.
    assert bars[-1].startswith("  first frame out") and bars[-1].endswith("#" * 40)
    assert bars[0].count("#") == round(40 * 310 / 715)


def test_calls_web_serves_a_folder_of_calls_without_a_bot(tmp_path: Path) -> None:
    folder = a_call(tmp_path, "jjjj")
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "bot", "calls", "web", "--dir", str(tmp_path), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert web.stdout is not None
        assert web.stdout.readline().strip() == (
            f"call inspector for {tmp_path}/ on http://127.0.0.1:{port}/"
        )
        [row] = httpx.get(f"http://127.0.0.1:{port}/api/calls").json()
        assert row["id"] == folder.name and row["end"] == "caller hung up"
        assert "Saturday 10 am" in httpx.get(f"http://127.0.0.1:{port}/calls/{folder.name}").text
    finally:
        web.terminate()
        web.wait(10)
