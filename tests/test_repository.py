"""The repository stands on its own: nothing in it reaches outside the clone."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The workplace keeps reference material in a folder beside the checkout; a clone has none.
OUTSIDE = re.compile(r"\.\./shared\b|\bshared/(fixtures|asterisk-src|[A-Z-]+\.md)")
ALLOWED = {".ci/run"}  # CI may point its own build steps at it, passed in as a setting


def tracked_files() -> list[str]:
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [name for name in done.stdout.splitlines() if (ROOT / name).is_file()]


def test_nothing_but_ci_reads_outside_the_clone() -> None:
    files = tracked_files()
    assert "tests/data/asterisk22/asterisk22-sip-llama1.bin" in files
    found = []
    for name in files:
        if name in ALLOWED or name.endswith((".bin", ".csv", ".json")):
            continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{name}:{number}: {line.strip()}")
    assert found == []


# The layers of bot/, lowest first: a module imports its own part (a wing, or itself) and the
# parts of lower layers, never one beside it or above it.
LAYERS = [
    {
        "bot",
        "bot.audio",
        "bot.calllog",
        "bot.clock",
        "bot.config",
        "bot.metrics",
        "bot.wording",
    },
    {"bot.recording"},
    {"bot.asterisk", "bot.engines", "bot.callview"},
    {"bot.call"},
    {"bot.conversation"},
    {"bot.app", "bot.inspector"},
    {"bot.tools", "bot.web"},
    {"bot.cli"},
    {"bot.__main__"},
]


def _part(module: str) -> str:
    """The part of bot/ a module belongs to: a wing (bot.asterisk), or a top-level module."""
    return "bot" if module == "bot.__init__" else ".".join(module.split(".")[:2])


def _layer(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, the bot module or package it names) for every import of ``bot`` in ``path``."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "bot":  # from . import x: x names the module imported
                found += [(node.lineno, f"bot.{alias.name}") for alias in node.names]
            elif name.startswith("bot."):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("bot.")]
    return found


def test_imports_go_downward_only() -> None:
    wrong = []
    for path in sorted((ROOT / "bot").rglob("*.py")):
        part = _part(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for line, name in _imports(path):
            target = _part(name) if name != "bot.__version__" else "bot"
            if target != part and _layer(target) >= _layer(part):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert wrong == []
