"""Retention of received snapshots (the storage setting keep_received): after each successful commit a package
keeps its newest N snapshots, never the base of the next incremental update nor one that a spooling stream
is based on, nor one clones were made from; on the real store, and between two agents on the real server."""

from __future__ import annotations

import os
from pathlib import Path

from agents.authz import AdminsOnly
from agents.storage.agent import StorageAgent
from agents.storage.embedded import BLOCK_SIZE, EmbeddedDriver
from agents.storage.packages import PackageHost
from agents.storage.replication_state import ReplicationState
from test_replication import Sites
from test_storage_ops import Caller, tree_digest


async def test_target_keeps_the_newest_received_snapshots(mesh, tmp_path):
    src = await mesh.agent(StorageAgent, None, ["/site/a"], settings={"root": str(tmp_path / "a")})
    dst = await mesh.agent(StorageAgent, None, ["/site/b"], settings={"root": str(tmp_path / "b"), "keep_received": 2},
                           authorizer=AdminsOnly([mesh.operator[0], str(src.jid.bare)]))
    client = await mesh.client()
    s = Sites(src, dst, Caller(client, src), Caller(client, dst))
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "table").write_bytes(os.urandom(64 * BLOCK_SIZE))

    first = await s.a.ok("storage.replicate", volume="db", target=str(dst.jid.bare), tls=False)
    package, names, digests = first["package"], [first["last_snap"]], {first["last_snap"]: tree_digest(live)}
    # A clone on the target from the first snapshot keeps that snapshot whatever the retention says.
    await s.b.ok("storage.clone.create", volume=package, snapshot=names[0], clone="kept")
    for i in range(1, 5):
        with open(live / "table", "r+b") as f:
            f.seek(i * BLOCK_SIZE)
            f.write(os.urandom(BLOCK_SIZE))
        update = await s.a.ok("storage.replication.update", action=first["id"])
        # Each update is still incremental from the previous one: pruning never took the next base.
        assert update["last"]["base"] == names[-1]
        assert update["last"]["stream_bytes"] < 4 * BLOCK_SIZE
        names.append(update["last_snap"])
        digests[names[-1]] = tree_digest(live)
        held = [x["name"] for x in await s.b.ok("storage.snapshot.list", volume=package)]
        assert held == ([names[0]] + names[-2:] if i >= 2 else names)

    # What is left is whole: clone each kept snapshot and compare every file with the tree it was taken of.
    for name in names[-2:]:
        made = await s.b.ok("storage.clone.create", volume=package, snapshot=name, clone=f"c-{name[-3:]}")
        assert tree_digest(Path(made["path"])) == digests[name]
        await s.b.ok("storage.clone.destroy", clone=made["name"])
    # Once the clone goes, the next commit prunes the first snapshot too.
    await s.b.ok("storage.clone.destroy", clone="kept")
    (live / "table").write_bytes(os.urandom(64 * BLOCK_SIZE))
    last = await s.a.ok("storage.replication.update", action=first["id"])
    held = [x["name"] for x in await s.b.ok("storage.snapshot.list", volume=package)]
    assert held == [names[-1], last["last_snap"]]


def test_prune_keeps_the_base_of_a_spooling_stream(tmp_path):
    """On the real store: a partly spooled incremental stream names its base, and prune leaves that base."""
    source = EmbeddedDriver(tmp_path / "source")
    target = EmbeddedDriver(tmp_path / "target")
    state = ReplicationState(tmp_path / "state" / "replication.sqlite")
    host = PackageHost(target, state, tmp_path / "state", keep=1)
    try:
        source.create_volume("db")
        table = source.path("db") / "table"
        snaps = []
        for i in range(5):
            table.write_bytes(os.urandom(8 * BLOCK_SIZE))
            snaps.append(f"s{i}")
            source.snapshot("db", snaps[-1])
        target.receive("pkg", "s0", source.send("db", "s0"))
        for prev, snap in zip(snaps[:3], snaps[1:4]):
            target.receive("pkg", snap, source.send("db", snap, from_snap=prev))
        # A stream from s1 to s4 was being spooled when the source moved on: its first piece is here.
        spool = tmp_path / "state" / "spool"
        spool.mkdir(parents=True)
        (spool / "tpartial.part").write_bytes(next(iter(source.send("db", "s4", from_snap="s1")))[:5000])
        assert host.prune("pkg") == ["s0", "s2"]
        assert [s.name for s in target.list_snapshots("pkg")] == ["s1", "s3"]
        # The spooled stream still applies on its base once complete.
        target.receive("pkg", "s4", source.send("db", "s4", from_snap="s1"))
        target.clone("pkg", "s4", "check")
        assert (target.path("check") / "table").read_bytes() == table.read_bytes()
        (spool / "tpartial.part").unlink()
        assert host.prune("pkg") == ["s1", "s3"]
        assert [s.name for s in target.list_snapshots("pkg")] == ["s4"]
        # Without the setting nothing is pruned.
        assert PackageHost(target, state, tmp_path / "state").prune("pkg") == []
    finally:
        state.close()
        source.close()
        target.close()
