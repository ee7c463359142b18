"""What a file is survives replication on both drivers, between two storage agents on the real server: a
sparse file stays sparse at the target (its holes are not written out), and a file with two names (a hard
link) is still one file with two names there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_replication import sites
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)
from test_storage_ops import tree_digest


@pytest.fixture(params=["embedded", "btrfs"])
def store(request, tmp_path):
    """A driver and the roots of its two sites; set up before the mesh, so its agents stop before the
    btrfs mounts go."""
    if request.param == "embedded":
        return "embedded", (tmp_path / "a", tmp_path / "b")
    mounts = request.getfixturevalue("btrfs_mounts")
    return "btrfs", (mounts[0] / "vertebra", mounts[1] / "vertebra")


async def test_holes_and_hard_links_arrive_as_they_were(store, mesh, tmp_path):
    s = await sites(mesh, tmp_path, *store)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    # 64 MiB long, 3 MiB of it data: a megabyte at the start, in the middle and at the end.
    with open(live / "sparse", "wb") as f:
        for offset in (0, 32 << 20, 63 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
    with open(live / "trailing-hole", "wb") as f:      # data, then a hole to the end
        f.write(os.urandom(1 << 20))
        f.truncate(16 << 20)
    (live / "dir").mkdir()
    (live / "dir" / "data").write_bytes(os.urandom(100_000))
    os.link(live / "dir" / "data", live / "also-data")
    assert os.stat(live / "sparse").st_blocks * 512 < 4 << 20

    done = await s.a.ok("storage.replicate", volume="db", target=str(s.dst.jid.bare))
    made = await s.b.ok("storage.clone.create", volume=done["package"], snapshot=done["last_snap"], clone="check")
    copy = Path(made["path"])
    assert tree_digest(copy) == tree_digest(live)
    for name, size in (("sparse", 64 << 20), ("trailing-hole", 16 << 20)):
        st = os.stat(copy / name)
        assert st.st_size == size and st.st_blocks * 512 < 4 << 20, (name, st.st_blocks * 512)
    one, other = os.stat(copy / "dir" / "data"), os.stat(copy / "also-data")
    assert one.st_nlink == other.st_nlink == 2 and one.st_ino == other.st_ino

    # An update that changes the file through one name shows through the other at the target.
    with open(live / "also-data", "r+b") as f:
        f.write(b"changed")
    again = await s.a.ok("storage.replication.update", action=done["id"])
    made = await s.b.ok("storage.clone.create", volume=done["package"], snapshot=again["last_snap"], clone="check2")
    copy = Path(made["path"])
    assert (copy / "dir" / "data").read_bytes()[:7] == b"changed"
    assert os.stat(copy / "dir" / "data").st_ino == os.stat(copy / "also-data").st_ino
    assert tree_digest(copy) == tree_digest(live)
