"""The call inspector: pages for reading calls, served by ``voicebot serve`` on its HTTP side
port and by ``voicebot calls web`` on a folder of call logs.

- ``/``: the calls, live ones first with their state, then recent ones; filterable; live
  updates over server-sent events (``/api/stream``).
- ``/calls/ID``: one call: the waveform of both channels with each turn marked, the recording
  in an audio player that seeks to a turn when it is clicked, each turn's waterfall of latency
  marks, its words and reply, and what happened on the timeline; a live call's page follows it
  (``/api/calls/ID/stream``).
- ``/api/calls``, ``/api/calls/ID``, ``/api/calls/ID/waveform``, ``/calls/ID/call.wav``: the data
  behind the pages.

Server-rendered HTML with a little JavaScript, no build step. Off loopback the pages need
``[http] token`` (a ``?token=`` once, then a cookie, or ``Authorization: Bearer``); with none
set they refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from . import callview
from .calllog import EVENTS_FILE, read_call
from .recording import RECORDING_FILE

Live = Callable[[], dict[str, str]]  # live calls: folder name -> state
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
POLL_S: Final = 0.25  # how often a stream looks for news
COOKIE: Final = "voicebot_token"
LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


class Inspector:
    def __init__(self, root: Path, live: Live, *, host: str, token: str = "") -> None:
        self.root = root
        self.live = live
        self.token = token
        self.local = host in LOOPBACK
        self._closing = asyncio.Event()
        self._rows: callview.Cache = {}

    def add_routes(self, app: web.Application) -> None:
        routes = {
            "/": self._list_page,
            "/calls/{id}": self._call_page,
            "/calls/{id}/call.wav": self._recording,
            "/api/calls": self._api_calls,
            "/api/calls/{id}": self._api_call,
            "/api/calls/{id}/waveform": self._api_waveform,
            "/api/stream": self._list_stream,
            "/api/calls/{id}/stream": self._call_stream,
        }
        for path, handler in routes.items():
            app.router.add_get(path, self._guarded(handler))
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, _: web.Application) -> None:
        self._closing.set()  # open streams end

    # --- access --------------------------------------------------------------------------------

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            given = request.query.get("token") or request.cookies.get(COOKIE) or ""
            bearer = request.headers.get("Authorization", "")
            if bearer.startswith("Bearer "):
                given = bearer[7:]
            if self.token and not hmac.compare_digest(given, self.token):
                raise web.HTTPUnauthorized(text="the call inspector needs [http] token\n")
            if not self.token and not self.local:
                raise web.HTTPForbidden(
                    text="the call inspector is off loopback only with [http] token set\n"
                )
            response = await handler(request)
            if self.token and request.query.get("token"):
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
            return response

        return guarded

    def _folder(self, request: web.Request) -> Path:
        name = request.match_info["id"]
        folder = self.root / name
        if "/" in name or name.startswith(".") or not (folder / EVENTS_FILE).is_file():
            raise web.HTTPNotFound(text=f"no call {name}\n")
        return folder

    # --- data ----------------------------------------------------------------------------------

    def _calls(self) -> list[dict[str, Any]]:
        return callview.summaries(self.root, self.live(), cache=self._rows)

    def _call(self, folder: Path) -> dict[str, Any]:
        record = read_call(folder)
        return {
            "summary": callview.summary(record, self.live().get(folder.name)),
            "turns": callview.turns(record),
            "timeline": callview.timeline(record),
        }

    async def _api_calls(self, _: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._calls))

    async def _api_call(self, request: web.Request) -> web.Response:
        folder = self._folder(request)
        return web.json_response(await asyncio.to_thread(self._call, folder))

    async def _api_waveform(self, request: web.Request) -> web.Response:
        wav = self._folder(request) / RECORDING_FILE
        if not wav.is_file():
            raise web.HTTPNotFound(text="this call has no recording\n")
        return web.json_response(await asyncio.to_thread(callview.waveform, wav))

    async def _recording(self, request: web.Request) -> web.StreamResponse:
        wav = self._folder(request) / RECORDING_FILE
        if not wav.is_file():
            raise web.HTTPNotFound(text="this call has no recording\n")
        return web.FileResponse(wav, headers={"Content-Type": "audio/wav"})

    # --- live ----------------------------------------------------------------------------------

    async def _list_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, lambda: {"calls": self._calls()}, lambda _: False)

    async def _call_stream(self, request: web.Request) -> web.StreamResponse:
        folder = self._folder(request)
        return await self._stream(
            request,
            lambda: self._call(folder),
            lambda data: not data["summary"]["live"] and data["summary"]["end"] is not None,
        )

    async def _stream(
        self,
        request: web.Request,
        snapshot: Callable[[], dict[str, Any]],
        final: Callable[[dict[str, Any]], bool],
    ) -> web.StreamResponse:
        """Server-sent events: the snapshot each time it changes, until ``final`` says the
        story is over, the page goes away or the server stops."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        last = ""
        while not self._closing.is_set():
            data = await asyncio.to_thread(snapshot)
            text = json.dumps(data)
            if text != last:
                try:
                    await response.write(f"data: {text}\n\n".encode())
                except (ConnectionResetError, RuntimeError):
                    break
                last = text
            if final(data):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), POLL_S)
        return response

    # --- pages ---------------------------------------------------------------------------------

    async def _list_page(self, _: web.Request) -> web.Response:
        rows = await asyncio.to_thread(self._calls)
        body = LIST_PAGE.replace("__ROWS__", json.dumps(rows).replace("</", "<\\/"))
        return web.Response(text=page("Calls", body), content_type="text/html")

    async def _call_page(self, request: web.Request) -> web.Response:
        folder = self._folder(request)
        data = await asyncio.to_thread(self._call, folder)
        s = data["summary"]
        turns = "".join(turn_html(t) for t in data["turns"]) or "<p>No turns yet.</p>"
        events = "".join(
            f"<tr><td>{e['t']:.2f} s</td><td>{esc(e['event'])}</td>"
            f"<td>{esc(json.dumps(e['detail']))}</td></tr>"
            for e in data["timeline"]
        )
        body = (
            CALL_PAGE.replace("__ID__", esc(s["id"]))
            .replace("__HEAD__", call_head(s))
            .replace("__TURNS__", turns)
            .replace("__EVENTS__", events)
            .replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
        )
        return web.Response(text=page(s["id"], body), content_type="text/html")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def call_head(s: dict[str, Any]) -> str:
    state = f"live: <b id=state>{esc(s['state'])}</b>" if s["live"] else f"ended: {esc(s['end'])}"
    worst = "-" if s["worst_ms"] is None else f"{s['worst_ms']:.0f} ms"
    return (
        f"<p>{esc(s['started'])} &middot; profile {esc(s['profile'])} &middot; "
        f"{float(s['duration']):.1f} s &middot; {s['turns']} turns &middot; worst answer {worst} "
        f"&middot; <span id=status>{state}</span></p>"
    )


def turn_html(t: dict[str, Any]) -> str:
    """A turn: its words and reply, and its waterfall (each stage a bar from the one before)."""
    steps = t["waterfall"]
    most = max((s["ms"] for s in steps), default=0.0) or 1.0
    bars, before = [], 0.0
    for s in steps:
        left, width = (
            max(0.0, before) / most * 100,
            max(0.5, (s["ms"] - max(0.0, before)) / most * 100),
        )
        bars.append(
            f"<div class=step data-mark={esc(s['mark'])}><span class=label>{esc(s['label'])}</span>"
            f"<span class=track><span class=bar style='margin-left:{left:.1f}%;width:{width:.1f}%'>"
            f"</span></span><span class=ms>{s['ms']:.0f} ms</span></div>"
        )
        before = max(before, s["ms"])
    at = "" if t["at_s"] is None else f" data-at='{t['at_s']}'"
    flags = " (interrupted)" if t["interrupted"] else ""
    flags += " (asked again)" if t["asked_again"] else ""
    when = "" if t["at_s"] is None else f" at {t['at_s']:.2f} s"
    return (
        f"<section class=turn{at}><h3>Turn {esc(t['index'])}{when}{flags}</h3>"
        f"<p class=said>Caller: {esc(t['transcript'])}</p><p class=reply>Bot: {esc(t['reply'])}</p>"
        f"<div class=waterfall>{''.join(bars) or '<i>no answer on the line</i>'}</div></section>"
    )


def page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{esc(title)} - voicebot</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )


STYLE: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}td,th{padding:.3em .6em;border-bottom:1px solid #ddd;
text-align:left}tr.live{background:#eef8ee}a{color:#0645ad}input{padding:.3em;width:20em}
canvas{width:100%;height:160px;border:1px solid #ccc;cursor:pointer}
.turn{border-left:3px solid #88a;padding:.2em .8em;margin:1em 0;cursor:pointer}
.step{display:flex;align-items:center;gap:.5em}.label{width:9em}.ms{width:5em;text-align:right}
.track{flex:1;background:#f3f3f3;height:.9em}.bar{display:block;height:100%;background:#58a}
.said{margin:.2em 0}.reply{margin:.2em 0;color:#264}
"""

LIST_PAGE: Final = """
<h1>Calls</h1>
<p><input id=filter placeholder="filter: profile, reason, state, id"> <span id=count></span></p>
<table><thead><tr><th>call</th><th>started</th><th>profile</th><th>state / end</th>
<th>duration</th><th>turns</th><th>worst answer</th></tr></thead><tbody id=rows></tbody></table>
<script>
let calls = __ROWS__;
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
function render() {
  const needle = document.getElementById("filter").value.toLowerCase();
  const body = document.getElementById("rows");
  body.replaceChildren();
  let shown = 0;
  for (const c of calls) {
    const status = c.live ? c.state : (c.end || "cut off");
    const text = [c.id, c.profile, status, c.started].join(" ").toLowerCase();
    if (needle && !text.includes(needle)) continue;
    const tr = document.createElement("tr");
    tr.className = c.live ? "live" : "";
    tr.dataset.id = c.id;
    const link = document.createElement("a");
    link.href = "calls/" + encodeURIComponent(c.id) + q;
    link.textContent = c.id;
    const first = document.createElement("td");
    first.append(link);
    tr.append(first, cell(c.started || "-"), cell(c.profile || "-"), cell(status),
      cell(Number(c.duration).toFixed(1) + " s"), cell(c.turns),
      cell(c.worst_ms == null ? "-" : Math.round(c.worst_ms) + " ms"));
    tr.querySelector("td:nth-child(4)").className = "status";
    body.append(tr);
    shown++;
  }
  document.getElementById("count").textContent = shown + " of " + calls.length;
}
document.getElementById("filter").addEventListener("input", render);
render();
const updates = new EventSource("api/stream" + q);
updates.onmessage = (e) => { calls = JSON.parse(e.data).calls; render(); };
</script>
"""

CALL_PAGE: Final = """
<p><a href="../">&larr; calls</a></p>
<h1>Call __ID__</h1>
__HEAD__
<canvas id=wave width=1200 height=160 title="caller above, bot below; click to play from there">
</canvas>
<p><audio id=audio controls preload=metadata src="__ID__/call.wav"></audio>
<small>caller: left channel (above), bot: right channel (below); red: a turn's end,
orange: a barge-in, transfer or error</small></p>
<h2>Turns</h2>
<div id=turns>__TURNS__</div>
<h2>Timeline</h2>
<table><tbody>__EVENTS__</tbody></table>
<script>
const data = __DATA__;
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const audio = document.getElementById("audio");
if (q) audio.src = audio.getAttribute("src") + q;
const canvas = document.getElementById("wave");
let seconds = data.summary.duration;
function draw(wave) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height, mid = h / 2;
  g.clearRect(0, 0, w, h);
  const sides = [[wave.left, "#3b6ea5", -1], [wave.right, "#3a8a4a", 1]];
  for (const [peaks, color, dir] of sides) {
    g.fillStyle = color;
    peaks.forEach((p, i) => {
      const x = i / peaks.length * w, y = p * (mid - 4);
      g.fillRect(x, dir < 0 ? mid - y : mid, Math.max(1, w / peaks.length), y);
    });
  }
  g.fillStyle = "#c33";  // turns: where the caller's words ended
  for (const t of data.turns) {
    if (t.at_s == null || !seconds) continue;
    g.fillRect(t.at_s / seconds * w, 0, 2, h);
  }
  g.fillStyle = "#e80";  // barge-ins, transfers, errors: a tick at the top
  for (const e of data.timeline) {
    if (["greeting", "call_end", "dtmf"].includes(e.event) || !seconds) continue;
    g.fillRect(e.t / seconds * w - 1, 0, 3, 14);
  }
}
fetch("../api/calls/" + encodeURIComponent(data.summary.id) + "/waveform" + q)
  .then((r) => r.ok ? r.json() : null)
  .then((wave) => { if (wave) { seconds = wave.seconds; draw(wave); } });
function play(at) { audio.currentTime = at; audio.play(); }
canvas.addEventListener("click", (e) => {
  const r = canvas.getBoundingClientRect();
  play((e.clientX - r.left) / r.width * seconds);
});
for (const el of document.querySelectorAll(".turn[data-at]")) {
  el.addEventListener("click", () => play(Number(el.dataset.at)));
}
if (data.summary.live) {
  const stream = new EventSource("../api/calls/" + encodeURIComponent(data.summary.id) +
                                 "/stream" + q);
  stream.onmessage = (e) => {
    const now = JSON.parse(e.data);
    const state = document.getElementById("state");
    if (now.summary.live && state) state.textContent = now.summary.state;
    if (!now.summary.live || now.turns.length !== data.turns.length) {
      stream.close();
      location.reload();
    }
  };
}
</script>
"""
