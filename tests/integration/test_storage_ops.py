"""The storage agent's ops end to end on the real server: a client calls each op on a storage agent running
the embedded driver, and the same walk on the btrfs driver on a loop-mounted image."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence


from agents.authz import Decision
from agents.errors import Outcome
from agents.ops import OpSpec
from agents.storage.agent import StorageAgent
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)


def tree_digest(top: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(top):
        for name in files:
            full = Path(dirpath) / name
            out[str(full.relative_to(top))] = hashlib.sha256(full.read_bytes()).hexdigest()
    return out


class Caller:
    """One client and one storage agent: call an op, get its result or its error."""

    def __init__(self, client: Any, agent: StorageAgent) -> None:
        self.client, self.target = client, str(agent.jid)

    async def ok(self, op: str, **args: Any) -> Any:
        report = await self.client.call(op, args, to=[self.target], timeout=30)
        (res,) = report.results
        assert res.outcome is Outcome.OK, f"{op} {args}: {res.outcome.value}: {res.error}"
        return res.result

    async def fails(self, op: str, **args: Any) -> tuple[Outcome, str]:
        report = await self.client.call(op, args, to=[self.target], timeout=30)
        (res,) = report.results
        assert res.outcome is not Outcome.OK, f"{op} {args} should have failed, got {res.result}"
        return res.outcome, res.error


async def walk_every_op(call: Caller) -> None:
    """Create, snapshot, clone, change, rewind, refresh, refuse destroys with dependants, tear down."""
    vol = await call.ok("storage.volume.create", volume="db")
    assert vol["kind"] == "volume" and vol["snapshots"] == []
    live = Path(vol["path"])
    (live / "base").mkdir()
    (live / "base" / "pages").write_bytes(os.urandom(64 * 1024))
    (live / "PG_VERSION").write_text("16\n")
    v1 = tree_digest(live)

    snap = await call.ok("storage.snapshot.create", volume="db", snapshot="s1")
    assert snap["name"] == "s1" and snap["logical_bytes"] == 64 * 1024 + 3 and snap["clones"] == []

    clone = await call.ok("storage.clone.create", volume="db", snapshot="s1", clone="dev-alice")
    assert clone["kind"] == "clone" and clone["origin"] == "db@s1"
    alice = Path(clone["path"])
    assert tree_digest(alice) == v1

    # The developer changes their clone, keeps a snapshot of it, breaks it, and rewinds.
    (alice / "PG_VERSION").write_text("17\n")
    await call.ok("storage.snapshot.create", volume="dev-alice", snapshot="mine")
    mine = tree_digest(alice)
    (alice / "base" / "pages").write_bytes(b"broken")
    rewound = await call.ok("storage.clone.rollback", clone="dev-alice", snapshot="mine")
    assert rewound["name"] == "dev-alice"
    assert tree_digest(alice) == mine

    # Production moves on; the clone is refreshed to the newer snapshot.
    (live / "PG_VERSION").write_text("18\n")
    v2 = tree_digest(live)
    await call.ok("storage.snapshot.create", volume="db", snapshot="s2")
    assert [s["name"] for s in await call.ok("storage.snapshot.list", volume="db")] == ["s1", "s2"]
    refreshed = await call.ok("storage.clone.refresh", clone="dev-alice", snapshot="s2")
    assert refreshed["origin"] == "db@s2"
    assert tree_digest(alice) == v2

    listed = {v["name"]: v for v in await call.ok("storage.volume.list")}
    assert set(listed) == {"db", "dev-alice"} and listed["dev-alice"]["snapshots"] == ["mine"]
    assert all(v["used_bytes"] >= 0 and v["used_method"] for v in listed.values())

    # Destroys with dependants refuse, name them, and change nothing.
    outcome, error = await call.fails("storage.snapshot.destroy", volume="db", snapshot="s2")
    assert outcome is Outcome.FAILED and error.startswith("has-dependants") and "dev-alice" in error
    outcome, error = await call.fails("storage.volume.destroy", volume="db")
    assert error.startswith("has-dependants") and "db@s1" in error and "db@s2" in error
    outcome, error = await call.fails("storage.clone.destroy", clone="dev-alice")
    assert error.startswith("has-dependants") and "dev-alice@mine" in error
    assert tree_digest(alice) == v2 and tree_digest(live) == v2

    # Tear down in dependency order.
    await call.ok("storage.snapshot.destroy", volume="dev-alice", snapshot="mine")
    assert (await call.ok("storage.clone.destroy", clone="dev-alice")) == {"destroyed": "dev-alice"}
    assert not alice.exists()
    for s in ("s1", "s2"):
        await call.ok("storage.snapshot.destroy", volume="db", snapshot=s)
    await call.ok("storage.volume.destroy", volume="db")
    assert await call.ok("storage.volume.list") == []


async def test_every_op_end_to_end_on_the_embedded_driver(mesh, tmp_path):
    agent = await mesh.agent(StorageAgent, None, ["/site/a"], settings={"root": str(tmp_path / "store")})
    await walk_every_op(Caller(await mesh.client(), agent))


async def test_every_op_end_to_end_on_the_btrfs_driver(btrfs_mounts, mesh):  # noqa: F811
    # btrfs_mounts first: the agent (which holds its catalog open) must stop before the mount goes.
    agent = await mesh.agent(StorageAgent, None, ["/site/a"],
                             settings={"driver": "btrfs", "root": str(btrfs_mounts[0] / "vertebra")})
    call = Caller(await mesh.client(), agent)
    info = await call.ok("storage.info")
    assert info["driver"] == "btrfs" and "atomic-snapshot" in info["capabilities"]
    await walk_every_op(call)


async def test_default_root_is_under_the_agents_state_dir(mesh, tmp_path):
    agent = await mesh.agent(StorageAgent, None, ["/site/a"], state_dir=tmp_path / "state")
    call = Caller(await mesh.client(), agent)
    vol = await call.ok("storage.volume.create", volume="v")
    assert Path(vol["path"]).is_relative_to(tmp_path / "state" / "storage")
    assert (await call.ok("storage.info"))["driver"] == "embedded"


async def test_bad_input_is_refused_with_a_reason_and_changes_nothing(mesh, tmp_path):
    agent = await mesh.agent(StorageAgent, None, ["/site/a"], settings={"root": str(tmp_path / "store")})
    call = Caller(await mesh.client(), agent)
    for bad in ("../etc", "a/b", "..", ".hidden", "x" * 65, ""):
        outcome, error = await call.fails("storage.volume.create", volume=bad)
        assert outcome is Outcome.FAILED and error.startswith("bad-argument") and "'volume'" in error, error
    assert await call.ok("storage.volume.list") == []
    assert sorted(os.listdir(tmp_path / "store" / "volumes")) == []

    outcome, error = await call.fails("storage.snapshot.create", volume="nope", snapshot="s")
    assert error.startswith("not-found") and "'nope'" in error
    await call.ok("storage.volume.create", volume="v")
    outcome, error = await call.fails("storage.volume.create", volume="v")
    assert error.startswith("exists") and "pick another name" in error
    outcome, error = await call.fails("storage.clone.rollback", clone="v", snapshot="s")
    assert error.startswith("bad-argument") and "not a clone" in error
    outcome, error = await call.fails("storage.clone.create", volume="v", snapshot="none", clone="c")
    assert error.startswith("not-found") and "'none'" in error
    assert [v["name"] for v in await call.ok("storage.volume.list")] == ["v"]


class OwnVolumesOnly:
    """A policy in miniature: the operator may do anything; the developer only on /volume/<their prefix>*."""

    def __init__(self, operator: str, developer: str, prefix: str) -> None:
        self.operator, self.developer, self.prefix = operator, developer, prefix

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        if caller == self.operator:
            return Decision(True, "operator")
        if caller == self.developer and all(r.startswith(f"/volume/{self.prefix}") for r in resources):
            return Decision(True, "own volumes")
        return Decision(False, f"{caller} may not run {spec.name} on {' '.join(resources)}")


async def test_authorization_sees_the_volumes_an_op_acts_on(mesh, tmp_path):
    dev_account = mesh.account("dev")
    policy = OwnVolumesOnly(mesh.operator[0], dev_account[0], "alice")
    agent = await mesh.agent(StorageAgent, None, ["/site/a"], settings={"root": str(tmp_path / "store")},
                             authorizer=policy)
    admin = Caller(await mesh.client(), agent)
    dev = Caller(await mesh.client(account=dev_account), agent)
    await admin.ok("storage.volume.create", volume="prod")
    await admin.ok("storage.snapshot.create", volume="prod", snapshot="s1")
    await dev.ok("storage.volume.create", volume="alice-scratch")
    outcome, error = await dev.fails("storage.volume.destroy", volume="prod")
    assert outcome is Outcome.DENIED and "/volume/prod" in error
    # Cloning reads the source volume too, so a grant on the clone's name alone is not enough.
    outcome, error = await dev.fails("storage.clone.create", volume="prod", snapshot="s1", clone="alice-db")
    assert outcome is Outcome.DENIED and "/volume/prod" in error
    assert sorted(v["name"] for v in await admin.ok("storage.volume.list")) == ["alice-scratch", "prod"]
