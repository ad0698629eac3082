"""Profiles per port, the ARI application and the AMI link, against local stand-ins."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bot.app import Bot
from bot.asterisk.ami import AmiError, AmiLink
from bot.asterisk.directory import Directory, TransferFailed
from bot.calllog import list_calls, read_call
from bot.config import Settings
from bot.tools.simulator import CallerSimulator

from .conftest import make_settings, wait_until
from .fake_asterisk import FakeAmi, FakeAri, channel_event, stasis_start

ARI_PASSWORD = "ari-test-Kq27sl0d9"
AMI_SECRET = "ami-test-Pw83mz1x4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def logs(calls_dir: Path) -> list[list[dict[str, Any]]]:
    return [read_call(folder).events for folder in list_calls(calls_dir)]


def two_echo_profiles(calls_dir: Path, **env: str) -> Settings:
    defaults = {
        "VOICEBOT_SERVER_PORT": "0",
        "VOICEBOT_PROFILES_SECOND_KIND": "echo",
        "VOICEBOT_PROFILES_SECOND_DELAY_MS": "100",
    }
    return make_settings(calls_dir, **{**defaults, **env})


# --- profiles per port --------------------------------------------------------------------------


def test_each_profile_port_gives_its_own_profile(calls_dir: Path) -> None:
    second_port = free_port()
    settings = two_echo_profiles(calls_dir, VOICEBOT_PROFILES_SECOND_PORT=str(second_port))

    async def main() -> None:
        bot = Bot(settings)
        await bot.start()
        try:
            main_port = bot.servers["echo"].address[1]
            for port in (main_port, second_port):
                await CallerSimulator("127.0.0.1", port, [], duration=0.3).run()
            await wait_until(lambda: bot.calls_in_progress == 0)
        finally:
            await bot.close(grace=2)

    asyncio.run(main())
    started = sorted(events[0]["profile"] for events in logs(calls_dir))
    assert started == ["echo", "second"]


def test_only_an_assistant_a_call_can_reach_loads_the_engines(calls_dir: Path) -> None:
    from bot.app import needs_engines

    assert not needs_engines(make_settings(calls_dir))  # echo on the port: starts at once
    assert needs_engines(make_settings(calls_dir, VOICEBOT_SERVER_PROFILE="assistant"))
    own_port = make_settings(calls_dir, VOICEBOT_PROFILES_ASSISTANT_PORT="9093")
    assert needs_engines(own_port)
    ami = make_settings(calls_dir, VOICEBOT_AMI_ENABLED="true", VOICEBOT_AMI_SECRET=AMI_SECRET)
    assert needs_engines(ami)  # the dialplan may name any profile


def test_two_profiles_cannot_share_a_port(calls_dir: Path) -> None:
    from bot.config import ConfigError

    with pytest.raises(ConfigError, match=r"profiles.second.port: 9092 is already server.port"):
        make_settings(
            calls_dir, VOICEBOT_PROFILES_SECOND_KIND="echo", VOICEBOT_PROFILES_SECOND_PORT="9092"
        )


# --- ARI ----------------------------------------------------------------------------------------


def ari_settings(calls_dir: Path, url: str, port: int) -> Settings:
    return two_echo_profiles(
        calls_dir,
        VOICEBOT_SERVER_PORT=str(port),
        VOICEBOT_ARI_ENABLED="true",
        VOICEBOT_ARI_URL=url,
        VOICEBOT_ARI_PASSWORD=ARI_PASSWORD,
        VOICEBOT_ARI_MEDIA_HOST=f"127.0.0.1:{port}",
    )


def test_ari_answers_bridges_external_media_and_the_stasis_argument_picks_the_profile(
    calls_dir: Path,
) -> None:
    fake = FakeAri("voicebot", ARI_PASSWORD, media_seconds=0.6)

    async def main() -> None:
        async with fake.running():
            port = free_port()
            bot = Bot(ari_settings(calls_dir, fake.url, port))
            await bot.start()
            try:
                await asyncio.wait_for(fake.connected.wait(), 5)
                await fake.push(stasis_start("caller-1", "second"))
                await asyncio.wait_for(fake.media_done.wait(), 10)
                await wait_until(lambda: bot.calls_in_progress == 0)
                # Asterisk: the media channel left (the bot's socket closed), then the caller.
                media_id = fake.calls("POST")[2].params["channelId"]
                await fake.push(channel_event("StasisEnd", media_id))
                await wait_until(lambda: len(fake.calls("DELETE")) == 3)
                ari = bot.links[0]
                assert not ari.calls and not ari._media and len(bot.directory) == 0
            finally:
                await bot.close(grace=2)

    asyncio.run(main())
    assert fake.requests[0].params == {"app": "voicebot", "subscribeAll": "false"}
    posts = fake.calls("POST")
    assert [p.path for p in posts[:2]] == ["channels/caller-1/answer", "bridges"]
    media = posts[2]
    assert media.path == "channels/externalMedia"
    assert {k: media.params[k] for k in ("encapsulation", "transport", "format", "app")} == {
        "encapsulation": "audiosocket",
        "transport": "tcp",
        "format": "slin16",
        "app": "voicebot",
    }
    bridge_add = posts[3]
    assert bridge_add.path.startswith("bridges/bridge-") and bridge_add.path.endswith("/addChannel")
    assert bridge_add.params["channel"] == f"caller-1,{media.params['channelId']}"
    # The call Asterisk connected with the data UUID got the profile named in Stasis(voicebot,..).
    [events] = logs(calls_dir)
    assert events[0]["uuid"] == media.params["data"]
    assert events[0]["profile"] == "second"
    assert any(e["event"] == "asterisk_channel" and e["via"] == "ari" for e in events)
    assert any(e["event"] == "audio_format" and e["rate"] == 16000 for e in events)
    # Teardown: the media channel, the bridge, and the caller (the bot's side ended first).
    deleted = [r.path for r in fake.calls("DELETE")]
    assert deleted == [
        f"channels/{media.params['channelId']}",
        bridge_add.path[:-11],
        "channels/caller-1",
    ]


def test_ari_tears_down_when_the_caller_hangs_up_and_transfers_with_continue(
    calls_dir: Path,
) -> None:
    fake = FakeAri("voicebot", ARI_PASSWORD, media_seconds=3.0)

    async def main() -> None:
        async with fake.running():
            port = free_port()
            bot = Bot(ari_settings(calls_dir, fake.url, port))
            await bot.start()
            ari = bot.links[0]
            try:
                await asyncio.wait_for(fake.connected.wait(), 5)
                await fake.push(stasis_start("caller-1"))
                await fake.push(stasis_start("caller-2"))
                await wait_until(lambda: len(fake.calls("POST")) == 8)
                # caller-1 hangs up.
                await fake.push(channel_event("ChannelHangupRequest", "caller-1"))
                await wait_until(lambda: len(fake.calls("DELETE")) == 2)
                # caller-2 is transferred: back to the dialplan, never hung up by us.
                route = bot.directory.get(ari.calls["caller-2"].uuid)
                assert route is not None and route.control is ari
                await ari.transfer(route, "from-voicebot", "operator")
                with pytest.raises(TransferFailed):
                    await ari.transfer(route, "from-voicebot", "operator")
            finally:
                await bot.close(grace=0)

    asyncio.run(main())
    deletes = [r.path for r in fake.calls("DELETE")]
    assert "channels/caller-1" not in deletes  # the caller hung up by itself
    assert "channels/caller-2" not in deletes  # transferred, not hung up
    assert len(deletes) == 4  # each call's media channel and bridge
    [cont] = [r for r in fake.calls("POST") if r.path.endswith("/continue")]
    assert cont.path == "channels/caller-2/continue"
    assert cont.params == {"context": "from-voicebot", "extension": "operator", "priority": "1"}


def test_a_wrong_ari_password_is_logged_without_the_password(
    calls_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeAri("voicebot", "the-real-password-x")

    async def main() -> None:
        async with fake.running():
            bot = Bot(ari_settings(calls_dir, fake.url, free_port()))
            await bot.start()
            try:
                await wait_until(lambda: "401" in caplog.text)
            finally:
                await bot.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert ARI_PASSWORD not in caplog.text
    assert not fake.connected.is_set()


# --- AMI ----------------------------------------------------------------------------------------


def ami_settings(calls_dir: Path, port: int, secret: str = AMI_SECRET) -> Settings:
    return two_echo_profiles(
        calls_dir,
        VOICEBOT_AMI_ENABLED="true",
        VOICEBOT_AMI_PORT=str(port),
        VOICEBOT_AMI_SECRET=secret,
    )


def test_ami_events_route_the_call_and_join_its_log(calls_dir: Path) -> None:
    fake = FakeAmi("voicebot", AMI_SECRET)
    call_uuid = "0b9a2f6e-51c4-4f0e-9d61-6f1e0c2a7b11"
    channel = "PJSIP/16-00000007"

    async def main() -> None:
        async with fake.running():
            bot = Bot(ami_settings(calls_dir, fake.port))
            await bot.start()
            try:
                # The dialplan's Set() lines, as Asterisk reports them, before AudioSocket().
                await fake.push(
                    Event="VarSet",
                    Channel=channel,
                    Variable="VOICEBOT_UUID",
                    Value=call_uuid,
                    Uniqueid="1.7",
                )
                await fake.push(
                    Event="VarSet",
                    Channel=channel,
                    Variable="VOICEBOT_PROFILE",
                    Value="second",
                    Uniqueid="1.7",
                )
                await fake.push(Event="VarSet", Channel="PJSIP/99-1", Variable="OTHER", Value="x")
                port = bot.servers["echo"].address[1]
                sim = CallerSimulator(
                    "127.0.0.1",
                    port,
                    [],
                    call_uuid=__import__("uuid").UUID(call_uuid),
                    duration=0.6,
                )
                run = asyncio.create_task(sim.run())
                await wait_until(lambda: bot.calls_in_progress == 1)
                await fake.push(Event="DTMFEnd", Channel=channel, Digit="5", Direction="Received")
                await run
                await fake.push(
                    Event="Hangup", Channel=channel, Cause="16", Cause_txt="Normal Clearing"
                )
                await wait_until(lambda: bot.calls_in_progress == 0)
                # The call's log waited for Asterisk's last word; nothing is kept after it.
                await wait_until(lambda: len(bot.directory) == 0 and not bot.links[0].channels)
            finally:
                await bot.close(grace=2)

    asyncio.run(main())
    [events] = logs(calls_dir)
    assert events[0]["profile"] == "second"  # from VOICEBOT_PROFILE, on the default port
    names = [e["event"] for e in events]
    assert "asterisk_channel" in names and "asterisk_dtmf" in names
    # Asterisk's Hangup came after the socket closed, yet before the one call_end.
    assert names[-2:] == ["asterisk_hangup", "call_end"] and names.count("call_end") == 1
    [dtmf] = [e for e in events if e["event"] == "asterisk_dtmf"]
    assert dtmf["digit"] == "5"
    assert fake.actions[0]["Action"] == "Login"


def test_ami_redirects_for_a_transfer_and_originates(calls_dir: Path) -> None:
    fake = FakeAmi("voicebot", AMI_SECRET)

    async def main() -> None:
        async with fake.running():
            directory = Directory()
            link = AmiLink(ami_settings(calls_dir, fake.port).ami, directory)
            await link.connect()
            try:
                await fake.push(
                    Event="VarSet",
                    Channel="PJSIP/16-9",
                    Variable="VOICEBOT_UUID",
                    Value="AAAAAAAA-0000-0000-0000-000000000001",
                )
                await wait_until(lambda: bool(link.channels))
                route = directory.get("aaaaaaaa-0000-0000-0000-000000000001")
                assert route is not None and route.channel == "PJSIP/16-9"
                await link.transfer(route, "from-voicebot", "operator")
                message = await link.originate(
                    "PJSIP/16", context="voicebot-outbound", extension="assistant"
                )
                assert message == "answered (PJSIP/16-00000001)"
                fake.originate_result = "Failure"
                with pytest.raises(AmiError, match="AMI Originate"):
                    await link.originate(
                        "PJSIP/16", context="voicebot-outbound", extension="assistant"
                    )
                fake.refuse.add("redirect")
                with pytest.raises(TransferFailed, match="Channel not found"):
                    await link.transfer(route, "from-voicebot", "operator")
            finally:
                link.close()

    asyncio.run(main())
    redirect = next(a for a in fake.actions if a["Action"] == "Redirect")
    assert {k: redirect[k] for k in ("Channel", "Context", "Exten", "Priority")} == {
        "Channel": "PJSIP/16-9",
        "Context": "from-voicebot",
        "Exten": "operator",
        "Priority": "1",
    }
    originate = next(a for a in fake.actions if a["Action"] == "Originate")
    assert originate["Channel"] == "PJSIP/16"
    assert (originate["Context"], originate["Exten"]) == ("voicebot-outbound", "assistant")


def test_a_refused_ami_login_stops_start_up_without_showing_the_secret(calls_dir: Path) -> None:
    fake = FakeAmi("voicebot", "another-secret-123")

    async def main() -> None:
        async with fake.running():
            bot = Bot(ami_settings(calls_dir, fake.port))
            try:
                with pytest.raises(AmiError) as err:
                    await bot.start()
            finally:
                await bot.close()
            assert "login as 'voicebot' refused" in str(err.value)
            assert AMI_SECRET not in str(err.value)

    asyncio.run(main())


def test_voicebot_originate_command(calls_dir: Path) -> None:
    fake = FakeAmi("voicebot", AMI_SECRET)
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        nonlocal stop
        async with fake.running():
            stop = loop.create_future()
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        env = {**os.environ, "VOICEBOT_AMI_PORT": str(fake.port)}
        cmd = [sys.executable, "-m", "bot", "originate", "PJSIP/16", "--profile", "assistant"]
        no_secret = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert no_secret.returncode == 2
        assert "ami.secret: set VOICEBOT_AMI_SECRET" in no_secret.stderr
        env["VOICEBOT_AMI_SECRET"] = AMI_SECRET
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "PJSIP/16: answered (PJSIP/16-00000001)"
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()
    [originate] = [a for a in fake.actions if a["Action"] == "Originate"]
    assert (originate["Context"], originate["Exten"]) == ("voicebot-outbound", "assistant")
