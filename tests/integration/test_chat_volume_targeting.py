"""The ops bot targets volumes as the command line does: a volume created from chat lives on one
storage agent, and a call naming it goes to the agent that holds it (real Prosody, real broker, two real
storage agents, the bot relaying for the operator)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.authz import AdminsOnly
from agents.kinds import catalogue
from agents.storage.agent import StorageAgent
from broker.chat import ChatBot, RateLimit
from conftest import until
from test_chat import Chatter


@pytest.fixture
async def scene(mesh, tmp_path):
    bot_jid, bot_pw = mesh.account("bot")
    broker = await mesh.broker(delegates=[bot_jid])
    stores = [await mesh.agent(StorageAgent, broker, [f"/host/{n}", f"/pool/{n}"], delegates=[bot_jid])
              for n in ("a", "b")]
    (tmp_path / "bot").mkdir()
    bot = await mesh.start(ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid),
                                   authorizer=AdminsOnly([mesh.operator[0]]), ops=catalogue(),
                                   state_dir=tmp_path / "bot", rate=RateLimit(burst=20, rate=20)))
    await until(lambda: len(broker.directory.discover("storage.volume.create", [])) == 2, what="both stores listed")
    me = Chatter(await mesh.client(), str(bot.jid))
    return broker, stores, me


def holders(stores, volume: str) -> list[StorageAgent]:
    return [s for s in stores if (Path(s.driver.root) / "volumes" / volume).exists()]


async def test_create_goes_to_one_store_and_calls_on_the_volume_reach_it(scene):
    broker, stores, me = scene
    await me.ask("call storage.volume.create volume=db", "storage.volume.create: 1 of 1 ok")
    (owner,) = holders(stores, "db")
    await until(lambda: broker.directory.discover("storage.snapshot.create", ["/volume/db"]), what="db located")
    text = await me.ask("call storage.snapshot.create volume=db snapshot=s1", "storage.snapshot.create: 1 of 1 ok")
    assert owner.jid.user in text
    assert [s.name for s in owner.driver.list_snapshots("db")] == ["s1"]
