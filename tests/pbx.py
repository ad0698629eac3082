"""A real Asterisk for tests: built from source once per machine, configured from ``asterisk/``.

:func:`asterisk_prefix` finds or builds the install (``scripts/build-asterisk``, cached by
version and module set). :class:`Pbx` renders the project's own configuration with
``asterisk/render-config`` into a test folder, moves every port to a free loopback one, points
the dialplan at the test's bot, and runs Asterisk on it with ``-C``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
SOURCE_VAR: Final = "VOICEBOT_ASTERISK_SRC"
HOW_TO_ENABLE: Final = (
    f"set {SOURCE_VAR} to a folder holding asterisk-22.*.tar.gz and the pjproject tarball it "
    "bundles (the build takes ~10 min on 2 cores, once per machine; see scripts/build-asterisk "
    "for its Debian build dependencies), and install SIPp (apt-get install sip-tester)"
)
SECRETS: Final = {
    "SIP_16_PASSWORD": "pw-16-Qx81bd03kq",
    "SIP_17_PASSWORD": "pw-17-Zm2p6ad9fw",
    "ARI_PASSWORD": "ari-Lk38vn20xa1",
    "AMI_SECRET": "ami-Vt55qe91mc0",
}
# The dialplan trap a test dials on purpose: Dial(AudioSocket/...) without c(slin).
ULAW_TRAP: Final = """
exten => Llama1ulaw,1,NoOp(Test only: AudioSocket without a codec option)
 same => n,Answer()
 same => n,Set(VOICEBOT_UUID=${UUID()})
 same => n,Set(VOICEBOT_PROFILE=assistant)
 same => n,Dial(AudioSocket/${BOT_HOST}:${BOT_PORT}/${VOICEBOT_UUID})
 same => n,Hangup()
"""


def asterisk_prefix() -> Path | str:
    """The install prefix of a real Asterisk, or why there is none here."""
    if shutil.which("sipp") is None:
        return f"SIPp is not installed; {HOW_TO_ENABLE}"
    source = os.environ.get(SOURCE_VAR)
    if not source:
        return f"no Asterisk source; {HOW_TO_ENABLE}"
    built = subprocess.run(
        [str(ROOT / "scripts" / "build-asterisk"), source], stdout=subprocess.PIPE, text=True
    )
    if built.returncode != 0:
        return f"scripts/build-asterisk {source} failed (exit {built.returncode}); see its output"
    return Path(built.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Ports:
    sip: int
    http: int
    ami: int
    rtp: int  # first of 100
    bot: int
    concierge: int


class Pbx:
    def __init__(self, prefix: Path, folder: Path, ports: Ports) -> None:
        self.prefix = prefix
        self.etc = folder / "etc"
        self.var = folder / "var"
        self.ports = ports
        self.process: subprocess.Popen[bytes] | None = None

    def render(self) -> None:
        """The shipped configuration, rendered as a user would, then moved to test ports."""
        env = {**os.environ, **SECRETS}
        subprocess.run(
            [str(ROOT / "asterisk" / "render-config"), str(ROOT / "asterisk"), str(self.etc)],
            env=env,
            check=True,
            capture_output=True,
        )
        p = self.ports
        self._edit("pjsip.conf", r"bind=0\.0\.0\.0:5060", f"bind=127.0.0.1:{p.sip}")
        self._edit("http.conf", r"bindaddr=0\.0\.0\.0", "bindaddr=127.0.0.1")
        self._edit("http.conf", r"bindport=8088", f"bindport={p.http}")
        self._edit("manager.conf", r"port=5038", f"port={p.ami}")
        self._edit("manager.conf", r"bindaddr=0\.0\.0\.0", "bindaddr=127.0.0.1")
        self._edit("rtp.conf", r"rtpstart=\d+", f"rtpstart={p.rtp}")
        self._edit("rtp.conf", r"rtpend=\d+", f"rtpend={p.rtp + 99}")
        self._edit("extensions.conf", r"BOT_HOST=\S+", "BOT_HOST=127.0.0.1")
        self._edit("extensions.conf", r"BOT_PORT=\d+", f"BOT_PORT={p.bot}")
        self._edit(
            "extensions.conf", r"BOT_PORT_CONCIERGE=\d+", f"BOT_PORT_CONCIERGE={p.concierge}"
        )
        self._edit("extensions.conf", r"\[from-phones\]\n", "[from-phones]\n" + ULAW_TRAP)
        dirs = {
            "astetcdir": self.etc,
            "astmoddir": self.prefix / "lib" / "asterisk" / "modules",
            "astvarlibdir": self.var / "lib",
            "astdbdir": self.var / "lib",
            "astkeydir": self.var / "lib",
            "astdatadir": self.prefix / "var" / "lib" / "asterisk",  # the XML docs Stasis needs
            "astagidir": self.var / "agi",
            "astspooldir": self.var / "spool",
            "astrundir": self.var / "run",
            "astlogdir": self.var / "log",
            "astsbindir": self.prefix / "sbin",
        }
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        (self.etc / "asterisk.conf").write_text(
            "[directories]\n"
            + "".join(f"{k} => {v}\n" for k, v in dirs.items())
            + "[options]\nverbose = 3\nnocolor = yes\n"
        )
        (self.etc / "logger.conf").write_text(
            "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose(3)\n"
        )

    def _edit(self, name: str, pattern: str, replacement: str) -> None:
        path = self.etc / name
        text, count = re.subn(pattern, replacement.replace("\\", "\\\\"), path.read_text(), count=1)
        assert count == 1, f"{name}: {pattern!r} not found (the shipped file changed?)"
        path.write_text(text)

    @property
    def conf(self) -> Path:
        return self.etc / "asterisk.conf"

    def start(self, within: float = 60) -> None:
        out = (self.var / "log" / "console.log").open("wb")
        self.process = subprocess.Popen(
            [str(self.prefix / "sbin" / "asterisk"), "-f", "-C", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Asterisk exited {self.process.returncode}:\n{self.log()}")
            done = subprocess.run(
                [str(self.prefix / "sbin" / "asterisk"), "-C", str(self.conf), "-rx",
                 "core waitfullybooted"],
                capture_output=True, text=True, timeout=within,
            )  # fmt: skip
            if done.returncode == 0 and "fully booted" in done.stdout:
                return
            time.sleep(0.2)
        raise AssertionError(f"Asterisk did not boot within {within} s:\n{self.log()[-3000:]}")

    def rx(self, command: str) -> str:
        done = subprocess.run(
            [str(self.prefix / "sbin" / "asterisk"), "-C", str(self.conf), "-rx", command],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout

    def log(self) -> str:
        path = self.var / "log" / "messages.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.rx("core stop now")
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
