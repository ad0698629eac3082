"""Reads Asterisk's ``.conf`` files and checks the voicebot's parts of them.

``voicebot check-asterisk [DIR]`` runs :func:`lint` on a configuration folder (``asterisk/`` by
default) before it is loaded into Asterisk: every dialled extension exists, endpoints point at
contexts that exist, every AudioSocket goes to the bot's host and one of its ports, every
``Dial(AudioSocket/...)`` names ``c(slin)`` or ``c(slin16)``, and no credential is a literal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

CREDENTIAL_KEYS: Final = frozenset({"password", "secret", "md5_cred"})
PLACEHOLDER: Final = re.compile(r"^\$\{[A-Z][A-Z0-9_]*\}$")
AUDIOSOCKET_APP: Final = re.compile(r"\bAudioSocket\(([^,]*),([^)]*)\)", re.IGNORECASE)
AUDIOSOCKET_DIAL: Final = re.compile(r"\bDial\(AudioSocket/([^/]+)/([^/,)]+)(/[^,)]*)?", re.I)
GOTO: Final = re.compile(r"\b(?:Goto|Gosub)\(([^,)]+),([^,)]+),([^)]+)\)", re.IGNORECASE)
STASIS: Final = re.compile(r"\bStasis\(([^,)]+)", re.IGNORECASE)


@dataclass
class Section:
    name: str
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # key, value, line

    def get(self, key: str) -> str | None:
        return next((v for k, v, _ in self.entries if k == key), None)


@dataclass
class ConfFile:
    path: Path
    sections: list[Section]

    def named(self, name: str) -> list[Section]:
        return [s for s in self.sections if s.name == name]


def parse(path: Path) -> ConfFile:
    """Sections in order (a name may repeat, as pjsip.conf's endpoint/aor pairs do)."""
    sections: list[Section] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = re.sub(r"(?<!\\);.*", "", raw).strip()
        if not line:
            continue
        if line.startswith("["):
            sections.append(Section(line[1 : line.index("]")].strip()))
            continue
        if not sections:
            raise ValueError(f"{path.name}:{number}: a setting before any [section]")
        parts = re.split(r"\s*(=>|=)\s*", line, maxsplit=1)
        if len(parts) != 3:
            raise ValueError(f"{path.name}:{number}: expected key = value, got {raw.strip()!r}")
        sections[-1].entries.append((parts[0].strip(), parts[2].strip(), number))
    return ConfFile(path, sections)


@dataclass
class Dialplan:
    globals: dict[str, str]
    extensions: dict[str, dict[str, list[tuple[str, int]]]]  # context -> exten -> [(app, line)]

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{([A-Z][A-Z0-9_]*)\}", lambda m: self.globals.get(m[1], m[0]), text)


def dialplan(conf: ConfFile) -> Dialplan:
    globals_: dict[str, str] = {}
    contexts: dict[str, dict[str, list[tuple[str, int]]]] = {}
    for section in conf.sections:
        if section.name == "globals":
            globals_.update({k: v for k, v, _ in section.entries})
            continue
        context = contexts.setdefault(section.name, {})
        current = ""
        for key, value, line in section.entries:
            if key not in ("exten", "same"):
                continue
            parts = value.split(",", 2)
            if key == "exten":
                current = parts[0]
                app = parts[2] if len(parts) > 2 else ""
            else:
                app = value.split(",", 1)[1] if "," in value else value
            context.setdefault(current, []).append((app, line))
    return Dialplan(globals_, contexts)


def lint(
    folder: Path, *, bot_host: str, bot_ports: Iterable[int], profiles: Iterable[str] = ()
) -> list[str]:
    """Problems found in ``folder`` (empty: fine). ``bot_host``/``bot_ports``: where the bot
    listens as Asterisk sees it; ``profiles``: the bot's profile names."""
    problems: list[str] = []
    ports = {str(p) for p in bot_ports}
    ext = parse(folder / "extensions.conf")
    plan = dialplan(ext)

    def where(line: int) -> str:
        return f"extensions.conf:{line}"

    for extens in plan.extensions.values():
        for steps in extens.values():
            for app, line in steps:
                for uuid_arg, target in AUDIOSOCKET_APP.findall(app):
                    problems += _target(plan.expand(target), bot_host, ports, where(line))
                    if not uuid_arg.strip():
                        problems.append(f"{where(line)}: AudioSocket() without a UUID")
                for target, _uuid, options in AUDIOSOCKET_DIAL.findall(app):
                    problems += _target(plan.expand(target), bot_host, ports, where(line))
                    if not re.search(r"c\(slin(16)?\b", options or ""):
                        problems.append(
                            f"{where(line)}: Dial(AudioSocket/...) without c(slin) or c(slin16): "
                            "Asterisk would send u-law labelled as slin"
                        )
                for g_context, g_exten, _prio in GOTO.findall(app):
                    if g_exten not in plan.extensions.get(g_context, {}):
                        problems.append(f"{where(line)}: {g_exten}@{g_context} does not exist")
                if "VOICEBOT_PROFILE=" in app:
                    name = app.split("VOICEBOT_PROFILE=", 1)[1].rstrip(")").strip()
                    if profiles and name not in set(profiles):
                        problems.append(f"{where(line)}: the bot has no profile {name!r}")
                for name in STASIS.findall(app):
                    if not name.strip():
                        problems.append(f"{where(line)}: Stasis() without an application")

    pjsip = parse(folder / "pjsip.conf")
    for section in pjsip.sections:
        if section.get("type") == "endpoint":
            context = section.get("context") or "default"
            if context not in plan.extensions:
                problems.append(
                    f"pjsip.conf: endpoint {section.name} uses context {context!r}, "
                    "which extensions.conf does not define"
                )
    for conf in sorted(folder.glob("*.conf")):
        for section in parse(conf).sections:
            for key, value, line in section.entries:
                if key in CREDENTIAL_KEYS and not PLACEHOLDER.match(value):
                    problems.append(
                        f"{conf.name}:{line}: {key} is a literal; use a ${{VARIABLE}} that "
                        "render-config fills from the environment"
                    )
    return problems


def _target(target: str, host: str, ports: set[str], where: str) -> list[str]:
    got_host, _, port = target.strip().rpartition(":")
    problems = []
    if got_host != host:
        problems.append(f"{where}: AudioSocket goes to {got_host!r}, not the bot ({host!r})")
    if port not in ports:
        problems.append(
            f"{where}: AudioSocket port {port} is none of the bot's ({', '.join(sorted(ports))})"
        )
    return problems
