"""Nothing is left in a replication target's spool that can no longer be resumed, between two storage
agents on the real server: storage.report shows what the spools hold; destroying a package removes the
spool of its unfinished transfer; a spool nobody wrote for longer than the resume window is removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from agents.errors import Outcome
from conftest import until
from test_replication import sites, start_slow_replication, tls_inbox_received


def spool_of(s, transfer: str) -> Path:
    return s.dst.packages.directory / "spool" / f"{transfer}.part"


async def interrupted_transfer(s) -> tuple[dict, str]:
    """A first update paused after a megabyte reached the target; return the action and its transfer."""
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    call, action, transfer = await start_slow_replication(s, live)
    await until(lambda: tls_inbox_received(s, transfer) > 1 << 20, what="a megabyte received")
    await s.a.ok("storage.replication.pause", action=action["id"])
    (res,) = (await call).results
    assert res.outcome is Outcome.FAILED and "paused" in res.error
    return action, transfer


async def test_destroying_a_package_removes_the_spool_of_its_unfinished_transfer(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    action, transfer = await interrupted_transfer(s)
    report = (await s.b.ok("storage.report"))["spool"]
    (held,) = report["transfers"]
    assert held["package"] == action["package"] and held["snapshot"] == f"{action['id']}-000001"
    assert held["bytes"] == report["bytes"] == spool_of(s, transfer).stat().st_size > 1 << 20

    await s.b.ok("storage.package.destroy", package=action["package"])
    assert not spool_of(s, transfer).exists()
    assert (await s.b.ok("storage.report"))["spool"] == {"bytes": 0, "transfers": [],
                                                         "resume_window": s.dst.packages.resume_window}


async def test_a_spool_beyond_the_resume_window_is_removed(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    action, transfer = await interrupted_transfer(s)
    # Nobody wrote it for longer than the window (its sender went away for good) ...
    long_ago = time.time() - s.dst.packages.resume_window - 60
    os.utime(spool_of(s, transfer), (long_ago, long_ago))
    # ... so the next transfer opened on the target (another action's) removes it.
    (Path((await s.a.ok("storage.volume.create", volume="other"))["path"]) / "v").write_text("x\n")
    await s.a.ok("storage.replicate", volume="other", target=str(s.dst.jid.bare))
    assert not spool_of(s, transfer).exists()
    assert (await s.b.ok("storage.report"))["spool"]["transfers"] == []
