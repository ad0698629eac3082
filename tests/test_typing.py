"""The engine doubles of the conversation's tests are what the conversation takes: mypy checks
them against the engines' Protocols (bot/engines/base.py), as it checks the engines."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_the_engine_fakes_satisfy_the_engine_protocols() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "tests/fakes.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
