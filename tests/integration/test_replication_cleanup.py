"""Nothing is left behind by replication, between two storage agents on the real server: a send stream
whose connection was cut (the receiving agent's process killed) or whose update was cancelled is closed at
once (no `btrfs send` child, no snapshot hold), without waiting for the garbage collector."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

from agents.errors import Outcome
from agents.storage.agent import StorageAgent
from conftest import ROOT, until
from test_replication import sites, start_slow_replication, tls_inbox_received
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)
from test_storage_ops import Caller


def btrfs_send_children() -> list[int]:
    """Pids of the `btrfs send` processes this test process (where the agents run) started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue            # the process ended while it was being looked at
        if ppid == os.getpid() and argv[:2] == [b"btrfs", b"send"]:
            found.append(int(stat.parent.name))
    return found


async def test_an_update_cancelled_mid_stream_leaves_no_send_running_and_no_snapshot_held(btrfs_mounts, mesh,  # noqa: F811
                                                                                         tmp_path):
    roots = (btrfs_mounts[0] / "vertebra", btrfs_mounts[1] / "vertebra")
    s = await sites(mesh, tmp_path, "btrfs", roots)
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    # The stream must be closed on the way out, not whenever the collector happens to run: with the
    # collector off, a stream left to it stays open (its child running, its snapshot held) to the end.
    gc.disable()
    try:
        call, action, transfer = await start_slow_replication(s, live)
        await until(lambda: tls_inbox_received(s, transfer) > 1 << 20, what="a megabyte received")
        assert btrfs_send_children(), "the update runs `btrfs send`"
        # Destroying the action cancels the running update; the snapshot it was sending is free at once.
        gone = await s.a.ok("storage.replication.destroy", action=action["id"])
        assert gone["kept_snapshots"] == []
        assert not btrfs_send_children()
        assert await s.a.ok("storage.snapshot.list", volume="db") == []
        (res,) = (await call).results
        assert res.outcome is Outcome.FAILED and "paused or stopped" in res.error
    finally:
        gc.enable()


_RECEIVER = """
import asyncio, sys
from pathlib import Path
from agents.actor import Endpoint
from agents.authz import AdminsOnly
from agents.storage.agent import StorageAgent

jid, password, port, cert, admin, source, root, state = sys.argv[1:9]


async def main():
    agent = StorageAgent(jid, password, Endpoint.pinned("127.0.0.1", int(port), "vertebra.test", cert),
                         resources=["/site/b"], authorizer=AdminsOnly([admin, source]),
                         settings={"driver": "btrfs", "root": root}, state_dir=Path(state))
    await agent.start()
    print("online", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_killed_receiver_leaves_no_send_running_and_no_snapshot_held(btrfs_mounts, mesh, tmp_path):  # noqa: F811
    src = await mesh.agent(StorageAgent, None, ["/site/a"],
                           settings={"driver": "btrfs", "root": str(btrfs_mounts[0] / "vertebra")})
    jid, password = mesh.account("storage")
    script = tmp_path / "receiver.py"
    script.write_text(_RECEIVER)
    receiver = subprocess.Popen([sys.executable, str(script), jid, password, str(mesh.server.port),
                                 str(mesh.server.cert_path), mesh.operator[0], str(src.jid.bare),
                                 str(btrfs_mounts[1] / "vertebra"), str(tmp_path / "receiver-state")],
                                cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    gc.disable()        # as above: the stream is closed on the way out, not by the collector
    try:
        assert (await asyncio.to_thread(receiver.stdout.readline)).strip() == "online"
        client = await mesh.client()
        a = Caller(client, src)
        live = Path((await a.ok("storage.volume.create", volume="db"))["path"])
        (live / "table").write_bytes(os.urandom(8 << 20))
        call = asyncio.ensure_future(client.call("storage.replicate", {"volume": "db", "target": jid,
                                                                       "rate": 2 << 20}, to=[a.target], timeout=60))
        await until(lambda: any((p or {}).get("bytes", 0) > 1 << 20 for p in src.replicator.live.values()),
                    what="a megabyte sent")
        assert btrfs_send_children(), "the update runs `btrfs send`"
        receiver.send_signal(signal.SIGKILL)
        receiver.wait(timeout=10)
        await until(lambda: not btrfs_send_children(), what="the `btrfs send` of the cut stream to end")
        (action,) = await a.ok("storage.replication.list")
        gone = await a.ok("storage.replication.destroy", action=action["id"])
        assert gone["kept_snapshots"] == []
        assert await a.ok("storage.snapshot.list", volume="db") == []
        (res,) = (await call).results
        assert res.outcome is Outcome.FAILED
    finally:
        gc.enable()
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
