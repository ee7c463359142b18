"""Clones that share space, or say they don't: the embedded driver on a reflink filesystem (a loop-mounted
btrfs image) makes clones that share the snapshot's extents, stay ordinary writable files, and report
exclusive and shared bytes; on the ext4 state directory, as root, a clone is an overlay mount over its
snapshot's base that adds only what is written to it, is mounted again after a restart and unmounted on
destroy; run without the privilege to mount, a clone is a full copy and says why. The snapshot makes the
base as it is taken (reflinks, or a copy written in the same pass as the chunk ingest), so the first clone
adds under 1% too; the snapshot reports the base's bytes, keeps it while clones lie over it, frees it on
destroy, and a kill -9 mid-capture (of the driver or of the storage agent's process) leaves no base behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mmap
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from agents.actor import Timeouts
from agents.client import Client
from agents.errors import Outcome
from agents.storage import embedded, overlay
from agents.storage.agent import StorageAgent
from agents.storage.embedded import EmbeddedDriver
from agents.storage.packs import direct_writes_work
from test_storage_contract import _btrfs_unavailable, _loop_btrfs
from conftest import until
from test_storage_ops import Caller
from readable_python import python_for_others

MiB = 1 << 20


@pytest.fixture
def reflink_dir(tmp_path):
    reason = _btrfs_unavailable()
    if reason:
        pytest.skip(reason)
    mnt = _loop_btrfs(tmp_path, "reflinks")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        (tmp_path / "reflinks.img").unlink()


def _volume_with_data(driver: EmbeddedDriver, size: int) -> None:
    driver.create_volume("db")
    live = driver.path("db")
    (live / "data.bin").write_bytes(os.urandom(size))
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    con.commit()
    con.close()
    driver.snapshot("db", "s1")


def test_embedded_clone_on_reflink_filesystem_shares_extents_and_stays_writable(reflink_dir):
    driver = EmbeddedDriver(reflink_dir / "store")
    try:
        assert "reflink-clones" in driver.capabilities()
        _volume_with_data(driver, 16 * MiB)
        for clone in ("dev1", "dev2"):             # the first clone too: the snapshot made the base
            before = _reflink_fs_used(reflink_dir)
            info = driver.clone("db", "s1", clone)
            added = _reflink_fs_used(reflink_dir) - before
            assert added < 0.01 * 16 * MiB, f"clone {clone} added {added} bytes"
        assert info.shared_bytes >= 16 * MiB and info.exclusive_bytes < MiB, info
        # A program writes into the clone in place; the snapshot and the other clone do not change.
        con = sqlite3.connect(driver.path("dev2") / "app.db")
        con.execute("UPDATE t SET x = -1")
        con.commit()
        con.close()
        for other in ("dev1",):
            con = sqlite3.connect(driver.path(other) / "app.db")
            assert con.execute("SELECT count(*) FROM t WHERE x = -1").fetchone()[0] == 0
            con.close()
        # A snapshot of the written clone, cloned again, holds the write; rollback and refresh still work.
        driver.snapshot("dev2", "w")
        driver.clone("dev2", "w", "dev3")
        con = sqlite3.connect(driver.path("dev3") / "app.db")
        assert con.execute("SELECT count(*) FROM t WHERE x = -1").fetchone()[0] == 1000
        con.close()
        driver.refresh_clone("dev1", "s1")
        driver.destroy_clone("dev3")
        driver.destroy_snapshot("dev2", "w")
        driver.destroy_clone("dev2")
        driver.destroy_clone("dev1")
        driver.destroy_snapshot("db", "s1")
        assert list((reflink_dir / "store" / "bases").iterdir()) == []   # the base went with its snapshot
    finally:
        driver.close()


def _overlay_driver(root: Path) -> EmbeddedDriver:
    """An embedded driver whose clones are overlay mounts (root, no reflinks), or the test is skipped."""
    driver = EmbeddedDriver(root)
    if "overlay-clones" not in driver.capabilities():
        driver.close()
        pytest.skip(f"clones here are not overlay mounts: {driver._sharing_method()}")
    return driver


def _hold_base_syncs(monkeypatch, only_first: bool) -> tuple[threading.Event, list[Path]]:
    """Make the settling thread's base syncs wait until the returned event is set, as a device that takes
    its time would: the first sync only, or every one. The list gets each tree whose sync was held."""
    release = threading.Event()
    held: list[Path] = []
    real_syncfs = embedded._syncfs

    def slow_syncfs(where: Path) -> None:
        if not (only_first and held):
            held.append(where)
            release.wait(60)
        real_syncfs(where)

    monkeypatch.setattr(embedded, "_syncfs", slow_syncfs)
    return release, held


def _two_volumes(driver: EmbeddedDriver, snapshot: bool) -> None:
    for name in ("a", "b"):
        driver.create_volume(name)
        (driver.path(name) / "data").write_bytes(os.urandom(256 * 1024))
        if snapshot:
            driver.snapshot(name, "s1")


def test_a_snapshot_waits_for_no_other_volumes_base_to_reach_the_disk(tmp_path, monkeypatch):
    """A base settles (is synced to disk) after its snapshot answered; the same volume's next snapshot
    waits for it, as it links that base's files. Another volume's snapshot does not: here the first
    volume's base never finishes its sync until the test lets it, and the second volume's snapshot
    still ends."""
    driver = _overlay_driver(tmp_path / "store")
    release, held = _hold_base_syncs(monkeypatch, only_first=True)
    try:
        _two_volumes(driver, snapshot=False)
        driver.snapshot("a", "s1")
        snapshot_b = threading.Thread(target=driver.snapshot, args=("b", "s1"), daemon=True)
        snapshot_b.start()
        snapshot_b.join(30)
        assert held, "the first base was not synced on the settling thread"
        assert not snapshot_b.is_alive(), "b's snapshot waited for a's base to be synced"
        assert [s.name for s in driver.list_snapshots("b")] == ["s1"]
    finally:
        release.set()
        driver.close()


def test_a_destroy_waits_for_no_base_to_reach_the_disk_and_a_base_whose_snapshot_went_is_removed(
        tmp_path, monkeypatch):
    """Destroying a snapshot collects the bases nobody needs; it does not wait for the bases still being
    synced (one volume's slow device holds up no other's destroy), and a base whose snapshot went while
    it settled is removed once synced, never named under bases/."""
    driver = _overlay_driver(tmp_path / "store")
    release, held = _hold_base_syncs(monkeypatch, only_first=False)
    try:
        _two_volumes(driver, snapshot=True)
        destroys = threading.Thread(target=lambda: [driver.destroy_snapshot(v, "s1") for v in ("b", "a")],
                                    daemon=True)
        destroys.start()
        destroys.join(30)
        assert held, "no base was synced on the settling thread"
        assert not destroys.is_alive(), "a destroy waited for a base to be synced"
        assert driver.list_snapshots("a") == [] and driver.list_snapshots("b") == []
    finally:
        release.set()
        driver.close()
    assert list((tmp_path / "store" / "bases").iterdir()) == [], "a base of a destroyed snapshot was kept"


def _one_fs_bytes(top: Path) -> int:
    """Blocks allocated under top on top's own filesystem, as `du -x` counts them: the overlay mounts of
    clones are not entered (what they show is their base and layer, counted where those live)."""
    dev = os.lstat(top).st_dev
    total = 0
    seen: set[int] = set()          # a file with several names (hard links between bases) counts once, as in du
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [n for n in dirnames if os.lstat(os.path.join(dirpath, n)).st_dev == dev]
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def _rows(path: Path) -> int:
    """Rows the clone's UPDATE wrote; read-only, since opening a file for writing copies it up whole."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM t WHERE x = -1").fetchone()[0]
    finally:
        con.close()


def test_embedded_clone_on_ext4_is_an_overlay_over_its_snapshots_base(tmp_path):
    root = tmp_path / "store"
    driver = _overlay_driver(root)
    try:
        before = _one_fs_bytes(root)
        _volume_with_data(driver, 64 * MiB)
        # The snapshot pays for its base as it is taken (a second copy beside the chunk store), and says so.
        (snap,) = driver.list_snapshots("db")
        assert snap.exclusive_bytes >= 2 * 64 * MiB and snap.shared_bytes == 0, snap
        assert _one_fs_bytes(root) - before >= 3 * 64 * MiB        # the volume, its chunks and its base
        for clone in ("dev1", "dev2"):             # the first clone of a snapshot shares, as every other does
            before = _one_fs_bytes(root)
            info = driver.clone("db", "s1", clone)
            added = _one_fs_bytes(root) - before
            assert added < 0.01 * 64 * MiB, f"clone {clone} added {added} bytes"
        assert os.path.ismount(driver.path("dev2"))
        assert info.shared_bytes >= 64 * MiB and info.exclusive_bytes < MiB, info
        assert "overlay" in info.sharing_method
        # A program writes into the clone in place; the snapshot and the other clone do not change.
        con = sqlite3.connect(driver.path("dev2") / "app.db")
        con.execute("UPDATE t SET x = -1")
        con.commit()
        con.close()
        with open(driver.path("dev2") / "data.bin", "r+b") as f:     # copied up whole on its first write
            f.write(b"written")
        assert _rows(driver.path("dev1") / "app.db") == 0
        driver.clone("db", "s1", "again")
        assert _rows(driver.path("again") / "app.db") == 0
        assert (driver.path("again") / "data.bin").read_bytes()[:7] != b"written"
        dev2 = {v.name: v for v in driver.list_volumes()}["dev2"]
        assert dev2.exclusive_bytes >= 64 * MiB and dev2.shared_bytes >= 64 * MiB, dev2
        # A snapshot of the written clone reads through the mount: the whole tree, with the writes.
        driver.snapshot("dev2", "w")
        assert {s.name: s for s in driver.list_snapshots("dev2")}["w"].logical_bytes >= 64 * MiB
        driver.clone("dev2", "w", "dev3")
        assert _rows(driver.path("dev3") / "app.db") == 1000
        assert (driver.path("dev3") / "data.bin").read_bytes()[:7] == b"written"
        # Rollback and refresh give the clone a fresh layer over the chosen snapshot's base.
        (driver.path("dev2") / "scratch").write_text("lost on rollback")
        driver.rollback("dev2", "w")
        assert not (driver.path("dev2") / "scratch").exists() and _rows(driver.path("dev2") / "app.db") == 1000
        driver.refresh_clone("dev1", "s1")
        assert os.path.ismount(driver.path("dev1")) and _rows(driver.path("dev1") / "app.db") == 0
        # The base of dev2@w stays while dev2 lies over it, even once that snapshot is gone.
        driver.destroy_clone("dev3")
        driver.destroy_snapshot("dev2", "w")
        assert _rows(driver.path("dev2") / "app.db") == 1000
        # Destroy unmounts and frees what the clone wrote.
        with open(driver.path("dev2") / "data.bin", "r+b") as f:
            f.write(b"again")
        before = _one_fs_bytes(root)
        live = driver.path("dev2")
        driver.destroy_clone("dev2")
        assert not live.exists() and not os.path.ismount(live)
        assert before - _one_fs_bytes(root) >= 2 * 64 * MiB       # its copied-up file and its own base
        for name in ("dev1", "again"):
            driver.destroy_clone(name)
        driver.destroy_snapshot("db", "s1")
        for sub in ("bases", "layers"):
            assert list((root / sub).iterdir()) == [], sub
        assert overlay.mounts_under(root) == []
    finally:
        driver.close()


def test_overlay_clones_are_mounted_again_after_a_reboot_and_a_crash_leaves_nothing_behind(tmp_path):
    root = tmp_path / "store"
    driver = _overlay_driver(root)
    _volume_with_data(driver, MiB)
    driver.clone("db", "s1", "kept")
    driver.clone("db", "s1", "rebooted")
    (driver.path("rebooted") / "note").write_text("still here")
    driver.clone("db", "s1", "half-made")
    # A crash before the catalog committed "half-made": its mount and layer exist, its rows do not.
    driver.db.execute("DELETE FROM overlays WHERE name = 'half-made'")
    driver.db.execute("DELETE FROM volumes WHERE name = 'half-made'")
    driver.db.commit()
    driver.close()
    overlay.unmount(root / "volumes" / "rebooted")      # as after a reboot
    again = EmbeddedDriver(root)
    try:
        assert {v.name for v in again.list_volumes()} == {"db", "kept", "rebooted"}
        for name in ("kept", "rebooted"):
            assert os.path.ismount(again.path(name)) and _rows(again.path(name) / "app.db") == 0
        assert (again.path("rebooted") / "note").read_text() == "still here"
        assert {m.mountpoint.name for m in overlay.mounts_under(root)} == {"kept", "rebooted"}
        assert not (root / "volumes" / "half-made").exists() and len(list((root / "layers").iterdir())) == 2
        # Opening the store again while its clones are mounted keeps the mounts it finds right.
        EmbeddedDriver(root).close()
        assert {m.mountpoint.name for m in overlay.mounts_under(root)} == {"kept", "rebooted"}
    finally:
        again.close()


def test_an_agent_that_may_not_mount_makes_full_copies_and_says_why(tmp_path):
    """The same driver run as an unprivileged user (setpriv drops root): clones are full copies, and the
    sharing explanation says overlays were refused and what to do."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the driver as another user")
    top = Path(tempfile.mkdtemp(prefix="vertebra-unprivileged-"))
    try:
        os.chown(top, 65534, 65534)
        script = (
            "import os, sys, json\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
            "from agents.storage.embedded import EmbeddedDriver\n"
            f"d = EmbeddedDriver({str(top / 'store')!r})\n"
            "d.create_volume('db')\n"
            "(d.path('db') / 'data.bin').write_bytes(os.urandom(2 << 20))\n"
            "d.snapshot('db', 's1')\n"
            "i = d.clone('db', 's1', 'dev1')\n"
            "assert d.clone_sharing() == i.sharing_method\n"
            "print(json.dumps([sorted(d.capabilities()), i.exclusive_bytes, i.shared_bytes, i.sharing_method]))\n"
        )
        python, env = python_for_others()  # the checkout may be out of user nobody's reach
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                               script], capture_output=True, text=True, timeout=120, cwd=top,
                              env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        caps, exclusive, shared, method = json.loads(done.stdout)
        if "reflink-clones" in caps:
            pytest.skip("this temporary directory has reflinks; the full-copy case needs a filesystem without")
        assert "overlay-clones" not in caps
        assert shared == 0 and exclusive >= 2 * MiB
        assert "no reflinks" in method and "overlay" in method and "root" in method, method
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_embedded_snapshots_report_exclusive_and_shared_bytes(tmp_path):
    driver = EmbeddedDriver(tmp_path / "store")
    try:
        _volume_with_data(driver, 4 * MiB)                      # db@s1
        alone = {s.name: s for s in driver.list_snapshots("db")}["s1"]
        assert alone.exclusive_bytes >= 4 * MiB and alone.shared_bytes == 0
        with open(driver.path("db") / "data.bin", "r+b") as f:  # one page rewritten in place
            f.write(os.urandom(8192))
        driver.snapshot("db", "s2")
        snaps = {s.name: s for s in driver.list_snapshots("db")}
        for name in ("s1", "s2"):
            # Where clones share a base, each snapshot made its own as it was taken: the rewritten file is
            # a copy of its own in each (exclusive), the unchanged app.db one file linked from both (shared).
            base = driver._snapshot_base(driver._snapshot_row("db", name)[0])
            base_exclusive, base_shared = driver._base_split(base)
            if driver.reflinks or driver.overlays:
                assert base_exclusive >= 4 * MiB and base_shared > 0, (base_exclusive, base_shared)
            else:
                assert base is None
            chunks_exclusive = snaps[name].exclusive_bytes - base_exclusive
            assert snaps[name].shared_bytes - base_shared >= 4 * MiB - 64 * 1024, snaps[name]
            assert chunks_exclusive < 256 * 1024, snaps[name]   # the page, and sqlite's own
    finally:
        driver.close()


async def test_overlay_clones_through_the_agent_share_space_survive_a_restart_and_free_on_destroy(mesh, tmp_path):
    """The real agent on its default state directory (ext4 here): a clone of a 64 MiB volume adds under 1%
    once the snapshot's base exists, storage.volume.list reports each clone's exclusive and shared bytes,
    a restart mounts the clones again with their data, and destroy unmounts and frees."""
    jid, pw = mesh.account("storage")
    state = tmp_path / "state"
    state.mkdir()

    def agent() -> StorageAgent:
        return StorageAgent(jid, pw, mesh.endpoint, resources=["/site/a"], authorizer=mesh.admins, settings={},
                            state_dir=state)

    src = await mesh.start(agent())
    if "overlay-clones" not in src.driver.capabilities():
        pytest.skip(f"clones here are not overlay mounts: {src.driver._sharing_method()}")
    call = Caller(await mesh.client(), src)
    info = await call.ok("storage.info")
    assert "overlay-clones" in info["capabilities"] and info["clone_sharing"].startswith("overlay:")
    live = Path((await call.ok("storage.volume.create", volume="db"))["path"])
    (live / "data.bin").write_bytes(os.urandom(64 * MiB))
    con = sqlite3.connect(live / "app.db")
    con.execute("CREATE TABLE t(x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(1000)])
    con.commit()
    con.close()
    await call.ok("storage.snapshot.create", volume="db", snapshot="s1")
    alice = Path((await call.ok("storage.clone.create", volume="db", snapshot="s1", clone="alice"))["path"])
    before = _one_fs_bytes(state)
    bob = Path((await call.ok("storage.clone.create", volume="db", snapshot="s1", clone="bob"))["path"])
    added = _one_fs_bytes(state) - before
    assert added < 0.01 * 64 * MiB, f"a clone of a 64 MiB volume added {added} bytes to the state directory"

    con = sqlite3.connect(bob / "app.db")
    con.execute("UPDATE t SET x = -1")
    con.commit()
    con.close()
    assert _rows(alice / "app.db") == 0 and _rows(bob / "app.db") == 1000
    listed = {v["name"]: v for v in await call.ok("storage.volume.list")}
    for name in ("alice", "bob"):
        assert listed[name]["shared_bytes"] >= 64 * MiB and "overlay" in listed[name]["sharing_method"]
    assert listed["alice"]["exclusive_bytes"] < MiB
    assert listed["bob"]["exclusive_bytes"] > listed["alice"]["exclusive_bytes"]     # its copied-up app.db
    (snap,) = await call.ok("storage.snapshot.list", volume="db")
    assert snap["exclusive_bytes"] >= 64 * MiB and sorted(snap["clones"]) == ["alice", "bob"]

    # Restart: bob's mount is gone as after a reboot, alice's is still there; both serve their data after.
    await src.stop()
    mesh.actors.remove(src)
    overlay.unmount(bob)
    assert not os.path.ismount(bob)
    src = await mesh.start(agent())
    call = Caller(await mesh.client(), src)
    assert os.path.ismount(alice) and os.path.ismount(bob)
    assert _rows(alice / "app.db") == 0 and _rows(bob / "app.db") == 1000

    before = _one_fs_bytes(state)
    with open(bob / "data.bin", "r+b") as f:     # copied up whole: bob now holds 64 MiB of its own
        f.write(b"bob")
    grown = _one_fs_bytes(state)
    assert grown - before >= 0.95 * 64 * MiB
    assert (await call.ok("storage.clone.destroy", clone="bob")) == {"destroyed": "bob"}
    assert not os.path.ismount(bob) and not bob.exists()
    assert grown - _one_fs_bytes(state) >= 0.95 * 64 * MiB     # the catalog may grow meanwhile
    await call.ok("storage.clone.destroy", clone="alice")
    assert overlay.mounts_under(state) == []


_CHURN = """
import sys
sys.path.insert(0, {repo!r})
from agents.storage.embedded import EmbeddedDriver
d = EmbeddedDriver({root!r})
names = sorted(v.name for v in d.list_volumes() if v.kind == "clone")
i = 0
while True:
    i += 1
    name = f"c{{i % 4}}"
    if name in names:
        d.refresh_clone(name, "s1") if i % 3 else d.destroy_clone(name)
        if not i % 3:
            names.remove(name)
    else:
        d.clone("db", "s1", name)
        names.append(name)
    (d.path(names[0]) / f"w{{i}}").write_text("x")
    print(i, flush=True)
"""


def test_a_killed_driver_leaves_nothing_the_next_start_cannot_recover(tmp_path):
    """kill -9 in the middle of creating, refreshing and destroying overlay clones, three times: each time
    the store opens with every clone it lists mounted over its base and readable, and no mount, layer or
    base that nothing names."""
    root = tmp_path / "store"
    driver = _overlay_driver(root)
    _volume_with_data(driver, MiB)
    driver.close()
    script = _CHURN.format(repo=str(Path(__file__).resolve().parents[2]), root=str(root))
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(5 + 7 * round_):         # kill at a different step each round
                assert proc.stdout.readline(), "the churn script stopped on its own"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        again = EmbeddedDriver(root)
        try:
            rows = {r[0]: r[1] for r in again.db.execute("SELECT name, layer FROM overlays")}
            clones = {v.name for v in again.list_volumes() if v.kind == "clone"}
            assert set(rows) == clones
            assert {m.mountpoint.name for m in overlay.mounts_under(root)} == clones
            for name in clones:
                assert _rows(again.path(name) / "app.db") == 0
            assert {p.name for p in (root / "layers").iterdir()} == set(rows.values())
            assert len(list((root / "bases").iterdir())) <= 1 and list((root / "tmp").iterdir()) == []
            assert sorted(p.name for p in (root / "volumes").iterdir()) == sorted(clones | {"db"})
        finally:
            again.close()


def test_a_clone_in_use_is_detached_lazily_on_destroy_and_its_program_keeps_its_file(tmp_path, caplog):
    """A program still holds a file open in the clone: destroy cannot unmount it at once, so it detaches it
    (the last resort), says so, and the program keeps reading the tree it had until it closes it."""
    root = tmp_path / "store"
    driver = _overlay_driver(root)
    try:
        _volume_with_data(driver, MiB)
        driver.clone("db", "s1", "busy")
        live = driver.path("busy")
        (live / "note").write_text("mine")
        with open(live / "note") as held:
            driver.destroy_clone("busy")
            assert not live.exists() and overlay.mounts_under(root) == []
            assert "detached lazily" in caplog.text
            assert held.read() == "mine"
        assert "busy" not in {v.name for v in driver.list_volumes()}
    finally:
        driver.close()


def _reflink_fs_used(mnt: Path) -> int:
    os.sync()           # btrfs counts extents at its transaction commit, which sync forces
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("where", ["default state directory", "reflink filesystem"])
async def test_through_the_agent_every_clone_adds_under_1pc_and_the_snapshot_owns_its_base(mesh, tmp_path, where,
                                                                                        request):
    """The real agent, on its default state directory (ext4 here: overlay clones) and with its store on a
    reflink filesystem: the snapshot makes the base as it is taken and reports it; the first clone and the
    next add under 1% of a 64 MiB volume; the snapshot cannot be destroyed while clones lie over its base,
    and once they are gone, destroying it frees what it reported as exclusive."""
    jid, pw = mesh.account("storage")
    state = tmp_path / "state"
    state.mkdir()
    settings: dict[str, str] = {}
    if where == "reflink filesystem":
        mnt = request.getfixturevalue("reflink_dir")
        settings = {"root": str(mnt / "store")}
        used = lambda: _reflink_fs_used(mnt)        # noqa: E731 - st_blocks would count shared extents twice
    else:
        used = lambda: _one_fs_bytes(state)         # noqa: E731 - the shared /tmp's statvfs moves with others
    src = await mesh.start(StorageAgent(jid, pw, mesh.endpoint, resources=["/site/a"], authorizer=mesh.admins,
                                        settings=settings, state_dir=state))
    caps = src.driver.capabilities()
    if not {"overlay-clones", "reflink-clones"} & caps:
        pytest.skip(f"clones here cannot share: {src.driver.clone_sharing()}")
    call = Caller(await mesh.client(), src)
    live = Path((await call.ok("storage.volume.create", volume="db"))["path"])
    data = os.urandom(64 * MiB)
    (live / "data.bin").write_bytes(data)
    before = used()
    snap = await call.ok("storage.snapshot.create", volume="db", snapshot="s1")
    snap_added = used() - before
    if "reflink-clones" in caps:
        # The chunks are the snapshot's own; its base shares every extent with the volume.
        assert snap["exclusive_bytes"] >= 64 * MiB and snap["shared_bytes"] >= 64 * MiB, snap
        assert snap_added < 1.1 * 64 * MiB, snap_added
    else:
        # A second copy beside the chunk store, paid now and counted as the snapshot's.
        assert snap["exclusive_bytes"] >= 2 * 64 * MiB and snap["shared_bytes"] < MiB, snap
        assert snap_added >= 2 * 64 * MiB, snap_added
    for clone in ("alice", "bob"):
        before = used()
        path = Path((await call.ok("storage.clone.create", volume="db", snapshot="s1", clone=clone))["path"])
        added = used() - before
        assert added < 0.01 * 64 * MiB, f"clone {clone} of a 64 MiB volume added {added} bytes"
        assert (path / "data.bin").read_bytes() == data
    listed = {v["name"]: v for v in await call.ok("storage.volume.list")}
    for clone in ("alice", "bob"):
        assert listed[clone]["shared_bytes"] >= 64 * MiB and listed[clone]["exclusive_bytes"] < MiB, listed[clone]

    outcome, error = await call.fails("storage.snapshot.destroy", volume="db", snapshot="s1")
    assert "alice" in error and "bob" in error, error
    before = used()
    await call.ok("storage.clone.destroy", clone="alice")
    assert before - used() < MiB                      # the base stays: bob lies over it
    assert (Path(listed["bob"]["path"]) / "data.bin").read_bytes() == data
    await call.ok("storage.clone.destroy", clone="bob")
    (snap,) = await call.ok("storage.snapshot.list", volume="db")
    before = used()
    await call.ok("storage.snapshot.destroy", volume="db", snapshot="s1")
    freed = before - used()
    assert freed >= 0.9 * snap["exclusive_bytes"], (freed, snap)
    assert list((Path(src.driver.root) / "bases").iterdir()) == []


_CAPTURE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from agents.storage import embedded
d = embedded.EmbeddedDriver({root!r})
if {killed!r} == "at-commit":       # the base written (with reflinks: named too), the snapshot not committed
    embedded.EmbeddedDriver._publish = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if {killed!r} == "after-commit":    # the snapshot committed, its base not yet synced nor named
    embedded.EmbeddedDriver._settle_later = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
d.snapshot("db", "s2", progress=lambda done, total: print(done, flush=True))
"""


@pytest.mark.parametrize("killed", ["mid-capture", "at-commit", "after-commit"])
def test_a_snapshot_killed_mid_capture_leaves_no_base_a_later_clone_uses(tmp_path, killed):
    """kill -9 while a snapshot writes its base, or at its commit: the next start holds no such snapshot
    and no base it does not name, and a snapshot taken then gets a whole base of its own that its clones
    show. Killed once it has committed, before its base (written through the page cache) is on disk and
    named: the snapshot stands without a base, and its first clone builds the base from its chunks."""
    root = tmp_path / "store"
    driver = EmbeddedDriver(root)
    if not driver.reflinks and not driver.overlays:
        driver.close()
        pytest.skip(f"no base is made at capture here: {driver.clone_sharing()}")
    if killed == "after-commit" and driver.reflinks:
        driver.close()
        pytest.skip("a base of reflinks is named before its snapshot commits")
    _volume_with_data(driver, MiB)
    for i in range(24):
        (driver.path("db") / f"part{i:02}").write_bytes(os.urandom(MiB))
    expected = {p.name: p.read_bytes() for p in driver.path("db").iterdir()}
    driver.close()
    bases = {p.name for p in (root / "bases").iterdir()}
    assert len(bases) == 1                          # s1's, on disk and named by the close
    script = _CAPTURE.format(repo=str(Path(__file__).resolve().parents[2]), root=str(root), killed=killed)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        if killed == "mid-capture":
            for _ in range(8):                      # a third of the way through the files
                assert proc.stdout.readline(), "the capture ended before it was killed"
        else:
            proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -9
    again = EmbeddedDriver(root)
    try:
        committed = killed == "after-commit"
        assert [s.name for s in again.list_snapshots("db")] == (["s1", "s2"] if committed else ["s1"])
        assert {p.name for p in (root / "bases").iterdir()} == bases and list((root / "tmp").iterdir()) == []
        if not committed:
            again.snapshot("db", "s2")
        again.clone("db", "s2", "dev")
        assert len(list((root / "bases").iterdir())) == 2
        assert {p.name: p.read_bytes() for p in again.path("dev").iterdir()} == expected
        again.destroy_clone("dev")
    finally:
        again.close()


def test_a_snapshot_for_replication_only_makes_no_base_and_its_first_clone_makes_it(tmp_path):
    driver = EmbeddedDriver(tmp_path / "store")
    try:
        _volume_with_data(driver, MiB)                     # db@s1, for clones: its base is made
        driver.snapshot("db", "sent", for_clones=False)
        base = driver._snapshot_base(driver._snapshot_row("db", "sent")[0])
        assert base is None and driver.snapshot_space("db", "sent")["base_bytes"] == 0
        driver.clone("db", "sent", "dev")
        assert (driver.path("dev") / "data.bin").read_bytes() == (driver.path("db") / "data.bin").read_bytes()
        shares = driver.reflinks or driver.overlays
        assert (driver.snapshot_space("db", "sent")["base_bytes"] >= MiB) == bool(shares)
    finally:
        driver.close()


def test_a_snapshot_of_a_clone_that_changed_one_file_costs_that_file(tmp_path):
    """On ext4 a snapshot's base copies what it reads, but a file that is the same as in the base of the
    snapshot a clone was made from is hard-linked from it: masking a small table in a clone of a 64 MiB
    volume and snapshotting it adds far less than the volume, and the clones of that snapshot hold the
    masked table and the untouched data."""
    root = tmp_path / "store"
    driver = _overlay_driver(root)
    try:
        _volume_with_data(driver, 64 * MiB)
        masked = driver.clone("db", "s1", "masked")
        con = sqlite3.connect(Path(driver.path(masked.name)) / "app.db")
        con.execute("UPDATE t SET x = -1")
        con.commit()
        con.close()
        before = _one_fs_bytes(root)
        driver.snapshot("masked", "m1")
        added = _one_fs_bytes(root) - before
        assert added < 0.05 * 64 * MiB, f"the snapshot of a clone that changed app.db added {added} bytes"
        (snap,) = driver.list_snapshots("masked")
        assert snap.exclusive_bytes < MiB and snap.shared_bytes >= 2 * 64 * MiB, snap   # chunks and base file
        dev = driver.path(driver.clone("masked", "m1", "dev").name)
        assert _rows(dev / "app.db") == 1000
        assert (dev / "data.bin").read_bytes() == (driver.path("db") / "data.bin").read_bytes()
        driver.destroy_clone("dev")
        driver.destroy_snapshot("masked", "m1")
        driver.destroy_clone("masked")
        before = _one_fs_bytes(root)
        driver.destroy_snapshot("db", "s1")
        assert before - _one_fs_bytes(root) >= 64 * MiB       # the base, its data.bin no longer linked elsewhere
        assert list((root / "bases").iterdir()) == []
    finally:
        driver.close()


def _tree(top: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every name under top: its kind, mode and content (a symlink's target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st = os.lstat(full)
            kind = "l" if full.is_symlink() else "d" if full.is_dir() else "f"
            body = os.readlink(full).encode() if kind == "l" else full.read_bytes() if kind == "f" else b""
            found[str(full.relative_to(top))] = (kind, st.st_mode & 0o7777, body)
    return found


@pytest.mark.parametrize("writes", ["direct", "page cache", "alternating"])
def test_the_base_a_snapshot_makes_holds_what_its_chunks_hold(tmp_path, monkeypatch, writes):
    """Holes, a tail that is not a whole block, an empty file, hard links, symlinks and modes, in the base
    a snapshot makes and in a tree rebuilt from its chunks alike; a file changed with its size and mtime
    put back is still copied, not linked from the older base. Without reflinks the base's batches are
    written direct, through the page cache, or (as when the device falls behind) each way in turn."""
    modes: list[bool] = []
    set_direct = embedded._set_direct

    def recorded(fd: int, direct: bool) -> None:
        direct = direct and (writes != "alternating" or len(modes) % 2 == 0)
        modes.append(direct)
        set_direct(fd, direct)

    monkeypatch.setattr(embedded, "_set_direct", recorded)
    monkeypatch.setattr(embedded._Copier, "_BEHIND", 0 if writes == "page cache" else 1 << 30)
    if writes == "page cache":      # always behind, and the page cache always the cheaper way
        monkeypatch.setattr(embedded, "_direct_when_behind", lambda cost, retry: False)
    driver = EmbeddedDriver(tmp_path / "store")
    try:
        if not driver.reflinks and not driver.overlays:
            pytest.skip(f"no base is made at capture here: {driver.clone_sharing()}")
        driver.create_volume("db")
        live = driver.path("db")
        with open(live / "sparse", "wb") as f:
            f.write(os.urandom(20000))
            f.seek(5 * MiB)
            f.write(os.urandom(3 * MiB + 123))
            f.seek(12 * MiB)
            f.write(b"end")
        (live / "empty").write_bytes(b"")
        (live / "sub").mkdir(mode=0o750)
        (live / "sub" / "same").write_bytes(os.urandom(MiB))
        os.link(live / "sub" / "same", live / "twin")
        os.symlink("sub/same", live / "link")
        os.chmod(live / "empty", 0o600)
        driver.snapshot("db", "s1")
        before = _tree(live)
        st = os.stat(live / "sub" / "same")
        with open(live / "sub" / "same", "r+b") as f:          # rewritten in place, size and mtime put back
            f.write(b"changed")
        os.utime(live / "sub" / "same", ns=(st.st_atime_ns, st.st_mtime_ns))
        driver.snapshot("db", "s2")
        after = _tree(live)
        assert before != after
        for snap, expected in (("s1", before), ("s2", after)):
            clone = driver.path(driver.clone("db", snap, f"c-{snap}").name)
            assert _tree(clone) == expected, snap
            rebuilt = driver._materialize(driver._snapshot_row("db", snap)[0])
            try:
                assert _tree(rebuilt) == expected, snap
            finally:
                shutil.rmtree(rebuilt)
            assert os.stat(clone / "sub" / "same").st_ino == os.stat(clone / "twin").st_ino
            assert os.stat(clone / "sparse").st_blocks * 512 < 5 * MiB       # the holes stayed holes
        for snap in ("s1", "s2"):
            driver.destroy_clone(f"c-{snap}")
        if not driver.reflinks:         # a tail that is not whole pages is never direct
            assert False in modes
            assert (True in modes) == (writes != "page cache" and direct_writes_work(tmp_path))
    finally:
        driver.close()


def test_a_base_copy_whose_write_filled_the_disk_is_closed_and_its_space_given_back(tmp_path):
    """The base's copy thread fills the disk (a real 1 MiB tmpfs); the error surfaces as the reader ends
    the file. The copy is closed all the same, so once the failed base is removed its blocks are free again
    (a copy left open kept them: the same snapshot taken without a base then found the disk still full)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True, capture_output=True)
    fd = -1
    try:
        total = os.statvfs(small).f_bfree
        copier = embedded._Copier(direct=False)
        fd = copier.open(small / "copy")
        write = copier.tee(fd)
        batch = mmap.mmap(-1, 512 * 1024)
        batch.write(os.urandom(len(batch)))
        ids = [b"x" * 32] * (len(batch) // embedded.BLOCK_SIZE)
        written = threading.Semaphore(0)
        for _ in range(4):             # 2 MiB into 1 MiB: the later writes fail
            write(batch, len(batch), ids, written.release)
        for _ in range(4):
            assert written.acquire(timeout=30), "a write of the copy never ended"
        with pytest.raises(OSError) as raised:
            copier.close_file(fd, 4 * len(batch))
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            copier.close()
        os.unlink(small / "copy")
        assert os.statvfs(small).f_bfree == total, "the removed copy's blocks are still held by an open file"
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)               # only still open where the copier leaked it
        subprocess.run(["umount", "-l", str(small)], check=False, capture_output=True)


async def test_a_snapshot_not_for_clones_through_the_agent_makes_no_base(mesh, tmp_path):
    """storage.snapshot.create for_clones=false on the default state directory: the snapshot is its chunks
    only (about the volume, not twice it on ext4), a later snapshot for clones makes the base and says so,
    and a for_clones that is not a boolean is refused with nothing made."""
    jid, pw = mesh.account("storage")
    state = tmp_path / "state"
    state.mkdir()
    src = await mesh.start(StorageAgent(jid, pw, mesh.endpoint, resources=["/site/a"], authorizer=mesh.admins,
                                        settings={}, state_dir=state))
    if not src.driver.capabilities() & {"overlay-clones", "reflink-clones"}:
        pytest.skip(f"no base is made at capture here: {src.driver.clone_sharing()}")
    call = Caller(await mesh.client(), src)
    live = Path((await call.ok("storage.volume.create", volume="db"))["path"])
    (live / "data.bin").write_bytes(os.urandom(16 * MiB))
    outcome, error = await call.fails("storage.snapshot.create", volume="db", snapshot="bad", for_clones="maybe")
    assert "for_clones" in error, error
    before = _one_fs_bytes(state)
    kept = await call.ok("storage.snapshot.create", volume="db", snapshot="kept", for_clones=False)
    added = _one_fs_bytes(state) - before
    assert added < 1.2 * 16 * MiB and kept["exclusive_bytes"] < 1.2 * 16 * MiB, (added, kept)
    assert not list((src.driver.root / "bases").iterdir())
    cloned = await call.ok("storage.snapshot.create", volume="db", snapshot="for-clones")
    assert cloned["exclusive_bytes"] >= 16 * MiB and cloned["shared_bytes"] >= 16 * MiB, cloned   # base; chunks
    assert [s["name"] for s in await call.ok("storage.snapshot.list", volume="db")] == ["kept", "for-clones"]


_STORAGE_AGENT = """
import asyncio, sys
from pathlib import Path
from agents.actor import Endpoint
from agents.authz import AdminsOnly
from agents.storage.agent import StorageAgent
jid, password, port, cert, admin, state = sys.argv[1:7]

async def main():
    agent = StorageAgent(jid, password, Endpoint.pinned("127.0.0.1", int(port), "vertebra.test", cert),
                         resources=["/site/a"], broker="", authorizer=AdminsOnly([admin]), settings={},
                         state_dir=Path(state))
    await agent.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_storage_agent_killed_mid_capture_leaves_no_base_a_later_clone_uses(mesh, tmp_path):
    """The storage agent in a process of its own is killed (SIGKILL) while storage.snapshot.create writes
    the snapshot's base: started again, it lists no such snapshot and keeps no half base, and a snapshot
    taken then gets a whole base that its clone shows, adding under 1% for the clone."""
    jid, pw = mesh.account("storage")
    state = tmp_path / "state"
    state.mkdir()
    root = state / "storage"
    procs: list[subprocess.Popen[str]] = []

    async def start() -> None:
        proc = subprocess.Popen([sys.executable, "-c", _STORAGE_AGENT, jid, pw, str(mesh.server.port),
                                 str(mesh.server.cert_path), mesh.operator[0], str(state)],
                                cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        procs.append(proc)
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.strip() == "ready", f"the storage agent did not come up (exit {proc.poll()})"

    try:
        await start()
        # A short grace after the agent goes offline: the killed call ends at once, not when the agent is back.
        client = await mesh.start(Client(*mesh.operator, mesh.endpoint, broker="",
                                         timeouts=Timeouts(offline_grace=1.0)))
        call = Caller(client, SimpleNamespace(jid=f"{jid}/agent"))   # what Caller needs of an agent: its JID
        if not {"overlay-clones", "reflink-clones"} & set((await call.ok("storage.info"))["capabilities"]):
            pytest.skip("no base is made at capture here")
        live = Path((await call.ok("storage.volume.create", volume="db"))["path"])
        # 256 MiB: a capture of unchanged data copies only the base now (its known segments skip the store's
        # writer), and with less the 50 ms polls below could see the base half written too late to kill it.
        for i in range(64):
            (live / f"part{i:02}").write_bytes(os.urandom(4 * MiB))
        expected = {p.name: p.read_bytes() for p in live.iterdir()}
        await call.ok("storage.snapshot.create", volume="db", snapshot="s1")
        bases = {p.name for p in (root / "bases").iterdir()}
        snapshot = asyncio.create_task(call.client.call("storage.snapshot.create", {"volume": "db",
                                                                                    "snapshot": "s2"},
                                                        to=[call.target], timeout=60))

        def base_half_written() -> bool:
            scratch = [p for p in (root / "tmp").glob("base-*")]
            return bool(scratch) and len(list(scratch[0].iterdir())) >= 2
        # The files of s2 are read again (not linked from s1's base: their mtimes moved), so it copies.
        for i in range(64):
            os.utime(live / f"part{i:02}")
        await until(base_half_written, timeout=60, what="the snapshot to be writing its base")
        procs[-1].kill()
        procs[-1].wait()
        report = await snapshot
        assert report.results[0].outcome is not Outcome.OK
        assert {p.name for p in (root / "bases").iterdir()} == bases       # nothing renamed in
        await start()
        assert [s["name"] for s in await call.ok("storage.snapshot.list", volume="db")] == ["s1"]
        assert list((root / "tmp").iterdir()) == [] and {p.name for p in (root / "bases").iterdir()} == bases
        await call.ok("storage.snapshot.create", volume="db", snapshot="s2")
        before = _one_fs_bytes(state)
        clone = Path((await call.ok("storage.clone.create", volume="db", snapshot="s2", clone="dev"))["path"])
        assert _one_fs_bytes(state) - before < 0.01 * 256 * MiB
        assert {p.name: p.read_bytes() for p in clone.iterdir()} == expected
        await call.ok("storage.clone.destroy", clone="dev")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()   # type: ignore[union-attr]


async def test_a_snapshot_that_fills_the_disk_says_no_space_and_leaves_nothing(mesh, tmp_path):
    """The store on a small ext4 filesystem (a loop-mounted image) with room for the volume's chunks but not
    for the base as well: storage.snapshot.create says no-space, names the way out, and leaves no snapshot,
    base or scratch tree; the same snapshot with for_clones=false then fits."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("needs root and mkfs.ext4 for a loop-mounted ext4 image")
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    src = None
    try:
        jid, pw = mesh.account("storage")
        state = tmp_path / "state"
        state.mkdir()
        src = await mesh.start(StorageAgent(jid, pw, mesh.endpoint, resources=["/site/a"], authorizer=mesh.admins,
                                            settings={"root": str(mnt / "store")}, state_dir=state))
        if "overlay-clones" not in src.driver.capabilities():
            pytest.skip(f"no base is written at capture here: {src.driver.clone_sharing()}")
        call = Caller(await mesh.client(), src)
        live = Path((await call.ok("storage.volume.create", volume="db"))["path"])
        st = os.statvfs(mnt)
        size = int(st.f_bavail * st.f_frsize / 2.6) // MiB * MiB     # room for two copies, not three
        (live / "data.bin").write_bytes(os.urandom(size))
        outcome, error = await call.fails("storage.snapshot.create", volume="db", snapshot="s1")
        assert error.startswith("no-space") and "for_clones=false" in error and "Nothing was published" in error, error
        assert await call.ok("storage.snapshot.list", volume="db") == []
        root = mnt / "store"
        assert list((root / "bases").iterdir()) == [] and list((root / "tmp").iterdir()) == []
        snap = await call.ok("storage.snapshot.create", volume="db", snapshot="s1", for_clones=False)
        assert snap["logical_bytes"] == size
    finally:
        if src is not None:                 # before the unmount: the agent holds its catalog open there
            await src.stop()
            mesh.actors.remove(src)
        overlay.unmount_all_under(mnt)
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def test_a_base_built_at_first_clone_shares_the_files_an_earlier_base_holds(tmp_path):
    """Snapshots that got no base as they were taken (for_clones=false, or received from another agent)
    get one at their first clone, and it links (or reflinks) every file equal to one of an earlier base of
    the volume: the first clone of a received update that changed a small table adds far less than the
    volume, and holds the update."""
    source = EmbeddedDriver(tmp_path / "source")
    replica = EmbeddedDriver(tmp_path / "replica")
    try:
        if not replica.overlays:            # the du-like count below is for hard links, not shared extents
            pytest.skip(f"clones here are not overlay mounts: {replica.clone_sharing()}")
        _volume_with_data(source, 64 * MiB)
        con = sqlite3.connect(source.path("db") / "app.db")
        con.execute("UPDATE t SET x = -1")
        con.commit()
        con.close()
        source.snapshot("db", "s2", for_clones=False)
        replica.receive("db", "s1", source.send("db", "s1"))
        replica.receive("db", "s2", source.send("db", "s2", "s1"))
        replica.clone("db", "s1", "first")                # builds s1's base from the chunks: the volume's size
        for driver, snap in ((replica, "s2"), (source, "s2")):
            root = driver.root
            before = _one_fs_bytes(root)
            clone = driver.path(driver.clone("db", snap, "dev").name)
            added = _one_fs_bytes(root) - before
            assert added < 0.05 * 64 * MiB, f"the first clone of {snap} on {root.name} added {added} bytes"
            assert _rows(clone / "app.db") == 1000
            assert (clone / "data.bin").read_bytes() == (source.path("db") / "data.bin").read_bytes()
            driver.destroy_clone("dev")
        replica.destroy_clone("first")
    finally:
        source.close()
        replica.close()
