"""Only the chat bot creates rooms on a mesh's private server: another account of the server that
created the ops room before the bot (at the first start, or after the room was lost) would own it, and
the bot could never configure it members-only nor get in as its owner.

On a private server of this test's own, of the engine under test, started as `vertebra up` starts it
from a mesh file whose bot posts to ops@rooms.DOMAIN.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from agents import cli, config
from conftest import DOMAIN, ON_EJABBERD, free_port
from rawxmpp import RawXMPP
from test_room_trust import condition, join


def _mesh(tmp_path, port: int, room: str = f"ops@rooms.{DOMAIN}") -> config.MeshConfig:
    path = tmp_path / "mesh.yaml"
    path.write_text(textwrap.dedent(f"""\
        server:
          domain: {DOMAIN}
          port: {port}
          engine: {"ejabberd" if ON_EJABBERD else "prosody"}
          node_name: roommade@127.0.0.1
        chat:
          account: bot
          room: {room}
        """))
    return config.load(path, tmp_path / "home")


def test_the_mesh_file_names_its_bot_the_one_room_creator(tmp_path):
    mesh = _mesh(tmp_path, 5322)
    assert mesh.room_creators == (f"bot@{DOMAIN}",)
    assert cli._server(mesh).room_creators == (f"bot@{DOMAIN}",)
    # A room on another server's service: this server's rooms stay open to its accounts.
    assert _mesh(tmp_path, 5322, room="ops@conference.example.org").room_creators == ()


@pytest.mark.each_engine
async def test_an_account_other_than_the_bot_cannot_create_the_ops_room_before_it(tmp_path):
    mesh = _mesh(tmp_path, free_port())
    server: Any = cli._server(mesh)
    server.start()
    clients: list[RawXMPP] = []
    try:
        server.register_many({"bot": "bot-pw", "mallory": "m-pw"})

        async def login(user: str, password: str) -> RawXMPP:
            client = await RawXMPP.login(server.host, server.port, DOMAIN, user, password,
                                         ssl_context=server.ssl_context(), resource="raw")
            clients.append(client)
            return client

        mallory = await login("mallory", "m-pw")
        for room in (f"ops@rooms.{DOMAIN}", f"other@rooms.{DOMAIN}"):
            refused = await join(mallory, room, "mallory")
            assert refused.get("type") == "error" and condition(refused) in ("not-allowed", "forbidden"), \
                f"{room}: {refused.attrib}"
        # The bot creates the ops room and is its owner.
        bot = await login("bot", "bot-pw")
        created = await join(bot, f"ops@rooms.{DOMAIN}", "vertebra")
        assert created.get("type") != "error", created.attrib
        item = created.find("{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}item")
        assert item is not None and item.get("affiliation") == "owner", created.attrib
    finally:
        for client in clients:
            await client.close()
        server.stop()
