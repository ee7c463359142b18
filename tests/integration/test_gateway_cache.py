"""The gateway remembers which agent answered a call on one resource (scope one) and sends the next
such call straight to it; it asks the broker again only when that agent is gone or refuses, and
forgets it on any other answer. Real Prosody, real broker and monitor agents, real gateway socket."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from agents.errors import Outcome
from agents.gateway import Gateway, call_via_gateway, call_via_gateway_blocking
from agents.monitor.agent import MonitorAgent
from conftest import until

DUMMY = "/usr/lib/nagios/plugins/check_dummy"

pytestmark = pytest.mark.skipif(not Path(DUMMY).exists(), reason="monitoring-plugins-basic is not installed")


@pytest.fixture
async def gateway(mesh):
    broker = await mesh.broker()
    folder = Path(tempfile.mkdtemp(prefix="vgw-"))  # short: a socket path has at most 107 bytes
    gw = Gateway(folder / "run" / "gateway.sock", mesh.endpoint, str(broker.jid))
    await gw.start()
    yield gw, broker
    await gw.stop()


def check(resource: str, name: str = "dummy", args: list[str] | None = None, rid: str | None = None) -> dict:
    return {"op": "monitor.check", "args": {"check": name, "args": args or []}, "on": [resource], "scope": "one",
            "to": [], "timeout": 10.0, "rid": rid}


async def blocking(gw: Gateway, account: tuple[str, str], call: dict) -> dict:
    """The way check_vertebra calls: the standard-library client, off the event loop."""
    return await asyncio.to_thread(call_via_gateway_blocking, gw.path, account[0], account[1], call)


async def test_the_agent_that_answered_is_called_without_asking_the_broker_again(mesh, gateway):
    gw, broker = gateway
    mon = await mesh.agent(MonitorAgent, broker, ["/host/cache-a"])
    await until(lambda: len(broker.directory) == 1, what="the monitor agent in the directory")

    first = await blocking(gw, mesh.operator, check("/host/cache-a", args=["text=first"]))
    assert [(r["target"], r["outcome"]) for r in first["results"]] == [(str(mon.jid), "ok")]
    assert first["results"][0]["result"]["output"] == "OK: first"
    assert gw._holders == {(mesh.operator[0], "monitor.check", "/host/cache-a"): str(mon.jid)}

    # Without a broker there is no discovery: only a call that goes straight to the agent succeeds.
    await broker.stop()
    second = await blocking(gw, mesh.operator, check("/host/cache-a", args=["state=1", "text=second"]))
    assert [(r["target"], r["outcome"]) for r in second["results"]] == [(str(mon.jid), "ok")]
    assert (second["results"][0]["result"]["code"], second["results"][0]["result"]["output"]) == (1, "WARNING: second")
    # A resource it has not seen still needs the broker, which is gone: the same report as without a cache.
    other = await call_via_gateway(gw.path, *mesh.operator, check("/host/cache-z"))
    assert [r.outcome for r in other.results] != [Outcome.OK]
    assert "discovery through the broker failed" in (other.results[0].error or "")


async def test_a_gone_agent_is_rediscovered_within_the_same_call(mesh, gateway):
    gw, broker = gateway
    old = await mesh.agent(MonitorAgent, broker, ["/host/cache-b"])
    await until(lambda: len(broker.directory) == 1, what="the first monitor agent in the directory")
    assert (await blocking(gw, mesh.operator, check("/host/cache-b")))["results"][0]["outcome"] == "ok"
    key = (mesh.operator[0], "monitor.check", "/host/cache-b")
    assert gw._holders[key] == str(old.jid)

    await old.stop()
    mesh.actors.remove(old)
    new = await mesh.agent(MonitorAgent, broker, ["/host/cache-b"])
    await until(lambda: [e.jid for e in broker.directory.entries()] == [str(new.jid)],
                what="only the new monitor agent in the directory")

    report = await blocking(gw, mesh.operator, check("/host/cache-b", args=["text=moved"]))
    # One result, from the new holder: the unreachable old one is not reported, as with discovery.
    assert [(r["target"], r["outcome"]) for r in report["results"]] == [(str(new.jid), "ok")]
    assert report["results"][0]["result"]["output"] == "OK: moved"
    assert gw._holders[key] == str(new.jid)


async def test_a_refusing_agent_is_forgotten_and_a_denied_caller_is_never_remembered(mesh, gateway):
    gw, broker = gateway
    mon = await mesh.agent(MonitorAgent, broker, ["/host/cache-c"])
    await until(lambda: len(broker.directory) == 1, what="the monitor agent in the directory")
    key = (mesh.operator[0], "monitor.check", "/host/cache-c")
    assert (await blocking(gw, mesh.operator, check("/host/cache-c")))["results"][0]["outcome"] == "ok"
    assert gw._holders[key] == str(mon.jid)

    # A refusal goes through discovery again under the same request id: the same agent, which
    # answers as the first time; and the next call asks the broker again.
    failed = await blocking(gw, mesh.operator, check("/host/cache-c", name="no-such-check"))
    assert [(r["target"], r["outcome"]) for r in failed["results"]] == [(str(mon.jid), "failed")]
    assert "no check named 'no-such-check'" in failed["results"][0]["error"]
    assert key not in gw._holders

    # Not an admin: denied (by the broker's discovery, which is why what is remembered is per caller).
    stranger = mesh.account("stranger")
    for _ in range(2):
        denied = await blocking(gw, stranger, check("/host/cache-c"))
        assert [r["outcome"] for r in denied["results"]] == ["denied"]
    assert (stranger[0], "monitor.check", "/host/cache-c") not in gw._holders


async def test_an_agent_that_no_longer_holds_the_resource_is_passed_over_within_the_call(mesh, gateway):
    gw, broker = gateway
    first = await mesh.agent(MonitorAgent, broker, ["/host/cache-d"])
    await until(lambda: len(broker.directory) == 1, what="the monitor agent in the directory")
    assert (await blocking(gw, mesh.operator, check("/host/cache-d")))["results"][0]["outcome"] == "ok"
    key = (mesh.operator[0], "monitor.check", "/host/cache-d")
    assert gw._holders[key] == str(first.jid)

    # The same account comes back holding something else; another agent holds the resource now.
    await first.stop()
    mesh.actors.remove(first)
    password = f"pw-{first.jid.user}"  # conftest.Mesh.account's passwords
    broker.admit(first.jid.bare, MonitorAgent.kind, ["/host/cache-other"])  # its mesh file entry changed too
    again = await mesh.start(MonitorAgent(first.jid.bare, password, mesh.endpoint, resources=["/host/cache-other"],
                                          broker=broker.jid.bare, authorizer=mesh.admins,
                                          state_dir=mesh.home / "state" / first.jid.user))
    holder = await mesh.agent(MonitorAgent, broker, ["/host/cache-d"])
    await until(lambda: sorted(e.jid for e in broker.directory.entries()) == sorted([str(again.jid), str(holder.jid)]),
                what="both agents in the directory")
    assert str(again.jid) == str(first.jid)

    report = await blocking(gw, mesh.operator, check("/host/cache-d", args=["text=holder"]))
    assert [(r["target"], r["outcome"]) for r in report["results"]] == [(str(holder.jid), "ok")]
    assert report["results"][0]["result"]["output"] == "OK: holder"
    assert gw._holders[key] == str(holder.jid)


async def test_only_single_resource_calls_of_scope_one_are_remembered(mesh, gateway):
    gw, broker = gateway
    await mesh.agent(MonitorAgent, broker, ["/cluster/cc/node/1"])
    await mesh.agent(MonitorAgent, broker, ["/cluster/cc/node/2"])
    await until(lambda: len(broker.directory) == 2, what="both monitor agents in the directory")
    every = {**check("/cluster/cc"), "scope": "all"}
    for _ in range(2):
        report = await blocking(gw, mesh.operator, every)
        assert sorted(r["outcome"] for r in report["results"]) == ["ok", "ok"]
    assert gw._holders == {}
