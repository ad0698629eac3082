"""The repository stands on its own: nothing in it reaches outside the clone."""

from __future__ import annotations

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
