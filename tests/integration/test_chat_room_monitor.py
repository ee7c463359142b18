"""The ops room receives an alert when a monitored check goes CRITICAL and again when it recovers.

Everything is real: a monitor agent runs the stock Nagios plugin ``check_file_age`` on its own
schedule (soft/hard states, ``repeats: 2``) and posts each hard change to the broker as
``mesh.alert``; the broker's ops room (the chat bot in a room of the private Prosody's MUC
component) posts it; an occupant on a separate account reads the room as any XMPP client would.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from slixmpp import JID

from agents.monitor.agent import MonitorAgent
from agents.monitor.ranges import State
from broker.chat import ChatBot
from broker.room import OpsRoom
from conftest import DOMAIN, until

CHECK_FILE_AGE = Path("/usr/lib/nagios/plugins/check_file_age")

pytestmark = pytest.mark.skipif(not CHECK_FILE_AGE.exists(), reason="monitoring-plugins' check_file_age not installed")


def file_age_settings(path: Path) -> dict:
    """A catalogue with one check on check_file_age (CRITICAL when the file is missing, OK while it is
    younger than -w 240 s), scheduled every 0.2 s; two results in a row make a state hard."""
    return {"checks": {"file-age": {"plugin": str(CHECK_FILE_AGE), "args": ["-w", "240", "-c", "600"],
                                    "arguments": {"file": {"type": "str", "option": "-f", "required": True,
                                                           "pattern": r"/[^\x00]+"}}}},
            "schedule": {"heartbeat": {"check": "file-age", "args": {"file": str(path)},
                                       "interval": 0.2, "jitter": 0.1, "repeats": 2}}}


async def test_room_gets_a_line_when_a_scheduled_check_goes_critical_and_when_it_recovers(mesh, tmp_path):
    heartbeat = tmp_path / "heartbeat"
    heartbeat.write_text("alive\n")

    broker = await mesh.broker()
    bot_jid, bot_pw = mesh.account("bot")
    bot = ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid), authorizer=mesh.admins)
    room_jid = f"ops-{uuid.uuid4().hex[:8]}@rooms.{DOMAIN}"
    watcher_account = mesh.account("watcher")
    room = OpsRoom(bot, room_jid, nick=f"vertebra-{uuid.uuid4().hex[:6]}", interval=0.2,
                   admins=[watcher_account[0]])  # the room is members-only
    room.follow(broker)
    await mesh.start(bot)
    await until(lambda: room.joined.is_set(), what="the bot in the room, configured")

    # An occupant on an account of its own (not the bot, not the operator) reads the room.
    watcher = await mesh.client(account=watcher_account)
    watcher.xmpp.register_plugin("xep_0045")
    seen: list[str] = []
    watcher.on_event("groupchat_message",
               lambda m: seen.append(m["body"]) if m["mucnick"] == room.nick and m["body"] else None)
    await watcher.xmpp.plugin["xep_0045"].join_muc_wait(JID(room_jid), "watcher", maxstanzas=0, timeout=10)

    monitor = await mesh.agent(MonitorAgent, broker, ["/host/files1"], settings=file_age_settings(heartbeat))
    tracker = monitor.scheduler.trackers["heartbeat"]
    # Healthy first: the file is there and young, so the check's first hard state is OK (not news),
    # and the broker lists the monitor, so its alerts are admitted.
    await until(lambda: tracker.hard is State.OK, what="the check's first hard state")
    await until(lambda: broker.directory.discover("monitor.check", []), what="the monitor in the directory")
    assert seen == [] and not broker.alerts.recent

    heartbeat.unlink()
    critical = f"CRITICAL: heartbeat on files1 (was OK): FILE_AGE CRITICAL: File not found - {heartbeat}" \
               f" (from {monitor.jid.bare})"  # each post names the agent it comes from
    await until(lambda: any(critical in body for body in seen), timeout=15, what=f"the CRITICAL line in {seen}")

    heartbeat.write_text("alive again\n")
    await until(lambda: any(body.startswith("OK: heartbeat on files1 (was CRITICAL): FILE_AGE OK:")
                            for line in seen for body in line.splitlines()),
                timeout=15, what=f"the recovery line in {seen}")

    lines = [line for body in seen for line in body.splitlines()]
    assert [line.split(":", 1)[0] for line in lines] == ["CRITICAL", "OK"], lines  # one line per hard change
    assert lines[0] == critical
    assert f"{heartbeat} is " in lines[1] and "seconds old" in lines[1]
    # What the room shows came from the monitor's own schedule, through the broker's alerts.
    assert [(a.source, a.check, a.host, a.previous, a.state) for a in broker.alerts.recent] == [
        (monitor.jid.bare, "heartbeat", "files1", "OK", "CRITICAL"),
        (monitor.jid.bare, "heartbeat", "files1", "CRITICAL", "OK")]
    assert monitor.alerts_posted == 2
