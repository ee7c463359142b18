"""The audit log survives its writer: agents anchor their keyed heads at the broker and `verify` names a
cut or a rewrite; a destructive op's decision is on disk before the op starts (SIGKILL test); requests
refused before a decision are audited; the log files are private; a msgpack map naming a key twice is
bad-payload. Attacks go through the raw client (tests/rawxmpp.py), against the real server."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from agents import audit
from agents.audit import Anchor, chain_hash, load_key
from conftest import DOMAIN, ROOT, running, until, vertebra, vertebra_up
from rawxmpp import RawXMPP, app_condition
from sample_agent import SampleAgent


class QuickAnchors(SampleAgent):
    """A sample agent that anchors its audit head every 0.2 s instead of every 30 s."""

    audit_anchor_interval = 0.2


async def _anchors(broker, agent) -> list[Anchor]:
    return [Anchor(*a) for a in await broker.anchors.store.of(agent.jid.bare, 0, 10_000)]


async def _head_anchored(broker, agent, seq: int) -> bool:
    anchors = await _anchors(broker, agent)
    return bool(anchors) and anchors[-1].seq >= seq


def _copy_log(src: Path, dst: Path) -> Path:
    """A consistent copy of a log (and its key) to tamper with, as an attacker on the agent's machine would."""
    dst.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as db, sqlite3.connect(dst / "audit.sqlite") as out:
        db.backup(out)
    shutil.copy(src.with_suffix(".key"), dst / "audit.key")
    return dst / "audit.sqlite"


def _rewrite(path: Path, seq: int, key: bytes | None) -> None:
    """Edit record ``seq`` and recompute every later hash, under ``key`` (None: plain SHA-256)."""
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET body = replace(body, '\"decision\":\"allow\"', '\"decision\":\"deny\"')"
               " WHERE seq = ?", (seq,))
    prev = db.execute("SELECT hash FROM records WHERE seq = ?", (seq - 1,)).fetchone()[0] if seq > 1 else audit.GENESIS
    for s, body in db.execute("SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (seq,)).fetchall():
        digest = chain_hash(prev, body, key)
        db.execute("UPDATE records SET prev = ?, hash = ? WHERE seq = ?", (prev, digest, s))
        prev = digest
    db.commit()
    db.close()


def _cut(path: Path, keep: int) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER records_no_delete")
    db.execute("DELETE FROM records WHERE seq > ?", (keep,))
    db.commit()
    db.close()


async def test_agents_anchor_their_heads_and_verify_names_a_cut_and_a_rewrite(mesh, tmp_path):
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    agent = await mesh.agent(QuickAnchors, broker, ["/host/a1"])
    client = await mesh.client(broker)
    for i in range(4):
        assert (await client.call("sample.echo", {"text": f"hi{i}"}, to=[str(agent.jid)])).ok
    log = agent.state_dir / "audit.sqlite"
    await until(lambda: _head_anchored(broker, agent, 8), what="the head anchored")
    await agent.stop()  # anchors its last head on the way out
    mesh.actors.remove(agent)
    anchors = await _anchors(broker, agent)
    with sqlite3.connect(log) as db:
        last_seq, last_hash = db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    assert (anchors[-1].seq, anchors[-1].hash) == (last_seq, last_hash), "the shutdown anchor is the head"
    intact = audit.verify(log, anchors=anchors)
    assert intact.ok and "keyed" in intact.message and f"record {last_seq}" in intact.message, intact

    # Records cut off the end: a shorter chain is still a valid chain; the anchors say it is short.
    cut = _copy_log(log, tmp_path / "cut")
    _cut(cut, last_seq - 3)
    assert audit.verify(cut).ok  # the chain alone cannot tell
    result = audit.verify(cut, anchors=anchors)
    assert not result.ok and "cut off the end" in result.message and f"ends at record {last_seq - 3}" in result.message
    code, text = audit.audit_verify(cut, anchors=anchors)
    assert code == 1 and "TAMPERED" in text

    # An edit with every later hash recomputed, by someone without the key: the keyed chain breaks.
    # The record edited is the first decision to allow after the first record (which records come
    # first depends on timing; the first one rewritten would leave no keyed record at all).
    with sqlite3.connect(log) as db:
        edited = db.execute("SELECT min(seq) FROM records WHERE seq > 1 AND body LIKE"
                            " '%\"decision\":\"allow\"%'").fetchone()[0]
    assert edited is not None and edited < last_seq, "a decision to allow, before the head"
    unkeyed = _copy_log(log, tmp_path / "unkeyed")
    _rewrite(unkeyed, edited, key=None)
    result = audit.verify(unkeyed)
    assert not result.ok and result.bad_seq == edited and "under the log's key" in result.message

    # The same with the key: the chain holds, the broker's anchors do not.
    keyed = _copy_log(log, tmp_path / "keyed")
    _rewrite(keyed, edited, key=load_key(keyed.with_suffix(".key")))
    assert audit.verify(keyed).ok
    result = audit.verify(keyed, anchors=anchors)
    assert not result.ok and "rewritten" in result.message, result


async def test_only_live_agents_of_the_mesh_anchor_and_a_contradicting_anchor_is_refused(mesh, tmp_path):
    broker = await mesh.broker(state_dir=tmp_path / "broker")
    agent = await mesh.agent(QuickAnchors, broker, ["/host/a2"])
    await until(lambda: broker.directory.entries(), what="the agent listed")
    digest = "ab" * 32
    stranger = mesh.account("stranger")
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *stranger,
                              ssl_context=mesh.server.ssl_context())
    try:
        reply = await raw.iq(str(broker.jid), raw.op_xml("mesh.audit.anchor", {"seq": 99, "hash": digest},
                                                         timeout_ms=5000))
        assert app_condition(reply) == "denied"
        # Nor may anyone anchor for an agent: there is no argument naming one, and `for` is refused.
        reply = await raw.iq(str(broker.jid), raw.op_xml("mesh.audit.anchor", {"seq": 99, "hash": digest},
                                                         for_=agent.jid.bare, timeout_ms=5000))
        assert app_condition(reply) == "denied"
    finally:
        await raw.close()
    assert await broker.anchors.store.of(stranger[0]) == []
    assert all(a[0] != 99 for a in await broker.anchors.store.of(agent.jid.bare))

    # The agent itself, contradicting an anchor it sent before (its log rewritten): refused, first one stands.
    first = await agent.request(str(broker.jid), "mesh.audit.anchor", {"seq": 1000, "hash": digest}, timeout=5)
    assert first.outcome.value == "ok", first.error
    other = await agent.request(str(broker.jid), "mesh.audit.anchor", {"seq": 1000, "hash": "cd" * 32}, timeout=5)
    assert other.outcome.value != "ok" and "anchored with another hash" in other.error
    assert (1000, digest) in [(s, h) for s, h, _ in await broker.anchors.store.of(agent.jid.bare)]


# -- a destructive op's decision is on disk before the op starts -----------------------------------

_SLOW_AGENT = textwrap.dedent('''
    import asyncio, sys, time
    from pathlib import Path
    from typing import Annotated
    sys.path.insert(0, sys.argv[8])
    from sample_agent import SampleAgent
    from agents.actor import Endpoint
    from agents.authz import AdminsOnly
    from agents.agent import Call
    from agents.ops import Arg, op

    class Poweroff(SampleAgent):
        @op("sample.poweroff", effect="destructive", deadline=60)
        async def poweroff(self, call: Call, marker: Annotated[str, Arg("a file the op creates as it starts")]) -> str:
            """Stands for an op that takes the machine down with it: it starts, then the process dies."""
            Path(marker).write_text("started")
            time.sleep(60)  # blocks the loop, as a crash would: nothing written later than this gets out
            return "off"

    jid, password, port, cert, admin, resource, state = sys.argv[1:8]

    async def main():
        agent = Poweroff(jid, password, Endpoint.pinned("127.0.0.1", int(port), "vertebra.test", cert),
                         resources=[resource], authorizer=AdminsOnly([admin]), state_dir=Path(state))
        await agent.start()
        print("online", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
''')


async def test_the_decision_of_a_destructive_op_survives_a_kill_as_the_op_starts(mesh, tmp_path):
    jid, password = mesh.account("poweroff")
    state = tmp_path / "poweroff-state"
    script = tmp_path / "poweroff_agent.py"
    script.write_text(_SLOW_AGENT)
    proc = subprocess.Popen([sys.executable, str(script), jid, password, str(mesh.server.port),
                             str(mesh.server.cert_path), mesh.operator[0], "/host/p1", str(state),
                             str(ROOT / "tests")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "online"
        client = await mesh.client()
        marker = tmp_path / "started"
        call = asyncio.ensure_future(client.call("sample.poweroff", {"marker": str(marker)},
                                                 to=[f"{jid}/agent"], timeout=30))
        await until(marker.exists, timeout=20, what="the destructive op to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        call.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = audit.show(state / "audit.sqlite", op="sample.poweroff")
    assert [(r["kind"], r["caller"], r["decision"]) for r in records] == [("decided", mesh.operator[0], "allow")]
    assert audit.verify(state / "audit.sqlite").ok


# -- refused before a decision: audited, rate-limited per sender ------------------------------------

def _raw_op(name: str, payload_b64: str, rid: str, **attrs: str) -> str:
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f'<op xmlns="urn:vertebra:1" name="{name}" rid="{rid}" timeout="5000"{extra}>{payload_b64}</op>'


async def test_requests_refused_before_a_decision_are_audited_per_sender_within_a_limit(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/r1"])
    mallory = mesh.account("mallory")
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, *mallory,
                              ssl_context=mesh.server.ssl_context())
    to = str(agent.jid)
    try:
        forged = await raw.iq(to, raw.op_xml("sample.echo", {"text": "x"}, for_=mesh.operator[0], rid="forged",
                                             timeout_ms=5000))
        assert app_condition(forged) == "denied"
        bad = await raw.iq(to, _raw_op("sample.echo", "!!not base64!!", "badpayload"))
        assert app_condition(bad) == "bad-payload"
        unknown = await raw.iq(to, raw.op_xml("sample.nosuch", {}, rid="unknown", timeout_ms=5000))
        assert app_condition(unknown) == "unknown-op"
        no_rid = await raw.iq(to, _raw_op("sample.echo", "", ""))
        assert app_condition(no_rid) == "bad-payload"
        refused = {r["rid"]: r for r in audit.show(agent.state_dir / "audit.sqlite", caller=mallory[0])}
        assert refused["forged"]["kind"] == "refused" and refused["forged"]["for"] == mesh.operator[0]
        assert refused["forged"]["condition"] == "denied" and refused["forged"]["op"] == "sample.echo"
        assert refused["badpayload"]["condition"] == "bad-payload"
        assert refused["unknown"]["op"] == "sample.nosuch" and refused["unknown"]["condition"] == "unknown-op"
        assert refused[""]["condition"] == "bad-payload" and "no valid rid" in refused[""]["reason"]

        # A flood of them costs a few records and one count, not a record each.
        for i in range(60):
            await raw.send(f'<iq type="set" id="f{i}" to="{to}">'
                           + raw.op_xml("sample.echo", {"text": "x"}, for_=mesh.operator[0], rid=f"flood{i}") + "</iq>")
        await raw.next(lambda el: el.get("id") == "f59", timeout=20)
    finally:
        await raw.close()
    agent.audit.flush()
    mine = audit.show(agent.state_dir / "audit.sqlite", caller=mallory[0])
    written = [r for r in mine if r["kind"] == "refused"]
    held = sum(r["count"] for r in mine if r["kind"] == "denials-suppressed")
    assert len(written) <= agent.audit.burst + 1 and len(written) + held == 64, (len(written), held)
    assert audit.verify(agent.state_dir / "audit.sqlite").ok


# -- a map that names a key twice ------------------------------------------------------------------------

async def test_a_payload_map_naming_a_key_twice_is_bad_payload(mesh):
    agent = await mesh.agent(SampleAgent, None, ["/host/d1"])
    jid, password = mesh.operator
    raw = await RawXMPP.login(mesh.server.host, mesh.server.port, DOMAIN, jid, password,
                              ssl_context=mesh.server.ssl_context())
    # {"text": "harmless", "text": "other"}: msgpack map of 2 pairs, the same key twice.
    twice = base64.b64encode(b"\x82\xa4text\xa8harmless\xa4text\xa5other").decode()
    try:
        reply = await raw.iq(str(agent.jid), _raw_op("sample.echo", twice, "dupkey"))
        assert reply.get("type") == "error" and app_condition(reply) == "bad-payload"
        assert "more than once" in "".join(reply.itertext())
        once = base64.b64encode(b"\x81\xa4text\xa8harmless").decode()
        assert (await raw.iq(str(agent.jid), _raw_op("sample.echo", once, "onekey"))).get("type") == "result"
    finally:
        await raw.close()
    assert [r["condition"] for r in audit.show(agent.state_dir / "audit.sqlite", caller=jid)
            if r["kind"] == "refused"] == ["bad-payload"]


# -- private files ---------------------------------------------------------------------------------

def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_an_agents_audit_log_key_and_request_log_are_private(mesh, tmp_path):
    state = tmp_path / "shared-looking"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    agent = await mesh.agent(SampleAgent, None, ["/host/m1"], state_dir=state)
    client = await mesh.client()
    assert (await client.call("sample.echo", {"text": "hi"}, to=[str(agent.jid)])).ok
    agent.audit.flush()
    assert _mode(state) == 0o700
    for name in ("audit.sqlite", "audit.key", "requests.sqlite", "audit.sqlite-wal"):
        assert _mode(state / name) == 0o600, name


def test_vertebra_up_keeps_logs_and_state_private(tmp_path):
    with vertebra_up(tmp_path) as (home, _shown):
        logs = sorted((home / "logs").glob("*.log"))
        assert logs and _mode(home / "logs") == 0o700
        assert {p.name: _mode(p) for p in logs} == {p.name: 0o600 for p in logs}
        assert _mode(home / "state") == 0o700
        audits = sorted((home / "state").glob("*/audit.sqlite"))
        assert audits
        for log in audits:
            assert _mode(log.parent) == 0o700, log.parent
            for name in ("audit.sqlite", "audit.key"):
                assert _mode(log.parent / name) == 0o600, log.parent / name
        requests = sorted((home / "state").glob("*/requests.sqlite"))
        assert requests and {p: _mode(p) for p in requests} == {p: 0o600 for p in requests}



# -- the command line --------------------------------------------------------------------------------

def _pids_running(*words: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w.encode() in cmdline for w in words):
                found.append(int(entry.name))
    return found


def test_vertebra_audit_verify_compares_with_the_brokers_anchors(mesh_home):
    home = mesh_home([{"name": "mon", "kind": "monitor", "resources": ["/host/v1"]}])
    cfg = yaml.safe_load((home / "mesh.yaml").read_text())
    name = cfg["agents"][0]["name"]
    log = home / "state" / name / "audit.sqlite"
    with running(home):
        for _ in range(3):
            assert vertebra(home, "call", "monitor.info").returncode == 0
        # Stop the agent alone (SIGTERM): it anchors its head at the broker, which still runs.
        for pid in _pids_running(str(home), "agent", name):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _pids_running(str(home), "agent", name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pids_running(str(home), "agent", name)
        ok = vertebra(home, "audit", "verify", "--agent", name)
        assert ok.returncode == 0 and "matching the" in ok.stdout, ok.stdout + ok.stderr
        with sqlite3.connect(log) as db:
            last = db.execute("SELECT MAX(seq) FROM records").fetchone()[0]
        _cut(log, last - 2)
        cut = vertebra(home, "audit", "verify", "--agent", name)
        assert cut.returncode == 1 and "records were cut off the end" in cut.stdout, cut.stdout + cut.stderr
        assert f"ends at record {last - 2}, but its agent anchored record {last}" in cut.stdout
    # The broker stopped: its anchor file tells the same; without either, the cut cannot be checked.
    anchors_db = home / "state" / cfg["broker"] / "audit-anchors.sqlite"
    offline = vertebra(home, "audit", "verify", "--agent", name, "--anchors", str(anchors_db))
    assert offline.returncode == 1 and "records were cut off the end" in offline.stdout, offline.stdout
    alone = vertebra(home, "audit", "verify", "--agent", name, "--timeout", "5")
    assert alone.returncode == 2 and "could not get the anchors" in alone.stdout, alone.stdout + alone.stderr
