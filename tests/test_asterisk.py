"""The Asterisk side as shipped: dialplan and SIP config lint, render-config, docker compose."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bot.asterisk.astconf import dialplan, lint, module_table, parse
from bot.config import load

ROOT = Path(__file__).resolve().parent.parent
ASTERISK = ROOT / "asterisk"
SECRETS = {
    "SIP_16_PASSWORD": "pw-16-Qx81bd03kq",
    "SIP_17_PASSWORD": "pw-17-Zm2p6ad9fw",
    "ARI_PASSWORD": "ari-Lk38vn20xa1",
    "AMI_SECRET": "ami-Vt55qe91mc0",
}


def compose_settings(file: str = "docker-compose.yml", service: str = "voicebot") -> dict[str, str]:
    """A service's environment in a compose file, secrets filled as compose would."""
    compose = yaml.safe_load((ROOT / file).read_text())
    env = compose["services"][service]["environment"]
    return {k: "from-.env-" + k if "${" in str(v) else str(v) for k, v in env.items()}


def shipped_bot_settings() -> tuple[list[int], list[str]]:
    env = {
        "VOICEBOT_PROFILES_CONCIERGE_KIND": "assistant",
        "VOICEBOT_PROFILES_CONCIERGE_PORT": "9093",
    }
    settings = load(None, env)
    ports = [settings.server.port] + [p.port for p in settings.profiles.values() if p.port]
    return ports, list(settings.profiles)


def test_the_shipped_configuration_passes_the_lint() -> None:
    ports, profiles = shipped_bot_settings()
    assert lint(ASTERISK, bot_host="voicebot", bot_ports=ports, profiles=profiles) == []


def test_extension_16_reaches_every_llama_and_transfers_land_somewhere() -> None:
    plan = dialplan(parse(ASTERISK / "extensions.conf"))
    pjsip = parse(ASTERISK / "pjsip.conf")
    [endpoint] = [s for s in pjsip.named("16") if s.get("type") == "endpoint"]
    phones = plan.extensions[endpoint.get("context") or ""]
    assert {"Llama1", "Llama1w", "Llama2", "Llama1ari"} <= set(phones)
    # The default profile's transfer target exists in the dialplan.
    profile = load(None, {}).profiles["assistant"]
    assert profile.transfer_extension in plan.extensions[profile.transfer_context]
    # Every bot profile the outbound context offers is a Goto to a real extension (lint).
    assert set(plan.extensions["voicebot-outbound"]) == {"assistant", "concierge"}
    assert plan.globals["BOT_HOST"] == "voicebot"  # the compose service name


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            ("${VOICEBOT_UUID}/c(slin16))", "${VOICEBOT_UUID})"),
            "Dial(AudioSocket/...) without c(slin) or c(slin16)",
        ),
        (("BOT_HOST=voicebot", "BOT_HOST=example.org"), "not the bot ('voicebot')"),
        (("BOT_PORT=9092", "BOT_PORT=9099"), "port 9099 is none of the bot's"),
        (("Goto(from-phones,Llama2,1)", "Goto(from-phones,Llama3,1)"), "Llama3@from-phones"),
        (("VOICEBOT_PROFILE=concierge", "VOICEBOT_PROFILE=butler"), "no profile 'butler'"),
        (("password=${SIP_16_PASSWORD}", "password=1234"), "pjsip.conf"),
        (("secret=${AMI_SECRET}", "secret=amp111"), "secret is a known default"),
        (("secret=${AMI_SECRET}", "secret=change-me-please-now"), "known default or example"),
        (("password=${ARI_PASSWORD}", "password=hunter2"), "shorter than 12 characters"),
        (("load => res_pjsip_pubsub.so", ";"), "chan_pjsip requires res_pjsip_pubsub"),
        (("load => res_websocket_client.so", ";"), "res_ari requires res_websocket_client"),
        (("load => func_uuid.so", ";"), "${UUID()} needs func_uuid"),
        (("load => app_audiosocket.so", ";"), "AudioSocket() needs app_audiosocket"),
        (("load => chan_audiosocket.so", ";"), "Dial(AudioSocket/...) needs chan_audiosocket"),
        (("load => codec_g722.so", ";"), "allow=g722 needs codec_g722"),
        (("load => app_stasis.so", ";"), "Stasis() needs app_stasis"),
        (("load => func_uuid.so", "load => func_uuidx.so"), "func_uuidx is not an Asterisk 22"),
        (
            ("Stasis(voicebot,assistant)", "Stasys(voicebot,assistant)"),
            "Stasys() is provided by no",
        ),
        (("context=from-phones ", "context=from-nowhere "), "'from-nowhere'"),
    ],
)
def test_the_lint_catches_each_mistake(tmp_path: Path, edit: tuple[str, str], problem: str) -> None:
    shutil.copytree(ASTERISK, tmp_path / "a")
    old, new = edit
    for conf in (tmp_path / "a").glob("*.conf"):
        text = conf.read_text()
        if old in text:
            conf.write_text(text.replace(old, new, 1))
            break
    else:
        pytest.fail(f"{old!r} is in no file")
    ports, profiles = shipped_bot_settings()
    problems = lint(tmp_path / "a", bot_host="voicebot", bot_ports=ports, profiles=profiles)
    assert any(problem in p for p in problems), problems


def test_a_rendered_live_folder_passes_the_lint(tmp_path: Path) -> None:
    assert render(tmp_path, **SECRETS).returncode == 0
    ports, profiles = shipped_bot_settings()
    assert lint(tmp_path / "etc", bot_host="voicebot", bot_ports=ports, profiles=profiles) == []


def test_autoload_needs_no_module_list(tmp_path: Path) -> None:
    shutil.copytree(ASTERISK, tmp_path / "a")
    (tmp_path / "a" / "modules.conf").write_text("[modules]\nautoload=yes\n")
    ports, profiles = shipped_bot_settings()
    assert lint(tmp_path / "a", bot_host="voicebot", bot_ports=ports, profiles=profiles) == []


def test_the_module_table_is_asterisk_22s() -> None:
    table = module_table()
    assert table.version.startswith("22.")
    assert "res_pjsip_pubsub" in table.requires["chan_pjsip"]
    assert table.applications["AudioSocket"] == "app_audiosocket"
    assert table.functions["UUID"] == "func_uuid"


def test_the_cli_check_names_the_problem(tmp_path: Path) -> None:
    shutil.copytree(ASTERISK, tmp_path / "a")
    conf = tmp_path / "a" / "extensions.conf"
    conf.write_text(conf.read_text().replace("c(slin16)", ""))
    # No profile settings: the shipped docker-compose.yml defines concierge (Llama2, 9093).
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBOT_PROFILES_")}
    voicebot = [str(ROOT / ".venv" / "bin" / "voicebot")]
    ok = subprocess.run(
        [*voicebot, "check-asterisk", str(ASTERISK)], env=env, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [*voicebot, "check-asterisk", str(tmp_path / "a")], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "extensions.conf:38: Dial(AudioSocket/...) without c(slin)" in bad.stdout


def test_the_cli_check_names_a_compose_file_it_cannot_read(tmp_path: Path) -> None:
    not_compose = tmp_path / "compose.yml"
    not_compose.write_text("services: [one, two]\n")
    voicebot = [str(ROOT / ".venv" / "bin" / "voicebot"), "check-asterisk", str(ASTERISK)]
    for compose in (not_compose, tmp_path / "missing.yml"):
        done = subprocess.run(
            [*voicebot, "--compose", str(compose)], capture_output=True, text=True
        )
        assert done.returncode == 2
        assert f"voicebot: {compose}: no voicebot service environment to read" in done.stderr


def render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [str(ASTERISK / "render-config"), str(ASTERISK), str(tmp_path / "etc")],
        env={**clean, **env},
        capture_output=True,
        text=True,
    )


def test_render_config_fills_only_the_secrets(tmp_path: Path) -> None:
    done = render(tmp_path, **SECRETS)
    assert done.returncode == 0, done.stderr
    etc = tmp_path / "etc"
    assert "password=pw-16-Qx81bd03kq" in (etc / "pjsip.conf").read_text()
    assert "secret=ami-Vt55qe91mc0" in (etc / "manager.conf").read_text()
    assert "password=ari-Lk38vn20xa1" in (etc / "ari.conf").read_text()
    # Dialplan variables are Asterisk's, not the shell's: they stay.
    assert "${UUID()}" in (etc / "extensions.conf").read_text()
    assert "${BOT_HOST}:${BOT_PORT}" in (etc / "extensions.conf").read_text()
    assert (etc / "manager.conf").stat().st_mode & 0o077 == 0  # secrets readable by owner only


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("AMI_SECRET", "", "AMI_SECRET is not set"),
        ("ARI_PASSWORD", "short", "at least 12 characters"),
        ("SIP_16_PASSWORD", "change-me-please-now", "example value"),
    ],
)
def test_render_config_refuses_missing_or_weak_secrets(
    tmp_path: Path, name: str, value: str, why: str
) -> None:
    done = render(tmp_path, **{**SECRETS, name: value})
    assert done.returncode == 2
    assert why in done.stderr
    assert not (tmp_path / "etc").exists()


def docker_compose() -> list[str]:
    """``docker-compose`` (Debian's package; no engine needed) or ``docker compose``."""
    if found := shutil.which("docker-compose"):
        return [found]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    why = "neither docker-compose nor docker compose is installed (apt-get install docker-compose)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must validate the compose file: {why}")
    pytest.skip(why)


def compose_config(
    env_file: Path, file: str = "docker-compose.yml", **secrets: str
) -> subprocess.CompletedProcess[str]:
    """``docker-compose config -q`` with exactly ``secrets`` in the env file."""
    env_file.write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    cmd = [*docker_compose(), "--project-directory", str(ROOT), "-f", file]
    return subprocess.run(
        [*cmd, "--env-file", str(env_file), "config", "-q"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
    )


def test_compose_file_is_valid_with_secrets_and_refuses_without(tmp_path: Path) -> None:
    ok = compose_config(tmp_path / "env", **SECRETS)
    assert ok.returncode == 0, ok.stderr
    missing = compose_config(tmp_path / "empty")
    assert missing.returncode != 0
    assert "set SIP_16_PASSWORD in .env" in missing.stderr


def test_the_scaled_compose_file_is_valid_and_wires_haproxy_to_its_bots(tmp_path: Path) -> None:
    scaled = "docker-compose.scaled.yml"
    ok = compose_config(tmp_path / "env", scaled, **SECRETS)
    assert ok.returncode == 0, ok.stderr
    missing = compose_config(tmp_path / "empty", scaled)
    assert missing.returncode != 0 and "in .env" in missing.stderr
    for bot in ("bot1", "bot2"):
        settings = load(None, compose_settings(scaled, bot))
        assert settings.http.host == "0.0.0.0" and settings.ami.enabled
        engines = (settings.models.stt_engine, settings.models.llm_engine)
        assert engines + (settings.models.tts_engine,) == ("wyoming", "openai", "wyoming")
    # Every ${VAR} of the shipped HAProxy configuration is set by the compose file.
    haproxy = compose_settings(scaled, "voicebot")
    wanted = set(re.findall(r"\$\{(\w+)\}", (ROOT / "deploy" / "haproxy.cfg").read_text()))
    assert wanted == set(haproxy)


def test_compose_wires_the_bot_to_the_shipped_dialplan() -> None:
    env = compose_settings()
    settings = load(None, env)
    assert settings.profiles["concierge"].port == 9093
    assert settings.ami.host == "asterisk" and settings.ari.url == "http://asterisk:8088"
    assert settings.ari.media_host == "voicebot:9092"
    plan = dialplan(parse(ASTERISK / "extensions.conf"))
    assert plan.globals["BOT_PORT_CONCIERGE"] == "9093"
