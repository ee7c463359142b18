"""Replication between two storage agents on the real server: a source volume replicated into packages on a
target agent over a negotiated TCP stream (TLS by default), full then incremental, checked file by file;
an in-place page rewrite sends about what changed; packages of one volume stay independent; a cut
connection, a pause and a restarted source agent resume without receiving anything twice."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any


from agents.authz import AdminsOnly
from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from agents.storage.packages import transfer_id
from conftest import until
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)
from test_storage_ops import Caller, tree_digest

PAGE = 8192


class Sites:
    """A source and a target storage agent (the target admits the source's calls) and a client for each."""

    def __init__(self, src: StorageAgent, dst: StorageAgent, src_call: Caller, dst_call: Caller) -> None:
        self.src, self.dst, self.a, self.b = src, dst, src_call, dst_call

    async def clone_matches(self, package: str, snapshot: str, live: Path, clone: str) -> None:
        """Clone a package snapshot on the target and compare every file's checksum with `live`."""
        made = await self.b.ok("storage.clone.create", volume=package, snapshot=snapshot, clone=clone)
        assert tree_digest(Path(made["path"])) == tree_digest(live)


async def sites(mesh, tmp_path, driver: str | tuple[str, str] = "embedded",
                roots: tuple[Path, Path] | None = None) -> Sites:
    """Two sites of one driver, or of (source driver, target driver)."""
    roots = roots or (tmp_path / "a", tmp_path / "b")
    drivers = (driver, driver) if isinstance(driver, str) else driver
    src = await mesh.agent(StorageAgent, None, ["/site/a"], settings={"driver": drivers[0], "root": str(roots[0])})
    dst = await mesh.agent(StorageAgent, None, ["/site/b"], settings={"driver": drivers[1], "root": str(roots[1])},
                           authorizer=AdminsOnly([mesh.operator[0], str(src.jid.bare)]))
    client = await mesh.client()
    return Sites(src, dst, Caller(client, src), Caller(client, dst))


def fill(live: Path) -> None:
    (live / "base").mkdir()
    (live / "base" / "16384").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (live / "base" / "conf").write_text("shared_buffers = 128MB\n")
    (live / "empty").mkdir()
    os.symlink("base/conf", live / "link")


async def test_full_then_incremental_updates_arrive_identical(mesh, tmp_path):
    await full_then_incremental(await sites(mesh, tmp_path))


async def test_full_then_incremental_on_the_btrfs_driver(btrfs_mounts, mesh, tmp_path):  # noqa: F811
    # btrfs_mounts first: the agents (which hold their catalogs open) must stop before the mounts go.
    roots = (btrfs_mounts[0] / "vertebra", btrfs_mounts[1] / "vertebra")
    await full_then_incremental(await sites(mesh, tmp_path, "btrfs", roots))


async def full_then_incremental(s: Sites) -> None:
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    fill(live)

    reports: list[Any] = []
    report = await s.a.client.call("storage.replicate", {"volume": "db", "target": str(s.dst.jid.bare)},
                                   to=[s.a.target], timeout=60, progress=lambda _t, _n, p: reports.append(p))
    (res,) = report.results
    assert res.outcome is Outcome.OK, res.error
    first = res.result
    assert first["tls"] is True and first["last"]["base"] is None and first["pending"] is None
    assert any(p.get("phase") == "done" for p in reports), reports
    # The stream's byte count as it goes (of its length where the driver knows it: embedded, not btrfs).
    sending = [p for p in reports if p.get("phase") == "sending"]
    assert sending and sending[0]["bytes"] > 0 and sending[0]["rate"] is not None, reports
    assert all((p["total"] is None) == (s.src.driver.name == "btrfs") for p in sending), reports
    package = first["package"]
    await s.clone_matches(package, first["last_snap"], live, "check1")

    # Change, add and delete files; the next update is incremental from the first snapshot.
    with open(live / "base" / "16384", "r+b") as f:
        f.seek(5 * PAGE)
        f.write(os.urandom(PAGE))
    (live / "base" / "new").write_bytes(os.urandom(20000))
    (live / "base" / "conf").unlink()
    (live / "link").unlink()
    second = await s.a.ok("storage.replication.update", action=first["id"])
    assert second["last"]["base"] == first["last_snap"]
    assert second["last"]["stream_bytes"] < first["last"]["stream_bytes"] / 10
    await s.clone_matches(package, second["last_snap"], live, "check2")

    # The package is read-only on the target and lists both snapshots; the source kept only the newest.
    (pkg,) = await s.b.ok("storage.package.list")
    assert pkg["source"] == str(s.src.jid.bare) and pkg["source_volume"] == "db"
    assert [x["name"] for x in pkg["snapshots"]] == [first["last_snap"], second["last_snap"]]
    outcome, error = await s.b.fails("storage.snapshot.create", volume=package, snapshot="mine")
    assert error.startswith("bad-argument") and "replica" in error
    assert [x["name"] for x in await s.a.ok("storage.snapshot.list", volume="db")] == [second["last_snap"]]


async def test_an_in_place_page_rewrite_sends_about_what_changed(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    pages = 1024                                   # an 8 MiB table file of random (incompressible) pages
    (live / "table").write_bytes(os.urandom(pages * PAGE))
    first = await s.a.ok("storage.replicate", volume="db", target=str(s.dst.jid.bare), tls=False)
    assert first["tls"] is False

    rewritten = random.Random(6).sample(range(pages), pages // 100)    # 1% of the pages, in place
    with open(live / "table", "r+b") as f:
        for p in rewritten:
            f.seek(p * PAGE)
            f.write(os.urandom(PAGE))
    changed = len(rewritten) * PAGE
    second = (await s.a.ok("storage.replication.update", action=first["id"]))["last"]
    assert changed <= second["sent_bytes"] == second["stream_bytes"] <= 1.05 * changed, (changed, second)
    # Snapshots taken to be sent make no base for clones (on ext4 a second copy of the 8 MiB table each).
    assert list((tmp_path / "a" / "bases").iterdir()) == []
    await s.clone_matches(first["package"], second["snapshot"], live, "check")


async def test_two_packages_of_one_volume_stay_independent(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "v").write_text("one\n")
    target = str(s.dst.jid.bare)
    one = await s.a.ok("storage.replicate", volume="db", target=target, package="db-hourly")
    two = await s.a.ok("storage.replicate", volume="db", target=target, package="db-daily")
    outcome, error = await s.a.fails("storage.replicate", volume="db", target=target, package="db-daily")
    assert error.startswith("exists") and "db-daily" in error

    (live / "v").write_text("two\n")
    one2 = await s.a.ok("storage.replication.update", action=one["id"])
    packages = {p["package"]: p for p in await s.b.ok("storage.package.list")}
    assert [x["name"] for x in packages["db-hourly"]["snapshots"]] == [one["last_snap"], one2["last_snap"]]
    assert [x["name"] for x in packages["db-daily"]["snapshots"]] == [two["last_snap"]]
    daily = await s.b.ok("storage.clone.create", volume="db-daily", snapshot=two["last_snap"], clone="d1")
    assert (Path(daily["path"]) / "v").read_text() == "one\n"

    # Dropping one action and its package leaves the other whole, and it still updates incrementally.
    await s.a.ok("storage.replication.destroy", action=one["id"])
    await s.b.ok("storage.package.destroy", package="db-hourly")
    (live / "v").write_text("three\n")
    two2 = await s.a.ok("storage.replication.update", action=two["id"])
    assert two2["last"]["base"] == two["last_snap"]
    assert [p["package"] for p in await s.b.ok("storage.package.list")] == ["db-daily"]
    assert [a["id"] for a in await s.a.ok("storage.replication.list")] == [two["id"]]
    await s.clone_matches("db-daily", two2["last_snap"], live, "d2")


async def start_slow_replication(s: Sites, live: Path, **args: Any) -> tuple[asyncio.Task, dict, str]:
    """Start a throttled first update of an 8 MiB volume; return the call, the action and its transfer."""
    (live / "table").write_bytes(os.urandom(8 << 20))
    call = asyncio.ensure_future(s.a.client.call(
        "storage.replicate", {"volume": "db", "target": str(s.dst.jid.bare), "rate": 2 << 20, **args},
        to=[s.a.target], timeout=60))
    actions = await until(lambda: s.src.replicator.list(), what="the action")
    action = actions[0]
    transfer = transfer_id(action["package"], f"{action['id']}-000001")
    return call, action, transfer


def inbox_of(s: Sites, tls: bool = True):
    return s.dst.packages.inboxes[tls]


async def test_a_cut_connection_resumes_and_nothing_is_received_twice(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    call, action, transfer = await start_slow_replication(s, live)
    await until(lambda: tls_inbox_received(s, transfer) > 1 << 20, what="a megabyte received")
    assert inbox_of(s).cut(transfer) == 1
    # The limit is lifted while the transfer runs; the resumed connection goes at full speed.
    assert (await s.a.ok("storage.replication.throttle", action=action["id"], rate=0))["rate"] is None
    (res,) = (await call).results
    assert res.outcome is Outcome.OK, res.error
    last = res.result["last"]
    assert last["attempts"] >= 2
    resumed = last["connections"][-1]
    assert resumed["resumed_from"] >= 1 << 20
    assert resumed["resumed_from"] + resumed["sent_bytes"] == last["stream_bytes"]
    # Every byte of the stream reached the spool exactly once.
    assert inbox_of(s).received(transfer) == last["stream_bytes"]
    await s.clone_matches(action["package"], last["snapshot"], live, "check")


def tls_inbox_received(s: Sites, transfer: str) -> int:
    inbox = s.dst.packages.inboxes.get(True)
    return inbox.received(transfer) if inbox else 0


async def test_pause_stops_the_transfer_and_resume_continues_it(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    call, action, transfer = await start_slow_replication(s, live)
    await until(lambda: tls_inbox_received(s, transfer) > 1 << 20, what="a megabyte received")
    paused = await s.a.ok("storage.replication.pause", action=action["id"])
    assert paused["paused"] is True and paused["pending"] is not None
    (res,) = (await call).results
    assert res.outcome is Outcome.FAILED and "paused" in res.error
    held = inbox_of(s).received(transfer)

    await s.a.ok("storage.replication.throttle", action=action["id"], rate=0)
    await s.a.ok("storage.replication.resume", action=action["id"])
    done = await s.a.ok("storage.replication.update", action=action["id"])
    last = done["last"]
    assert last["connections"][-1]["resumed_from"] >= held - (1 << 20)   # at most what was in flight
    assert inbox_of(s).received(transfer) == last["stream_bytes"]
    await s.clone_matches(action["package"], last["snapshot"], live, "check")


async def test_a_restarted_source_agent_finishes_the_pending_update(mesh, tmp_path):
    jid, pw = mesh.account("storage")
    state = tmp_path / "src-state"
    state.mkdir()
    settings = {"root": str(tmp_path / "a")}

    def source() -> StorageAgent:
        return StorageAgent(jid, pw, mesh.endpoint, resources=["/site/a"], authorizer=mesh.admins,
                            settings=settings, state_dir=state)

    src = await mesh.start(source())
    dst = await mesh.agent(StorageAgent, None, ["/site/b"], settings={"root": str(tmp_path / "b")},
                           authorizer=AdminsOnly([mesh.operator[0], jid]))
    client = await mesh.client()
    s = Sites(src, dst, Caller(client, src), Caller(client, dst))
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    call, action, transfer = await start_slow_replication(s, live)
    await until(lambda: tls_inbox_received(s, transfer) > 1 << 20, what="a megabyte received")
    await src.stop()
    mesh.actors.remove(src)
    (res,) = (await call).results
    assert res.outcome is not Outcome.OK

    restarted = await mesh.start(source())
    await restarted.replicator.throttle(action["id"], None)
    (after,) = await until(lambda: [a for a in restarted.replicator.list() if a["last_snap"]],
                           timeout=30, what="the pending update finished after the restart")
    last = after["last"]
    assert last["snapshot"] == f"{action['id']}-000001" and last["connections"][-1]["resumed_from"] > 0
    assert inbox_of(s).received(transfer) == last["stream_bytes"]
    await s.clone_matches(action["package"], last["snapshot"], live, "check")


async def test_a_scheduled_action_updates_on_its_own(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "v").write_text("first\n")
    action = await s.a.ok("storage.replicate", volume="db", target=str(s.dst.jid.bare), interval=0.2)
    (live / "v").write_text("later\n")
    (pkg,) = await until(lambda: [a for a in s.src.replicator.list() if a["seq"] >= 3 and not a["pending"]],
                         what="two scheduled updates")
    assert pkg["interval"] == 0.2 and pkg["error"] is None
    await s.a.ok("storage.replication.pause", action=action["id"])
    latest = (await s.a.ok("storage.replication.list"))[0]["last_snap"]
    await s.clone_matches(action["package"], latest, live, "check")
