"""The ops room on the real Prosody's MUC service: the bot joins it, posts a check's CRITICAL alert
and its recovery, and never takes an occupant's message as a command."""

from __future__ import annotations

import itertools
import uuid

from slixmpp import JID

from agents.monitor.agent import MonitorAgent
from broker.chat import ChatBot
from broker.room import OpsRoom
from conftest import DOMAIN, until
from sample_agent import SampleAgent

_rooms = itertools.count(1)


async def test_alerts_reach_the_room_and_room_messages_are_not_commands(mesh):
    broker = await mesh.broker()
    bot_jid, bot_pw = mesh.account("bot")
    bot = ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid), authorizer=mesh.admins)
    room_jid = f"ops{next(_rooms)}@rooms.{DOMAIN}"
    room = OpsRoom(bot, room_jid, nick=f"vertebra-{uuid.uuid4().hex[:6]}", interval=0.2)
    await mesh.start(bot)
    room.follow(broker)
    await until(lambda: room.joined.is_set(), what="the bot in the room, configured")

    watcher = await mesh.client()  # an operator (a mesh admin, so a member of the room) sitting in it
    watcher.xmpp.register_plugin("xep_0045")
    seen: list[str] = []
    watcher.on_event("groupchat_message", lambda m: seen.append(m["body"]) if m["mucnick"] == room.nick else None)
    await watcher.xmpp.plugin["xep_0045"].join_muc_wait(JID(room_jid), "watcher", maxstanzas=0, timeout=10)

    agent = await mesh.agent(SampleAgent, broker, ["/host/db1"])
    monitor = await mesh.agent(MonitorAgent, broker, ["/host/db1"])  # a live monitor agent may post alerts
    await until(lambda: (broker.directory.discover("sample.count", [])
                         and broker.directory.discover("monitor.check", [])), what="the agents in the directory")
    post = {"check": "disk", "host": "db1", "previous": "OK", "state": "CRITICAL", "text": "DISK CRITICAL - / 97%"}
    assert (await monitor.request(str(broker.jid), "mesh.alert", post, timeout=5)).outcome.value == "ok"
    await until(lambda: any(f"CRITICAL: disk on db1 (was OK): DISK CRITICAL - / 97% (from {monitor.jid.bare})" in b
                            for b in seen), what=seen)
    post.update(previous="CRITICAL", state="OK", text="DISK OK")
    assert (await monitor.request(str(broker.jid), "mesh.alert", post, timeout=5)).outcome.value == "ok"
    await until(lambda: any("OK: disk on db1 (was CRITICAL): DISK OK" in b for b in seen), what=seen)

    # An occupant's message that looks like a command is chat, not a command, and runs nothing.
    watcher.xmpp.send_message(mto=room_jid, mbody="call sample.count on /host/db1", mtype="groupchat")
    bot_nick = f"{room_jid}/{room.nick}"
    watcher.xmpp.send_message(mto=bot_nick, mbody="call sample.count", mtype="chat")  # private, via the room
    watcher.xmpp.send_message(mto=str(bot.jid), mbody="jobs", mtype="chat")  # a direct command still works
    answers: list[str] = []
    watcher.on_event("message", lambda m: answers.append(m["body"]) if m["type"] == "chat" and m["body"] else None)
    await until(lambda: "you have no jobs" in answers, what="the bot's answer to a direct command")
    assert agent.runs == 0 and not bot.jobs
