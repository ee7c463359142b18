"""Clones that share space, or say they don't (issue 14): the embedded driver on a reflink filesystem (a
loop-mounted btrfs image) makes clones that share the snapshot's extents, stay ordinary writable files, and
report exclusive and shared bytes; on the ext4 state directory a clone says it shares nothing."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from agents.storage.embedded import EmbeddedDriver
from test_storage_contract import _btrfs_unavailable, _loop_btrfs

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
        driver.clone("db", "s1", "dev1")            # first clone builds the snapshot's base
        before = os.statvfs(reflink_dir)
        info = driver.clone("db", "s1", "dev2")
        after = os.statvfs(reflink_dir)
        added = (before.f_bfree - after.f_bfree) * before.f_frsize
        assert added < 0.01 * 16 * MiB, f"a second clone added {added} bytes"
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


def test_embedded_clone_on_ext4_says_it_shares_nothing(tmp_path):
    driver = EmbeddedDriver(tmp_path / "store")
    try:
        if "reflink-clones" in driver.capabilities():
            pytest.skip("this temporary directory has reflinks; the ext4 case needs a filesystem without")
        _volume_with_data(driver, 2 * MiB)
        info = driver.clone("db", "s1", "dev1")
        assert info.shared_bytes == 0 and info.exclusive_bytes >= 2 * MiB
        assert "no reflinks" in info.sharing_method
        assert not (tmp_path / "store" / "bases").exists() or not list((tmp_path / "store" / "bases").iterdir())
    finally:
        driver.close()


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
            assert snaps[name].shared_bytes >= 4 * MiB - 64 * 1024, snaps[name]
            assert snaps[name].exclusive_bytes < 256 * 1024, snaps[name]   # the page, and sqlite's own
    finally:
        driver.close()
