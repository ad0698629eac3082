"""Reads Asterisk's ``.conf`` files and checks the voicebot's parts of them.

``voicebot check-asterisk [DIR]`` runs :func:`lint` on a configuration folder: the shipped
``asterisk/`` templates or a rendered, live ``/etc/asterisk``. Every dialled extension exists,
endpoints point at contexts that exist, every AudioSocket goes to the bot's host and one of its
ports, every ``Dial(AudioSocket/...)`` names ``c(slin)`` or ``c(slin16)``, no credential is a
known default or example value, and with ``autoload=no`` every module the configuration uses is
loaded together with everything it requires on Asterisk 22 (``asterisk22-modules.json``, made
from Asterisk's source by ``scripts/asterisk-modules``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

CREDENTIAL_KEYS: Final = frozenset({"password", "secret", "md5_cred"})
PLACEHOLDER: Final = re.compile(r"^\$\{[A-Z][A-Z0-9_]*\}$")
# What render-config refuses (asterisk/render-config), and the defaults of Asterisk's samples.
WEAK_PREFIXES: Final = ("change-me", "changeme", "password", "secret", "asterisk")
SAMPLE_SECRETS: Final = frozenset({"1234", "amp111", "mysecret", "mypassword", "admin"})
MIN_SECRET: Final = 12
MODULES_TABLE: Final = Path(__file__).with_name("asterisk22-modules.json")
APP_CALL: Final = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*\(")
FUNCTION_CALL: Final = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\(")
DIAL_TECH: Final = re.compile(r"\bDial\(\s*([A-Za-z]+)/", re.IGNORECASE)
CHANNEL_DRIVERS: Final = {
    "pjsip": "chan_pjsip",
    "audiosocket": "chan_audiosocket",
    "local": "core",
    "unicastrtp": "chan_rtp",
}
CODECS: Final = {"ulaw": "codec_ulaw", "alaw": "codec_alaw", "g722": "codec_g722"}
# What the bot's ARI client uses: its REST resources, and externalMedia over AudioSocket.
ARI_MODULES: Final = (
    "res_ari_channels",
    "res_ari_bridges",
    "res_ari_events",
    "res_ari_applications",
    "chan_audiosocket",
)
# pjsip.conf object types and the module that serves each.
PJSIP_TYPES: Final = {
    "endpoint": ("res_pjsip_session", "chan_pjsip", "res_pjsip_endpoint_identifier_user"),
    "auth": ("res_pjsip_authenticator_digest",),
    "aor": ("res_pjsip_registrar",),
    "registration": ("res_pjsip_outbound_registration",),
}
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
    problems += _weak_credentials(folder)
    problems += _modules(folder, plan, pjsip)
    return problems


def _weak_credentials(folder: Path) -> list[str]:
    """Credentials that are known defaults or example values. A ``${VARIABLE}`` (the shipped
    templates) and a rendered value of 12 characters or more (a live folder) are fine."""
    problems = []
    for conf in sorted(folder.glob("*.conf")):
        for section in parse(conf).sections:
            for key, value, line in section.entries:
                if key not in CREDENTIAL_KEYS or PLACEHOLDER.match(value):
                    continue
                why = _weak(value)
                if why:
                    problems.append(
                        f"{conf.name}:{line}: {key} is {why}; set your own (render-config fills "
                        "${VARIABLE}s from the environment)"
                    )
    return problems


def _weak(value: str) -> str | None:
    lowered = value.lower()
    if lowered in SAMPLE_SECRETS or lowered.startswith(WEAK_PREFIXES):
        return "a known default or example value"
    if len(value) < MIN_SECRET:
        return f"shorter than {MIN_SECRET} characters"
    return None


@dataclass(frozen=True)
class ModuleTable:
    """Asterisk 22's loadable modules: what each requires, which provides each application
    and dialplan function ("core": Asterisk itself)."""

    version: str
    requires: dict[str, list[str]]
    applications: dict[str, str]
    functions: dict[str, str]


def module_table() -> ModuleTable:
    data = json.loads(MODULES_TABLE.read_text(encoding="utf-8"))
    return ModuleTable(
        str(data["version"]), data["requires"], data["applications"], data["functions"]
    )


def _loaded_modules(folder: Path) -> tuple[set[str], int] | None:
    """The modules modules.conf loads and the line of ``autoload=no``; None when it autoloads
    (every built module loads, so no requirement can be missing)."""
    path = folder / "modules.conf"
    if not path.is_file():
        return None
    loaded: set[str] = set()
    autoload_line = 0
    for section in parse(path).named("modules"):
        for key, value, line in section.entries:
            if key == "autoload" and value.lower() in ("no", "false", "0"):
                autoload_line = line
            elif key in ("load", "require", "preload"):
                loaded.add(value.removesuffix(".so"))
    return (loaded, autoload_line) if autoload_line else None


def _used_modules(
    folder: Path, plan: Dialplan, pjsip: ConfFile, table: ModuleTable
) -> Iterator[tuple[str, str, str]]:
    """(module, what needs it, where) for everything the configuration uses."""
    applications, functions = table.applications, table.functions
    yield "pbx_config", "the dialplan", "extensions.conf"
    for extens in plan.extensions.values():
        for steps in extens.values():
            for app, line in steps:
                where = f"extensions.conf:{line}"
                if (m := APP_CALL.match(app)) and m[1] in applications:
                    yield applications[m[1]], f"{m[1]}()", where
                elif m:
                    yield "?", f"{m[1]}()", where
                for name in FUNCTION_CALL.findall(app):
                    yield functions.get(name, "?"), f"${{{name}()}}", where
                for tech in DIAL_TECH.findall(app):
                    yield CHANNEL_DRIVERS.get(tech.lower(), "?"), f"Dial({tech}/...)", where
    for section in pjsip.sections:
        for module in PJSIP_TYPES.get(section.get("type") or "", ()):
            yield module, f"type={section.get('type')}", f"pjsip.conf [{section.name}]"
        for codec in re.split(r"[,\s]+", section.get("allow") or ""):
            if codec in CODECS:
                yield CODECS[codec], f"allow={codec}", f"pjsip.conf [{section.name}]"
    ari = folder / "ari.conf"
    if ari.is_file() and any(
        (s.get("enabled") or "").lower() == "yes" for s in parse(ari).named("general")
    ):
        for module in ARI_MODULES:
            yield module, "the bot's ARI mode", "ari.conf"


def _modules(folder: Path, plan: Dialplan, pjsip: ConfFile) -> list[str]:
    found = _loaded_modules(folder)
    if found is None:
        return []
    loaded, autoload_line = found
    table = module_table()
    requires = table.requires
    problems: list[str] = []
    for module, what, where in _used_modules(folder, plan, pjsip, table):
        if module == "?":
            problems.append(f"{where}: {what} is provided by no Asterisk 22 module")
        elif module != "core" and module not in loaded:
            problems.append(
                f"{where}: {what} needs {module}, which modules.conf does not load "
                f"(autoload=no, modules.conf:{autoload_line})"
            )
    for module in sorted(loaded):
        if module not in requires:
            problems.append(f"modules.conf: {module} is not an Asterisk 22 module")
            continue
        for needed in requires[module]:
            if needed in requires and needed not in loaded:
                problems.append(
                    f"modules.conf: {module} requires {needed}, which is not loaded "
                    "(Asterisk 22 declines to load it)"
                )
    return list(dict.fromkeys(problems))


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
