"""``voicebot``: serve calls, place simulated calls, measure, and read call logs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from pathlib import Path
from typing import Any

from . import __version__, config
from .audio import read_wav, write_wav
from .calllog import CallRecord, list_calls, read_call, render_summary
from .tools.simulator import CallerSimulator, DtmfAt

log = logging.getLogger("voicebot")

EXIT_USAGE = 2


def _die(message: str, code: int = EXIT_USAGE) -> None:
    print(f"voicebot: {message}", file=sys.stderr)
    raise SystemExit(code)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]") or "127.0.0.1", int(port)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# --- serve --------------------------------------------------------------------------------------


def _load_settings(args: argparse.Namespace) -> config.Settings:
    env = dict(os.environ)
    for flag, var in (("host", "HOST"), ("port", "PORT"), ("profile", "PROFILE")):
        value = getattr(args, flag, None)
        if value is not None:
            env[f"VOICEBOT_SERVER_{var}"] = str(value)
    try:
        return config.load(args.config, env)
    except config.ConfigError as exc:
        _die(f"configuration error: {exc}")
        raise  # unreachable


async def _serve(settings: config.Settings) -> None:
    from .app import Bot, load_assets
    from .engines import EngineError

    s = settings.server
    try:
        # Every engine is loaded and warmed before the server says it is ready.
        assets = await load_assets(settings, lambda m: print(m, file=sys.stderr, flush=True))
    except EngineError as exc:
        _die(f"cannot start: {exc}", 1)
    bot = Bot(settings, assets)
    try:
        await bot.start()
    except OSError as exc:
        await bot.close()
        _die(f"cannot listen on {s.host}: {exc.strerror or exc}", 1)
    except Exception as exc:  # an Asterisk link that cannot log in (AmiError), for one
        await bot.close()
        _die(f"cannot start: {exc}", 1)
    side = await _side_port(bot, settings)
    where = ", ".join(
        f"{profile} on {server.address[0]}:{server.address[1]}"
        for profile, server in bot.servers.items()
    )
    links = "".join(f", {link.name.upper()} linked" for link in bot.links)
    http = f", HTTP on {side.address[0]}:{side.address[1]}" if side and side.address else ""
    print(
        f"voicebot {__version__} ready: AudioSocket {where}{links}{http}, "
        f"call logs in {settings.calls.dir}/",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _write_stats, bot, settings)
    await stop.wait()
    grace = settings.limits.shutdown_grace
    log.warning(
        "shutting down: no new calls; %d call(s) in progress get up to %g s",
        bot.calls_in_progress,
        grace,
    )
    # A second signal ends the calls in progress at once.
    stop.clear()
    closing = asyncio.create_task(bot.close(grace))
    second = asyncio.create_task(stop.wait())
    await asyncio.wait([closing, second], return_when=asyncio.FIRST_COMPLETED)
    if not closing.done():
        log.warning("second signal: ending %d call(s) now", bot.calls_in_progress)
        bot.end_calls()
        await closing
    second.cancel()
    if side is not None:
        await side.close()
    log.info("stopped")


async def _side_port(bot: Any, settings: config.Settings) -> Any:
    """The HTTP side port, listening (None when ``[http] enabled`` is false)."""
    from .web import SidePort

    if not settings.http.enabled:
        return None
    side = SidePort(bot, settings.http)
    try:
        await side.start()
    except OSError as exc:
        await bot.close()
        h = settings.http
        _die(f"cannot listen on {h.host}:{h.port} (http.port): {exc.strerror or exc}", 1)
    return side


STATS_FILE = "server-stats.json"


def _write_stats(bot: Any, settings: config.Settings) -> None:
    """SIGUSR1: the process's health (calls, tasks, threads, fds, memory) into the log and
    ``<calls dir>/server-stats.json`` (what ``voicebot bench soak`` samples)."""
    stats = bot.stats()
    log.info("stats: %s", " ".join(f"{k}={v}" for k, v in stats.items()))
    path = Path(settings.calls.dir) / STATS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**stats, "at": time.time()}))
    tmp.replace(path)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    asyncio.run(_serve(settings))
    return 0


# --- call ---------------------------------------------------------------------------------------


def cmd_call(args: argparse.Namespace) -> int:
    rate = 16000 if args.slin16 else 8000
    try:
        turns = [read_wav(path, rate) for path in args.wav]
        dtmf = [DtmfAt.parse(d) for d in args.dtmf]
    except (OSError, ValueError) as exc:
        _die(str(exc))
    if not turns and not dtmf and args.duration is None:
        _die("nothing to do: give WAV turns, --dtmf or --duration")
    host, port = args.target
    sim = CallerSimulator(
        host,
        port,
        turns,
        rate=rate,
        call_uuid=uuid_mod.UUID(args.uuid) if args.uuid else None,
        dtmf=dtmf,
        greeting_wait=args.greeting_wait,
        quiet=args.quiet,
        answer_timeout=args.answer_timeout,
        duration=args.duration,
        record=args.record is not None,
    )
    try:
        report = asyncio.run(sim.run())
    except OSError as exc:
        _die(f"cannot call {host}:{port}: {exc.strerror or exc}", 1)
    if args.record:
        write_wav(args.record, bytes(sim.received), rate)
    if args.json:
        out = report.as_dict()
        out.pop("rx_frame_sizes", None)
        print(json.dumps(out, indent=2))
    else:
        print(
            f"call {report.uuid} at {rate} Hz: {report.duration:.2f} s, ended by "
            f"{report.ended_by}; sent {report.frames_sent} frames, received "
            f"{report.frames_received} ({report.voiced_frames_received} with sound)"
        )
        for t in report.turns:
            lat = (
                "no answer"
                if t.response_latency_ms is None
                else f"answered after {t.response_latency_ms:.0f} ms"
            )
            print(
                f"  turn {t.index + 1}: speech {t.speech_start:.2f}-{t.speech_end:.2f} s, "
                f"{lat}, reply {t.reply_seconds:.2f} s"
            )
        if report.rx_interval_ms:
            iv = report.rx_interval_ms
            print(
                f"  bot frame spacing: p50 {iv['p50']:.1f} ms, p99 {iv['p99']:.1f} ms, "
                f"max {iv['max']:.1f} ms"
            )
        if args.record:
            print(f"  bot audio recorded to {args.record}")
    return 0 if not report.ended_by.startswith("error") else 1


# --- calls --------------------------------------------------------------------------------------


def cmd_calls(args: argparse.Namespace) -> int:
    root = Path(args.dir or _load_settings(args).calls.dir)
    if args.action == "show":
        if not args.id:
            _die("calls show: give a call id (a UUID, its start, or a folder name)")
        matches = [p for p in list_calls(root) if args.id in p.name]
        if not matches:
            _die(f"no call matching {args.id!r} in {root}", 1)
        record = read_call(matches[0])
        if args.json:
            print(json.dumps(record.events, indent=2))
        else:
            print(f"{record.folder}")
            print(render_summary(record.events), end="")
            print(_waterfalls(record), end="")
        return 0
    if args.action == "web":
        return _calls_web(root, args.host, args.port, _load_settings(args).http.token)
    rows = []
    for folder in list_calls(root):
        rec = read_call(folder)
        end = rec.end or {}
        rows.append(
            {
                "id": folder.name,
                "peer": rec.start.get("peer"),
                "profile": rec.start.get("profile"),
                "duration": end.get("duration"),
                "end": end.get("reason", "(in progress or crashed)"),
            }
        )
        if len(rows) >= args.limit:
            break
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no calls in {root}")
    for r in [] if args.json else rows:
        dur = "-" if r["duration"] is None else f"{r['duration']:.1f}s"
        print(f"{r['id']}  {r['profile'] or '-':<8} {dur:>7}  {r['end']}")
    return 0


def _waterfalls(record: CallRecord) -> str:
    """Each turn's latency marks as text bars (ms after the caller's last word)."""
    from .callview import turns, waterfall_text

    lines = []
    for turn in turns(record):
        when = "" if turn["at_s"] is None else f" at {turn['at_s']:.2f} s"
        lines.append(f"\nturn {turn['index']}{when}: {turn['transcript']!r} -> {turn['reply']!r}")
        lines += waterfall_text(turn)
    return "\n".join(lines) + ("\n" if lines else "")


def _calls_web(root: Path, host: str, port: int, token: str) -> int:
    """The call inspector on a folder of call logs, no bot needed; Ctrl-C stops it."""
    from .web import serve_folder

    try:
        asyncio.run(serve_folder(root, host, port, token))
    except OSError as exc:
        _die(f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        pass
    return 0


# --- models and doctor --------------------------------------------------------------------------


def cmd_check_asterisk(args: argparse.Namespace) -> int:
    from .asterisk.astconf import lint

    compose = _compose_environment(args.compose) if args.compose else {}
    try:
        settings = config.load(args.config, {**compose, **os.environ})
    except config.ConfigError as exc:
        _die(f"configuration error: {exc}")
    ports = [port for _profile, port in _listeners(settings)]
    try:
        problems = lint(
            Path(args.dir), bot_host=args.bot_host, bot_ports=ports, profiles=settings.profiles
        )
    except (OSError, ValueError) as exc:
        _die(str(exc))
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{args.dir}: fine (bot at {args.bot_host}, ports {', '.join(map(str, ports))})")
    return 0


def _compose_environment(path: str) -> dict[str, str]:
    """The voicebot service's VOICEBOT_* settings in a compose file (secrets as placeholders):
    the profiles and ports the shipped stack runs with."""
    import yaml

    try:
        compose = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        env = compose["services"]["voicebot"].get("environment") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        _die(f"{path}: no voicebot service environment to read ({exc})")
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env if "=" in item)
    return {
        str(k): "set-by-compose" if "${" in str(v) else str(v)
        for k, v in env.items()
        if str(k).startswith(config.ENV_PREFIX)
    }


def _listeners(settings: config.Settings) -> list[tuple[str, int]]:
    from .app import Bot

    return Bot(settings).listeners()


def cmd_originate(args: argparse.Namespace) -> int:
    from .asterisk.ami import AmiError, AmiLink

    settings = _load_settings(args)
    if not settings.ami.secret:
        _die("ami.secret: set VOICEBOT_AMI_SECRET (manager.conf's secret for [ami] username)")

    async def main() -> str:
        link = AmiLink(settings.ami)
        try:
            await link.connect()
            return await link.originate(
                args.endpoint,
                context=args.context,
                extension=args.extension or args.profile,
                caller_id=args.caller_id,
            )
        finally:
            link.close()

    try:
        message = asyncio.run(main())
    except AmiError as exc:
        _die(str(exc), 1)
    print(f"{args.endpoint}: {message}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    print(config.reference())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .engines import ModelUnavailable, models
    from .tools.doctor import models_report

    if args.action == "install":
        if not args.names:
            _die(f"models install: name a pack ({', '.join(models.PACKS)}) or models")
        try:
            models.install(args.names)
        except ModelUnavailable as exc:
            _die(str(exc))
        except subprocess.CalledProcessError as exc:
            _die(f"pip failed (exit {exc.returncode})", 1)
        return 0
    settings = _load_settings(args)
    rows = models_report(settings)
    if args.json:
        print(json.dumps({"pack": settings.models.pack, "engines": rows}, indent=2))
    else:
        print(f"model pack: {settings.models.pack}")
        for r in rows:
            size = f"{r['size'] / 1e6:.0f} MB" if r.get("size") else "-"
            print(
                f"  {r['engine']}: {r['model']} [{r.get('source', '-')}] {size}, "
                f"sha256 {str(r.get('sha256') or '-')[:16]}: {r['status']}"
            )
            if r.get("path"):
                print(f"       {r['path']}")
    return 0 if all(r["status"].startswith(("ok", "downloads")) for r in rows) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from .tools import doctor

    settings = _load_settings(args)
    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    report = doctor.run(settings, say)
    print(json.dumps(report, indent=2) if args.json else doctor.render(report))
    return 0 if report["ok"] else 1


# --- bench --------------------------------------------------------------------------------------


def _bench_quality(args: argparse.Namespace) -> int:
    from .tools import bench_quality

    env = {"VOICEBOT_CONFIG": args.config} if args.config else None
    known = {c.name: c for c in bench_quality.CONDITIONS}
    if unknown := [name for name in args.conditions if name not in known]:
        print(f"--conditions: unknown {', '.join(unknown)} (known: {', '.join(known)})")
        return 2
    chosen = [known[name] for name in args.conditions]
    result = bench_quality.run(chosen, concurrency=args.concurrency, env=env, progress=True)
    print(json.dumps(result, indent=2) if args.json else bench_quality.render(result))
    return 0


def _bench_calls(args: argparse.Namespace) -> int:
    from .tools import bench_calls

    env = {"VOICEBOT_CONFIG": args.config} if args.config else None
    calls = args.calls[0] if args.calls != [1, 20] else 8
    result = bench_calls.run(calls, args.concurrency, env=env, progress=True)
    print(json.dumps(result, indent=2) if args.json else bench_calls.render(result))
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from .tools import bench_soak

    env = {"VOICEBOT_CONFIG": args.config} if args.config else None
    result = bench_soak.run(
        args.calls[0] if args.calls != [1, 20] else 200,
        args.concurrency if args.concurrency != 1 else 4,
        profile=args.profile,
        env=env,
        progress=True,
    )
    print(json.dumps(result, indent=2) if args.json else bench_soak.render(result))
    return 0 if result["flat"] else 1


def _bench_engines(args: argparse.Namespace) -> int:
    from .tools import bench_engines

    results = bench_engines.run_all(_load_settings(args).models, progress=True)
    print(json.dumps(results, indent=2) if args.json else bench_engines.render(results))
    return 1 if any("error" in r for r in results) else 0


def _bench_pacing(args: argparse.Namespace) -> int:
    from .tools import bench_pacing

    results = bench_pacing.run(
        args.calls, args.seconds, calls_dir=args.calls_dir, progress=not args.json
    )
    print(json.dumps(results, indent=2) if args.json else bench_pacing.render(results))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    benches = {
        "calls": _bench_calls,
        "quality": _bench_quality,
        "soak": _bench_soak,
        "engines": _bench_engines,
        "pacing": _bench_pacing,
    }
    return benches[args.what](args)


# --- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)"
    )
    p = argparse.ArgumentParser(prog="voicebot", description=__doc__, parents=[common])
    p.add_argument("--version", action="version", version=f"voicebot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="answer AudioSocket calls from Asterisk")
    serve.add_argument("--config", help="TOML settings file (also VOICEBOT_CONFIG)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="AudioSocket port (default 9092)")
    serve.add_argument("--profile", help="profile of calls on --port (default assistant)")
    serve.set_defaults(func=cmd_serve)

    call = sub.add_parser(
        "call", parents=[common], help="place a simulated call, exactly as Asterisk would"
    )
    call.add_argument("target", type=_host_port, help="the bot's HOST:PORT")
    call.add_argument("wav", nargs="*", help="caller turns, one WAV each (16-bit PCM)")
    call.add_argument("--slin16", action="store_true", help="16 kHz (kind 0x12) instead of 8 kHz")
    call.add_argument(
        "--dtmf",
        action="append",
        default=[],
        metavar="DIGIT@SECONDS",
        help="send a DTMF digit at a time since the call started (repeatable)",
    )
    call.add_argument("--record", metavar="WAV", help="write everything the bot sent to a WAV")
    call.add_argument("--uuid", help="call UUID (default: random)")
    call.add_argument(
        "--greeting-wait",
        type=float,
        default=1.0,
        metavar="S",
        help="wait up to S seconds for a greeting before the first turn",
    )
    call.add_argument(
        "--quiet",
        type=float,
        default=0.8,
        metavar="S",
        help="the bot is done answering after S seconds of silence",
    )
    call.add_argument(
        "--answer-timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="a turn with no answer within S seconds counts as missed",
    )
    call.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="stay on the line S seconds from the start, then hang up",
    )
    call.add_argument("--json", action="store_true", help="machine-readable report")
    call.set_defaults(func=cmd_call)

    calls = sub.add_parser(
        "calls",
        parents=[common],
        help="list recent calls, show one call's timeline, or browse them (web)",
    )
    calls.add_argument("action", nargs="?", choices=["list", "show", "web"], default="list")
    calls.add_argument("id", nargs="?", help="with show: call UUID or folder name (or part)")
    calls.add_argument("--dir", help="call log folder (default from settings: calls/)")
    calls.add_argument("--config", help="TOML settings file")
    calls.add_argument("--limit", type=int, default=20)
    calls.add_argument("--json", action="store_true")
    calls.add_argument("--host", default="127.0.0.1", help="web: address (default 127.0.0.1)")
    calls.add_argument("--port", type=int, default=9181, help="web: port (default 9181; 0: any)")
    calls.set_defaults(func=cmd_calls)

    mdl = sub.add_parser(
        "models",
        parents=[common],
        help="show what each engine's model resolves to, or install a pack",
    )
    mdl.add_argument("action", nargs="?", choices=["list", "install"], default="list")
    mdl.add_argument(
        "names", nargs="*", help="with install: packs (default, fast, quality) or model names"
    )
    mdl.add_argument("--config", help="TOML settings file")
    mdl.add_argument("--json", action="store_true")
    mdl.set_defaults(func=cmd_models)

    settings_ref = sub.add_parser(
        "settings", parents=[common], help="every setting with its default and meaning (Markdown)"
    )
    settings_ref.set_defaults(func=cmd_settings)

    orig = sub.add_parser(
        "originate",
        parents=[common],
        help="make Asterisk call a phone and connect it to a bot profile (AMI)",
    )
    orig.add_argument("endpoint", help="what Asterisk dials, e.g. PJSIP/16")
    orig.add_argument("--profile", default="assistant", help="bot profile (default assistant)")
    orig.add_argument(
        "--context", default="voicebot-outbound", help="dialplan context (asterisk/extensions.conf)"
    )
    orig.add_argument("--extension", help="extension in --context (default: the profile's name)")
    orig.add_argument("--caller-id", default="Voicebot <Llama1>")
    orig.add_argument("--config", help="TOML settings file ([ami] section)")
    orig.set_defaults(func=cmd_originate)

    check = sub.add_parser(
        "check-asterisk",
        parents=[common],
        help="check an Asterisk configuration folder against this bot's settings",
    )
    check.add_argument("dir", nargs="?", default="asterisk", help="folder (default asterisk/)")
    check.add_argument(
        "--bot-host", default="voicebot", help="the bot's address as Asterisk dials it"
    )
    check.add_argument("--config", help="TOML settings file")
    shipped = Path(__file__).resolve().parent.parent / "docker-compose.yml"
    check.add_argument(
        "--compose",
        default=str(shipped) if shipped.is_file() else "",
        help="compose file whose voicebot environment the bot runs with (default: the shipped "
        "docker-compose.yml; '' for none)",
    )
    check.set_defaults(func=cmd_check_asterisk)

    doctor = sub.add_parser(
        "doctor",
        parents=[common],
        help="load and warm every engine, then a real TTS->STT->LLM check",
    )
    doctor.add_argument("--config", help="TOML settings file")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    bench = sub.add_parser(
        "bench", parents=[common], help="measure the bot from outside, with simulated calls"
    )
    bench.add_argument(
        "what",
        nargs="?",
        choices=["calls", "quality", "pacing", "engines", "soak"],
        default="calls",
        help="calls (default): simulated conversations through the real models, response "
        "latency; quality: questions to the example business in noise, what the bot heard "
        "and answered; pacing: outbound frame timing on echo; engines: each speech engine",
    )
    bench.add_argument(
        "--conditions",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=[
            "clean",
            "ulaw",
            "pink 20 dB",
            "pink 10 dB",
            "babble 20 dB",
            "babble 10 dB",
            "tv 20 dB",
            "tv 10 dB",
        ],
        help="quality: which lines, comma-separated (default: all eight)",
    )
    bench.add_argument("--config", help="TOML settings file (which models, turn settings)")
    bench.add_argument(
        "--calls",
        type=int,
        nargs="+",
        default=[1, 20],
        help="pacing: concurrent calls per run (default: 1 then 20); calls: how many (8); "
        "soak: how many after the warm-up (200)",
    )
    bench.add_argument(
        "--concurrency", type=int, default=1, help="calls at a time (calls: 1, soak: 4)"
    )
    bench.add_argument(
        "--profile", default="echo", help="soak: the profile the calls get (echo, assistant)"
    )
    bench.add_argument("--seconds", type=float, default=10.0)
    bench.add_argument(
        "--calls-dir",
        default=os.path.join("var", "bench-calls"),
        help="where the benchmark's server writes call logs",
    )
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
