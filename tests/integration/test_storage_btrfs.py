"""What only the btrfs driver does: refusing to start without root or btrfs, and exact space via qgroups."""

from __future__ import annotations

import os
import subprocess

import pytest

from agents.storage.driver import StorageError
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)

def test_refuses_a_directory_that_is_not_on_btrfs(tmp_path, btrfs_mounts):  # noqa: F811
    from agents.storage.btrfs import BtrfsDriver
    with pytest.raises(StorageError) as err:
        BtrfsDriver(tmp_path / "not-btrfs")
    assert err.value.code == "environment"
    assert "not btrfs" in str(err.value) and "embedded driver" in str(err.value)
    assert not (tmp_path / "not-btrfs").exists()


def test_refuses_to_run_without_root(btrfs_mounts):  # noqa: F811
    from agents.storage.btrfs import BtrfsDriver
    # Drop the effective uid only (the real uid stays root, so it can be taken back at once).
    os.seteuid(65534)
    try:
        with pytest.raises(StorageError) as err:
            BtrfsDriver(btrfs_mounts[0] / "x")
    finally:
        os.seteuid(0)
    assert err.value.code == "environment" and "needs root" in str(err.value)
    assert not (btrfs_mounts[0] / "x").exists()


def test_space_is_exclusive_bytes_when_quotas_are_on(btrfs_mounts):  # noqa: F811
    from agents.storage.btrfs import BtrfsDriver
    drv = BtrfsDriver(btrfs_mounts[0] / "vertebra")
    try:
        drv.create_volume("db")
        (drv.path("db") / "data").write_bytes(os.urandom(2 << 20))
        assert drv.list_volumes()[0].used_method.startswith("du")
        assert "space-exact" not in drv.capabilities()
        subprocess.run(["btrfs", "quota", "enable", str(btrfs_mounts[0])], check=True)
        # qgroup numbers are as of the last transaction commit: commit, then count.
        subprocess.run(["btrfs", "filesystem", "sync", str(btrfs_mounts[0])], check=True, capture_output=True)
        subprocess.run(["btrfs", "quota", "rescan", "-w", str(btrfs_mounts[0])], check=True,
                       capture_output=True)
        info = drv.list_volumes()[0]
        assert info.used_method.startswith("qgroup")
        assert 2 << 20 <= info.used_bytes < 3 << 20
        assert "space-exact" in drv.capabilities()
        drv.snapshot("db", "s1")
        drv.clone("db", "s1", "dev")
        subprocess.run(["btrfs", "filesystem", "sync", str(btrfs_mounts[0])], check=True, capture_output=True)
        subprocess.run(["btrfs", "quota", "rescan", "-w", str(btrfs_mounts[0])], check=True,
                       capture_output=True)
        # A fresh clone shares every extent with its snapshot: it holds next to nothing of its own.
        dev = next(v for v in drv.list_volumes() if v.name == "dev")
        assert dev.used_bytes < 256 * 1024
    finally:
        drv.close()
