"""The ops room is the bot's: members only, the bot its owner under a reserved nick, back after any loss.

Attacks come from the raw client (tests/rawxmpp.py) on ordinary accounts of the same server: an
outsider knocks at the door, reads history and posts; an outsider and a member try the bot's nick
while the bot is in the room and while it is away. On the real server of the session (Prosody, or
ejabberd with VERTEBRA_TEST_ENGINE=ejabberd).
"""

from __future__ import annotations

import logging
import uuid
from xml.etree import ElementTree

from slixmpp import JID

from broker.chat import ChatBot
from broker.room import OpsRoom
from conftest import DOMAIN, ON_EJABBERD, until
from rawxmpp import RawXMPP

MUC = "http://jabber.org/protocol/muc"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def raw(mesh, account):
    server = mesh.server
    return await RawXMPP.login(server.host, server.port, DOMAIN, account[0].split("@")[0], account[1],
                               ssl_context=server.ssl_context(), resource="raw")


async def join(client: RawXMPP, room: str, nick: str) -> ElementTree.Element:
    """Send a MUC join and return the room's answer: the joiner's own presence (status 110) or an error."""
    await client.send(f"<presence to='{room}/{nick}'><x xmlns='{MUC}'><history maxstanzas='20'/></x></presence>")

    def answer(el: ElementTree.Element) -> bool:
        if el.tag != "{jabber:client}presence" or JID(el.get("from", "")).bare != room:
            return False
        if el.get("type") == "error":
            return True
        return any(s.get("code") == "110" for s in el.iter(f"{{{MUC}#user}}status"))
    return await client.next(answer, timeout=10)


def condition(el: ElementTree.Element) -> str:
    error = el.find("{jabber:client}error")
    return next((c.tag.split("}", 1)[1] for c in error if c.tag.startswith(f"{{{STANZAS}}}") and c.tag.split("}")[1] != "text"), "") \
        if error is not None else ""


async def ops_room(mesh, **kw):
    broker = await mesh.broker()
    bot_jid, bot_pw = mesh.account("bot")
    bot = ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid), authorizer=mesh.admins)
    room_jid = f"ops-{uuid.uuid4().hex[:8]}@rooms.{DOMAIN}"
    # A nick of its own per test: ejabberd reserves a registered nick on the whole MUC service, and
    # each test's bot is another account.
    room = OpsRoom(bot, room_jid, nick=f"vertebra-{uuid.uuid4().hex[:6]}", interval=0.1, **kw)
    await mesh.start(bot)
    room.follow(broker)
    await until(lambda: room.joins >= 1, timeout=20, what="the bot in its room, configured")
    return broker, bot, room, room_jid


async def test_an_outsider_cannot_enter_read_or_post(mesh):
    member = mesh.account("member")
    broker, bot, room, room_jid = await ops_room(mesh, admins=[member[0]])
    room.coalescer.post("x", "something only members may read")
    insider = await raw(mesh, member)
    outsider = await raw(mesh, mesh.account("outsider"))
    try:
        # A member gets in and sees the history; the bot said who posted the line before.
        got = await join(insider, room_jid, "member")
        assert got.get("type") != "error", ElementTree.tostring(got)
        await insider.next(lambda el: el.findtext("{jabber:client}body") == "something only members may read",
                           timeout=10)

        refused = await join(outsider, room_jid, "curious")
        assert refused.get("type") == "error" and condition(refused) == "registration-required", \
            ElementTree.tostring(refused)
        # A post without having joined is refused and reaches nobody.
        await outsider.send(f"<message to='{room_jid}' type='groupchat'><body>fake: all clear</body></message>")
        bounced = await outsider.next(lambda el: el.tag == "{jabber:client}message" and el.get("type") == "error",
                                      timeout=10)
        assert condition(bounced) in ("not-acceptable", "forbidden", "not-allowed"), ElementTree.tostring(bounced)
        room.coalescer.post("y", "after the fake")
        seen = await insider.next(lambda el: el.tag == "{jabber:client}message" and el.get("type") == "groupchat"
                                  and el.findtext("{jabber:client}body") in ("fake: all clear", "after the fake"))
        assert seen.findtext("{jabber:client}body") == "after the fake"
    finally:
        await insider.close()
        await outsider.close()


async def test_nobody_else_takes_the_bots_nick_and_the_bot_comes_back_after_a_kick(mesh, caplog):
    member, kicker = mesh.account("member"), mesh.account("kicker")
    broker, bot, room, room_jid = await ops_room(mesh, admins=[member[0]])
    outsider = await raw(mesh, mesh.account("outsider"))
    insider = await raw(mesh, member)
    owner = await raw(mesh, kicker)
    try:
        for client in (outsider, insider):  # while the bot is in the room
            refused = await join(client, room_jid, room.nick)
            assert refused.get("type") == "error", ElementTree.tostring(refused)
        assert condition(await join(insider, room_jid, room.nick)) == "conflict"

        # Another owner (made so by the bot) kicks the bot out; the bot says why and comes back.
        await bot.xmpp.plugin["xep_0045"].set_affiliation(JID(room_jid), "owner", jid=JID(kicker[0]))
        assert (await join(owner, room_jid, "kicker")).get("type") != "error"
        caplog.set_level(logging.WARNING, logger="broker.room")
        reply = await owner.iq(room_jid, f"<query xmlns='{MUC}#admin'><item nick='{room.nick}' role='none'/></query>")
        if ON_EJABBERD:  # ejabberd lets nobody but a service admin kick an owner
            assert condition(reply) == "not-allowed", ElementTree.tostring(reply)
        else:
            assert reply.get("type") == "result", ElementTree.tostring(reply)
            await until(lambda: room.joins >= 2, timeout=20, what="the bot back in the room after the kick")
            assert any("kicked from the room" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert JID(room_jid) in bot.xmpp.plugin["xep_0045"].get_joined_rooms()

        # While the bot is away (its session gone), its nick stays reserved: a member cannot take it.
        await bot.stop()
        await owner.next(lambda el: el.tag == "{jabber:client}presence" and el.get("type") == "unavailable"
                         and el.get("from") == f"{room_jid}/{room.nick}", timeout=20)
        assert condition(await join(insider, room_jid, room.nick)) == "conflict"
    finally:
        for client in (outsider, insider, owner):
            await client.close()


async def test_the_bot_rebuilds_a_destroyed_room_and_posts_say_who_they_come_from(mesh):
    member = mesh.account("member")
    broker, bot, room, room_jid = await ops_room(mesh, admins=[member[0]])
    await bot.xmpp.plugin["xep_0045"].destroy(JID(room_jid), "test: the room is gone")
    await until(lambda: room.joins >= 2, timeout=20, what="the bot back in a room it configured again")
    # Configured again: members only.
    outsider = await raw(mesh, mesh.account("outsider"))
    insider = await raw(mesh, member)
    try:
        assert condition(await join(outsider, room_jid, "curious")) == "registration-required"
        assert (await join(insider, room_jid, "member")).get("type") != "error"
        from broker.alerts import Alert
        room.alert(Alert(1, 0.0, "monitor9@vertebra.test", "disk", "db1", "CRITICAL", "OK", "DISK CRITICAL"))
        room.fence_event({"event": "outcome", "action": "off", "cluster": "c1", "node": "node1", "ok": True,
                          "state": "off", "agent": "fencer1@vertebra.test", "requester": "alice@vertebra.test",
                          "id": "e1"})
        body = await insider.next(lambda el: el.tag == "{jabber:client}message"
                                  and "DISK CRITICAL" in (el.findtext("{jabber:client}body") or ""))
        text = body.findtext("{jabber:client}body")
        assert "(from monitor9@vertebra.test)" in text
        assert "by fencer1@vertebra.test, asked by alice@vertebra.test" in text
    finally:
        await outsider.close()
        await insider.close()
