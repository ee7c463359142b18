"""Replication refuses early and says the truth, between two storage agents on the real server: a target
whose driver cannot receive the source's stream refuses it in the offer, before any byte is sent, with
`unsupported` and what would work, and the action pauses with the reason instead of retrying; a full
target says `no-space: No space left on device; nothing was published` on both drivers (never an internal
OSError), and the update finishes once there is room."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import pytest

from agents.errors import Outcome
from test_replication import sites
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)


@pytest.mark.parametrize("source, target", [("btrfs", "embedded"), ("embedded", "btrfs")])
async def test_a_stream_the_target_cannot_take_is_refused_in_the_offer(btrfs_mounts, mesh, tmp_path,  # noqa: F811
                                                                       source, target):
    roots = {"btrfs": btrfs_mounts[0] / "vertebra", "embedded": tmp_path / "embedded"}
    s = await sites(mesh, tmp_path, (source, target), (roots[source], roots[target]))
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "table").write_bytes(os.urandom(4 << 20))

    # A scheduled action: a refusal that cannot change must stop the schedule, not be retried.
    outcome, error = await s.a.fails("storage.replicate", volume="db", target=str(s.dst.jid.bare), interval=0.2)
    assert outcome is Outcome.FAILED and error.startswith("unsupported:"), error
    assert f"uses the {target} driver" in error and f"a storage agent that uses the {source} driver" in error
    assert "failed 5 times" not in error and "resumes on the next run" not in error
    # Nothing was sent: no inbox was opened, no package made on the target.
    assert s.dst.packages.inboxes == {}
    assert await s.b.ok("storage.package.list") == []
    (action,) = await s.a.ok("storage.replication.list")
    assert action["paused"] is True and action["state"] == "paused"
    assert action["error"].startswith("storage.package.receive") and "unsupported" in action["error"]
    assert "storage.replication.resume" in action["error"]


@pytest.fixture
def small_ext4(tmp_path):
    """A 48 MiB ext4 filesystem on a loop device (as root), unmounted and removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a loop-mounted filesystem needs root")
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink()


def fill_up(top: Path) -> Path:
    """Write incompressible data under `top` until its filesystem is full; return the filler file."""
    filler = top / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


@pytest.mark.parametrize("driver", ["embedded", "btrfs"])
async def test_a_full_target_says_so_the_same_way_on_both_drivers(btrfs_mounts, small_ext4, mesh, tmp_path,  # noqa: F811
                                                                   driver):
    target_root = small_ext4 / "vertebra" if driver == "embedded" else btrfs_mounts[1] / "vertebra"
    s = await sites(mesh, tmp_path, driver, (tmp_path / "a" if driver == "embedded" else btrfs_mounts[0] / "vertebra",
                                             target_root))
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "table").write_bytes(os.urandom(8 << 20))
    filler = await asyncio.to_thread(fill_up, target_root.parent)

    outcome, error = await s.a.fails("storage.replicate", volume="db", target=str(s.dst.jid.bare), tls=False)
    assert outcome is Outcome.FAILED and error.startswith("no-space:"), error
    assert "No space left on device; nothing was published" in error and "Errno" not in error
    (pkg,) = await s.b.ok("storage.package.list")
    assert pkg["snapshots"] == []
    (action,) = await s.a.ok("storage.replication.list")
    assert action["pending"] is not None and action["paused"] is False

    # Once there is room, the update finishes from the stream the target already holds.
    filler.unlink()
    if driver == "btrfs":
        subprocess.run(["btrfs", "filesystem", "sync", str(target_root.parent)], check=True, capture_output=True)
    done = await s.a.ok("storage.replication.update", action=action["id"])
    assert done["last"]["connections"][-1]["sent_bytes"] == 0
    await s.clone_matches(done["package"], done["last_snap"], live, "check")
