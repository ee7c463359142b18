"""btrfs to btrfs replication receives while the stream arrives: the target's `btrfs receive` runs during the
transfer, not after it; a connection cut mid-stream aborts it, leaving no received subvolume and no `btrfs
receive` running, and the next update resumes from the spool and publishes a snapshot identical to the
source. A stream that fails the inbox's verification at its end publishes nothing either, and destroying
a package stops the receive running into it first."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from agents.errors import Outcome
from agents.storage.btrfs import BtrfsDriver
from agents.storage.driver import StorageError
from agents.storage.stream import encode_frame
from agents.storage.transfer import Inbox, _data_frame_head, _read_frame
from conftest import until
from test_replication import inbox_of, sites, start_slow_replication, tls_inbox_received
from test_storage_contract import btrfs_mounts  # noqa: F401  (the loop-mounted filesystem fixture)


def receivers(root: Path) -> list[int]:
    """Process ids of the `btrfs receive` commands writing under `root`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue        # ended while we looked
        if argv[:2] == [b"btrfs", b"receive"] and any(a.startswith(str(root).encode()) for a in argv[2:]):
            found.append(int(entry.name))
    return found


def staging(root: Path, package: str) -> list[Path]:
    """Half-received snapshots of `package` (the driver's staging directories)."""
    return sorted((root / "snapshots" / package).glob(".recv-*"))


async def test_a_cut_mid_stream_aborts_the_receive_and_the_next_update_completes(btrfs_mounts,  # noqa: F811
                                                                                 mesh, tmp_path):
    roots = (btrfs_mounts[0] / "vertebra", btrfs_mounts[1] / "vertebra")
    s = await sites(mesh, tmp_path, "btrfs", roots)
    target = roots[1]
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    call, action, transfer = await start_slow_replication(s, live)       # 8 MiB at 2 MiB/s
    package = action["package"]

    # The target's receive runs while the stream is still arriving (the old way started it after the end).
    await until(lambda: receivers(target) and tls_inbox_received(s, transfer) > 1 << 20, what="a receive")
    assert tls_inbox_received(s, transfer) < 8 << 20 and not inbox_of(s).is_complete(transfer)
    assert staging(target, package), "the receive writes into a staging directory"
    # It holds no driver lock while the stream flows: the target's other calls are answered meanwhile.
    await s.b.ok("storage.volume.create", volume="other")
    assert receivers(target) and not inbox_of(s).is_complete(transfer)

    # Cut the connection mid-stream, and pause the action so that no resumed connection starts a receive.
    assert inbox_of(s).cut(transfer) == 1
    await s.a.ok("storage.replication.pause", action=action["id"])
    (res,) = (await call).results
    assert res.outcome is Outcome.FAILED and "paused" in res.error
    await until(lambda: not receivers(target) and not staging(target, package), what="the receive aborted")
    assert not (await s.b.ok("storage.package.list"))[0]["snapshots"]
    snapdir = target / "snapshots" / package
    assert not snapdir.exists() or os.listdir(snapdir) == []
    held = inbox_of(s).received(transfer)
    assert held >= 1 << 20

    # The next update resumes at the byte where the spool ends, receives again from the spool's first byte
    # while the rest arrives, and publishes the same tree; nothing crossed the connection twice.
    await s.a.ok("storage.replication.throttle", action=action["id"], rate=0)
    await s.a.ok("storage.replication.resume", action=action["id"])
    done = await s.a.ok("storage.replication.update", action=action["id"])
    last = done["last"]
    assert last["connections"][-1]["resumed_from"] >= held - (1 << 20)   # at most what was in flight
    assert inbox_of(s).received(transfer) == last["stream_bytes"]
    await s.clone_matches(package, last["snapshot"], live, "check")
    assert not receivers(target) and not staging(target, package)
    assert [x["name"] for x in (await s.b.ok("storage.package.list"))[0]["snapshots"]] == [last["snapshot"]]


async def test_destroying_a_package_stops_the_receive_running_into_it(btrfs_mounts, mesh, tmp_path):  # noqa: F811
    roots = (btrfs_mounts[0] / "vertebra", btrfs_mounts[1] / "vertebra")
    s = await sites(mesh, tmp_path, "btrfs", roots)
    target = roots[1]
    live = Path((await s.a.ok("storage.volume.create", volume="db"))["path"])
    (live / "conf").write_text("max_connections = 10\n")
    first = await s.a.ok("storage.replicate", volume="db", target=str(s.dst.jid.bare))
    package = first["package"]
    # An incremental update, throttled: it receives into the existing replica's directory.
    (live / "table").write_bytes(os.urandom(8 << 20))
    await s.a.ok("storage.replication.throttle", action=first["id"], rate=1 << 20)
    update = asyncio.ensure_future(s.a.client.call("storage.replication.update", {"action": first["id"]},
                                                   to=[s.a.target], timeout=60))
    running = await until(lambda: receivers(target), what="a receive")
    half = await until(lambda: staging(target, package), what="its staging directory")

    await s.b.ok("storage.package.destroy", package=package)
    assert not any(Path(f"/proc/{pid}").exists() for pid in running)
    assert not any(p.exists() for p in half)
    await s.a.ok("storage.replication.pause", action=first["id"])
    await update
    await until(lambda: not receivers(target), what="no receive left")


async def test_a_stream_failing_verification_at_its_end_publishes_nothing(btrfs_mounts, tmp_path):  # noqa: F811
    source, target = BtrfsDriver(btrfs_mounts[0] / "vertebra"), BtrfsDriver(btrfs_mounts[1] / "vertebra")
    try:
        source.create_volume("db")
        (source.path("db") / "table").write_bytes(os.urandom(3 << 20))
        source.snapshot("db", "s1")
        stream = b"".join(source.send("db", "s1"))
        inbox = Inbox(tmp_path / "spool")
        received: list[asyncio.Future] = []

        def follow(_transfer, tail) -> None:
            def receive():
                with contextlib.closing(tail.pieces()) as pieces:
                    return target.receive("db", "s1", pieces)
            received.append(asyncio.ensure_future(asyncio.to_thread(receive)))

        inbox.on_stream = follow
        await inbox.start()
        token = inbox.offer("t1")
        reader, writer = await asyncio.open_connection(inbox.host, inbox.port)
        writer.write(encode_frame({"t": "hello", "transfer": "t1", "token": token}))
        assert (await _read_frame(reader))["bytes"] == 0
        # Every byte of a good stream, so the receive has all it needs, then an end whose digest is wrong.
        for offset in range(0, len(stream), 1 << 20):
            piece = stream[offset:offset + (1 << 20)]
            writer.write(_data_frame_head(offset, len(piece)) + piece)
        await until(lambda: receivers(target.root), what="the receive")
        assert not received[0].done()
        writer.write(encode_frame({"t": "done", "bytes": len(stream), "blake3": bytes(32)}))
        answer = await _read_frame(reader)
        assert answer["t"] == "error" and "checksum mismatch" in answer["text"]
        writer.close()
        with pytest.raises(StorageError, match="interrupted"):
            await received[0]
        assert target.list_volumes() == [] and not staging(target.root, "db")
        await until(lambda: not receivers(target.root), what="the receive ended")
        await inbox.stop()
    finally:
        source.close()
        target.close()
