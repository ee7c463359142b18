"""Replication refuses early and says the truth, between two storage agents on the real server: a target
whose driver cannot receive the source's stream refuses it in the offer, before any byte is sent, with
`unsupported` and what would work, and the action pauses with the reason instead of retrying."""

from __future__ import annotations

import os
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
