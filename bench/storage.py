#!/usr/bin/env python3
"""Storage benchmark, every figure beside its baseline from the same run:

1. clone time and added bytes of a small (100 MiB) vs a big (2 GiB) volume on each driver: btrfs, the
   embedded driver on the default ext4 state directory (clones are overlay mounts over the snapshot's base
   when the bench runs as root), and the embedded driver on a reflink filesystem (a loop-mounted btrfs
   image); targets: time ratio <= 1.5, bytes a clone adds <= 1% of the volume. The first clone
   of a snapshot is reported apart, and so are the snapshot's time and the bytes it adds (the embedded
   driver makes the base its clones share as it takes the snapshot: on ext4 a second copy of the data);
2. embedded snapshot ingest MB/s vs a bare read + 8 KiB cut + BLAKE3 loop over the same cached file, in
   alternating rounds on fresh stores, median ratio (>= 0.3x);
3. bytes an incremental update sends after rewriting 1% of a file's pages in place vs bytes changed (<= 1.05);
4. replication throughput (two storage agents on a private Prosody, btrfs driver, TLS on) vs
   `btrfs send | btrfs receive` of the same snapshot (>= 0.5x);
5. the average rate of a throttled replication vs its limit (within 10%).

Needs root (loop-mounted btrfs images) and prosody. Sizes are modest by default for a shared machine
(--big-mib 2048 gives the 2 GiB volume of item 1; default 1024).

Usage::

    python bench/storage.py [--big-mib 1024] [--data-mib 256] [--ingest-rounds 5] [--keep]
    python bench/storage.py --clone-only [--small-mib 100] [--big-mib 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3  # noqa: E402
import verdicts  # noqa: E402

from agents.actor import Endpoint  # noqa: E402
from agents.authz import AdminsOnly  # noqa: E402
from agents.client import Client  # noqa: E402
from agents.errors import Outcome  # noqa: E402
from agents.ports import free_port  # noqa: E402
from agents.server import PrivateServer  # noqa: E402
from agents.storage import overlay  # noqa: E402
from agents.storage.agent import StorageAgent  # noqa: E402
from agents.storage.btrfs import BtrfsDriver  # noqa: E402
from agents.storage.embedded import EmbeddedDriver  # noqa: E402

DOMAIN = "bench.storage"
PAGE = 8192
MiB = 1 << 20
_RESULTS: list[tuple[str, str, bool]] = []


def report(name: str, text: str, ok: bool, figure: str = "", target: str = "") -> None:
    _RESULTS.append((name, text, ok))
    verdicts.record(name, figure or text, target or "see text", ok)
    print(f"{'MET ' if ok else 'MISS'}  {name}: {text}", flush=True)


def write_random(path: Path, size: int) -> None:
    """Real, incompressible data that never repeats (btrfs does not dedupe, the embedded store would)."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(os.urandom(min(left, 16 * MiB)))
            left -= 16 * MiB
        f.flush()
        os.fsync(f.fileno())


def loop_btrfs(work: Path, name: str, size: int) -> Path:
    image, mnt = work / f"{name}.img", work / name
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    return mnt


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def free_bytes(where: Path) -> int:
    os.sync()       # delayed allocation and writeback would otherwise land in the next measurement
    st = os.statvfs(where)
    return st.f_bfree * st.f_frsize


def bench_clone(label: str, drv, where: Path, small_mib: int, big_mib: int, clones: int) -> None:
    """Median clone time and the bytes one clone adds, small vs big volume, on one driver. The snapshot and
    the first clone of it are measured apart and printed: where the embedded driver cannot reflink, the
    snapshot writes the base its clones share (a second copy of the data), and that cost is shown where it
    is paid. The timed clones alternate between the two volumes, so that neither size gets the quieter
    moments of a shared machine."""
    sizes = {"small": small_mib, "big": big_mib}
    for name, mib in sizes.items():
        drv.create_volume(name)
        write_random(drv.path(name) / "data", mib * MiB)
        before = free_bytes(where)
        took = timed(drv.snapshot, name, "s")
        snap_added = before - free_bytes(where)
        (snap,) = drv.list_snapshots(name)
        print(f"INFO  {label} snapshot of {mib} MiB: {took:.2f} s ({mib / took:.0f} MiB/s), adds "
              f"{snap_added / MiB:.1f} MiB = {snap_added / (mib * MiB):.0%} of the volume; storage.info says "
              f"{snap.exclusive_bytes / MiB:.1f} MiB exclusive, {snap.shared_bytes / MiB:.1f} MiB shared", flush=True)
        before = free_bytes(where)
        first = timed(drv.clone, name, "s", f"{name}-c0")
        first_added = before - free_bytes(where)
        print(f"INFO  {label} first clone of {mib} MiB: {first:.2f} s, adds {first_added / MiB:.1f} MiB", flush=True)
        if name == "big":
            # The first clone of a snapshot is a clone too: where it built a full base, a developer's
            # first copy would cost the whole volume, and this row would say so.
            share = first_added / (mib * MiB)
            report(f"{label} first clone of a snapshot, space", f"adds {first_added / MiB:.1f} MiB = {share:.2%} of"
                   f" the {mib} MiB volume in {first:.2f} s (target <= 1%)", share <= 0.01, f"{share:.2%}", "<= 1%")
    times: dict[str, list[float]] = {name: [] for name in sizes}
    adds: dict[str, list[int]] = {name: [] for name in sizes}
    for i in range(1, clones + 1):
        for name in sizes:
            before = free_bytes(where)
            times[name].append(timed(drv.clone, name, "s", f"{name}-c{i}"))
            adds[name].append(before - free_bytes(where))
    medians = {name: statistics.median(t) for name, t in times.items()}
    added = {name: statistics.median(a) for name, a in adds.items()}
    for name in ("small", "big"):       # destroyed, not left behind: overlay clones are mounts
        for i in range(clones + 1):
            drv.destroy_clone(f"{name}-c{i}")
    drv.close()
    ratio = medians["big"] / medians["small"]
    report(f"{label} clone time", f"{small_mib} MiB {medians['small'] * 1000:.1f} ms, {big_mib} MiB "
           f"{medians['big'] * 1000:.1f} ms (median of {clones}): ratio {ratio:.2f} (target <= 1.5)", ratio <= 1.5,
           f"{ratio:.2f}x", "<= 1.5x")
    share = added["big"] / (big_mib * MiB)
    report(f"{label} further clones, space", f"a clone of {small_mib} MiB adds {added['small'] / MiB:.2f} MiB, of"
           f" {big_mib} MiB adds {added['big'] / MiB:.2f} MiB = {share:.2%} of the volume (target <= 1%)",
           share <= 0.01, f"{share:.2%}", "<= 1%")


def bench_clones(work: Path, small_mib: int, big_mib: int) -> list[Path]:
    """The clone figures on all three stores; returns the mounts made."""
    size = 4 * (small_mib + big_mib) * MiB + 1024 * MiB   # volume, chunk store and base for the embedded run
    mounts = [loop_btrfs(work, "clones", size), loop_btrfs(work, "reflinks", size)]
    bench_clone("btrfs", BtrfsDriver(mounts[0] / "clones"), mounts[0], small_mib, big_mib, 7)
    ext4 = work / "embedded-default"
    bench_clone(f"embedded on {_fs_type(work)}", EmbeddedDriver(ext4), work, small_mib, big_mib, 9)
    shutil.rmtree(ext4, ignore_errors=True)
    bench_clone("embedded on btrfs (reflinks)", EmbeddedDriver(mounts[1] / "store"), mounts[1], small_mib,
                big_mib, 5)
    return mounts


def _fs_type(where: Path) -> str:
    done = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(where)], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or "the default filesystem"


def direct_write_seconds(directory: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to a new file in ``directory`` with O_DIRECT in 8 MiB writes, then
    fdatasync: what the device takes for bytes that must be on disk, as the store's packs and bases are."""
    buf = mmap.mmap(-1, 8 * MiB)                 # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(8 * MiB))
    path = directory / "direct-write-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(nbytes // (8 * MiB)):
            os.write(fd, buf)
        os.fdatasync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
        buf.close()


def bench_ingest(work: Path, mib: int, rounds: int) -> None:
    """The same file (hard-linked into a fresh store each round, so both loops read it from the page cache)
    through the bare loop and through a snapshot, alternately; the ratio of each round, and their median."""
    data = work / "ingest-data"
    write_random(data, mib * MiB)

    def bare() -> None:
        with open(data, "rb", buffering=0) as f:
            while buf := f.read(128 * PAGE):
                view = memoryview(buf)
                for i in range(0, len(buf), PAGE):
                    blake3.blake3(view[i:i + PAGE]).digest()

    bare()                                   # into the page cache, for both
    ratios, rates, sent_ratios, settles = [], [], [], []
    made_base = False
    for k in range(rounds):
        # A snapshot as storage.snapshot.create takes it (with the base its clones share, where they can
        # share one), and one as replication takes it (for_clones=False: chunks only), each on a fresh store.
        for for_clones in (True, False):
            root = work / f"ingest-{k}-{for_clones}"
            drv = EmbeddedDriver(root)
            drv.create_volume("v")
            os.link(data, drv.path("v") / "table")
            os.sync()                        # nobody's writeback (an earlier round's, the data's) lands inside
            t_bare = timed(bare)
            t_snap = timed(functools.partial(drv.snapshot, "v", "s", for_clones=for_clones))
            made_base = made_base or (for_clones and drv.snapshot_space("v", "s")["base_bytes"] > 0)
            # The close waits for the base, which goes to disk after the snapshot answered (nothing of it
            # overlaps the next round). The stores are removed after the last round, so nothing of a
            # removal (unlinks, discards) can overlap a timed round either.
            t_close = timed(drv.close)
            if for_clones:
                ratios.append(t_bare / t_snap)
                rates.append((mib / t_snap, mib / t_bare))
                settles.append(t_close)
            else:
                sent_ratios.append(t_bare / t_snap)
    for k in range(rounds):
        for for_clones in (True, False):
            shutil.rmtree(work / f"ingest-{k}-{for_clones}")
    ratio = statistics.median(ratios)
    each = ", ".join(f"{snap:.0f} vs {b:.0f} MB/s ({r:.2f}x)" for (snap, b), r in zip(rates, ratios))
    base = ("and writes the base clones share, a second copy here: direct while the device keeps up, else "
            "direct or through the page cache, whichever costs less, synced after the answer" if made_base
            else "no base: clones here cannot share one")
    report("embedded ingest", f"snapshot vs bare read+cut+hash of {mib} MiB, {rounds} rounds: {each}; median "
           f"{ratio:.2f}x (target >= 0.3x; the store also probes for compressibility, writes packs, indexes in "
           f"SQLite and fsyncs, {base})", ratio >= 0.3, f"{ratio:.2f}x", ">= 0.3x")
    print(f"INFO  embedded ingest of a snapshot taken for replication (no base): median "
          f"{statistics.median(sent_ratios):.2f}x bare", flush=True)
    if made_base:
        print(f"INFO  the base was on disk and named {statistics.median(settles) * 1000:.0f} ms (median) after the "
              f"snapshot answered (the store's close waits for it)", flush=True)
    # The most any store could reach here: the snapshot's chunks must be on disk when it commits, so the
    # device's direct-write time for them bounds the row, whatever the CPU does. With a base, the device
    # also takes the base's direct writes while it keeps up (the copier turns to the page cache only once
    # it falls behind), so where both copies go direct their time is the bound.
    t_bare = statistics.median(timed(bare) for _ in range(3))
    t_pack = statistics.median(direct_write_seconds(work, mib * MiB) for _ in range(3))
    both = ""
    if made_base:
        t_both = statistics.median(direct_write_seconds(work, 2 * mib * MiB) for _ in range(3))
        both = (f"; with the base, {2 * mib} MiB (both copies direct) {t_both * 1000:.0f} ms = "
                f"{t_bare / t_both:.2f}x")
    print(f"INFO  this disk's ceiling for the row: bare {t_bare * 1000:.0f} ms vs {mib} MiB of direct writes (the "
          f"packs the snapshot waits for) {t_pack * 1000:.0f} ms = {t_bare / t_pack:.2f}x{both}", flush=True)
    bench_incremental_ingest(work, data, rounds, bare)


def bench_incremental_ingest(work: Path, data: Path, rounds: int, bare: Callable[[], None]) -> None:
    """Snapshots of a volume that changed a little since its last one (a page in every 64 MiB), each as
    replication takes it (chunks only) and as storage.snapshot.create takes it (with the base its clones
    share), against the bare loop over the same file: the store reads and hashes the whole volume again
    (ext4 says nothing of what changed), and should not do much more than that."""
    drv = EmbeddedDriver(work / "ingest-incremental")
    drv.create_volume("v")
    table = drv.path("v") / "table"
    shutil.copyfile(data, table)
    size = table.stat().st_size
    drv.snapshot("v", "s0")
    times: dict[bool, list[float]] = {False: [], True: []}
    bares: list[float] = []
    for k in range(rounds):
        for for_clones in (False, True):
            with open(table, "r+b") as f:
                for at in range(PAGE * (2 * k + for_clones), size, 64 * MiB):
                    f.seek(at)
                    f.write(os.urandom(PAGE))
            os.sync()
            bares.append(timed(bare))
            times[for_clones].append(timed(functools.partial(drv.snapshot, "v", f"s{k}-{for_clones}",
                                                             for_clones=for_clones)))
    drv.close()
    shutil.rmtree(work / "ingest-incremental")
    t_bare = statistics.median(bares)
    chunks, based = (statistics.median(times[c]) for c in (False, True))
    print(f"INFO  embedded incremental snapshot of {size // MiB} MiB, a page changed in every 64 MiB, median of "
          f"{rounds}: as replication takes it {chunks * 1000:.0f} ms = {t_bare / chunks:.2f}x bare "
          f"({t_bare * 1000:.0f} ms); with the base clones share {based * 1000:.0f} ms = {t_bare / based:.2f}x "
          f"(each changed file is copied whole into the new base)", flush=True)


class Mesh:
    """A private Prosody, two storage agents and a client."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.server = PrivateServer(home / "server-home", domain=DOMAIN, port=free_port())
        self.actors: list = []

    async def start(self, roots: tuple[Path, Path], driver: str) -> tuple[StorageAgent, StorageAgent, Client]:
        endpoint = Endpoint("127.0.0.1", self.server.port, DOMAIN, self.server.ssl_context())
        n = len(self.actors)
        accounts = {f"op{n}": "pw-op", f"src{n}": "pw-src", f"dst{n}": "pw-dst"}
        self.server.register_many(accounts)
        op, src_jid, dst_jid = (f"{u}@{DOMAIN}" for u in accounts)
        for sub in ("src", "dst"):
            (self.home / f"state{n}-{sub}").mkdir(parents=True)
        src = StorageAgent(src_jid, "pw-src", endpoint, authorizer=AdminsOnly([op]),
                           state_dir=self.home / f"state{n}-src", settings={"driver": driver, "root": str(roots[0])})
        dst = StorageAgent(dst_jid, "pw-dst", endpoint, authorizer=AdminsOnly([op, src_jid]),
                           state_dir=self.home / f"state{n}-dst", settings={"driver": driver, "root": str(roots[1])})
        client = Client(op, "pw-op", endpoint, broker="")
        for actor in (src, dst, client):
            await actor.start()
            self.actors.append(actor)
        return src, dst, client

    async def stop(self) -> None:
        for actor in reversed(self.actors):
            await actor.stop()


async def call(client: Client, agent: StorageAgent, op: str, **args) -> dict:
    (res,) = (await client.call(op, args, to=[str(agent.jid)], timeout=3600)).results
    if res.outcome is not Outcome.OK:
        raise SystemExit(f"{op}: {res.outcome.value}: {res.error}")
    return res.result


async def bench_replication(mesh: Mesh, work: Path, mounts: tuple[Path, Path], data_mib: int) -> None:
    # Baseline: btrfs send | btrfs receive of the same snapshot, between the same two filesystems.
    src, dst, client = await mesh.start((mounts[0] / "repl", mounts[1] / "repl"), "btrfs")
    vol = await call(client, src, "storage.volume.create", volume="db")
    write_random(Path(vol["path"]) / "table", data_mib * MiB)
    base_dir = mounts[0] / "baseline"
    subprocess.run(["btrfs", "subvolume", "snapshot", "-r", vol["path"], str(base_dir)], check=True,
                   capture_output=True)
    subprocess.run(["sync"], check=True)
    recv_dir = mounts[1] / "baseline-recv"
    recv_dir.mkdir()
    t = time.perf_counter()
    subprocess.run(f"btrfs send -q {base_dir} | btrfs receive -q {recv_dir}", shell=True, check=True)
    subprocess.run(["sync"], check=True)
    t_pipe = time.perf_counter() - t

    t = time.perf_counter()
    action = await call(client, src, "storage.replicate", volume="db", target=str(dst.jid.bare))
    t_repl = time.perf_counter() - t
    ratio = t_pipe / t_repl
    report("replication throughput", f"{data_mib} MiB btrfs through two agents (TLS on) {data_mib / t_repl:.0f} "
           f"MiB/s vs btrfs send|receive {data_mib / t_pipe:.0f} MiB/s: {ratio:.2f}x (target >= 0.5x; "
           f"stream {action['last']['stream_bytes'] / MiB:.0f} MiB)", ratio >= 0.5, f"{ratio:.2f}x", ">= 0.5x")


async def bench_incremental_and_throttle(mesh: Mesh, work: Path, data_mib: int) -> None:
    src, dst, client = await mesh.start((work / "emb-a", work / "emb-b"), "embedded")
    vol = await call(client, src, "storage.volume.create", volume="db")
    table = Path(vol["path"]) / "table"
    pages = 64 * MiB // PAGE
    write_random(table, pages * PAGE)
    first = await call(client, src, "storage.replicate", volume="db", target=str(dst.jid.bare), tls=False)
    rewritten = random.Random(1).sample(range(pages), pages // 100)
    with open(table, "r+b") as f:
        for p in rewritten:
            f.seek(p * PAGE)
            f.write(os.urandom(PAGE))
    changed = len(rewritten) * PAGE
    last = (await call(client, src, "storage.replication.update", action=first["id"]))["last"]
    ratio = last["sent_bytes"] / changed
    report("incremental bytes", f"1% of 64 MiB rewritten in place ({changed} B changed): {last['sent_bytes']} B "
           f"sent: {ratio:.3f} (target <= 1.05)", ratio <= 1.05, f"{ratio:.3f}", "<= 1.05")

    # Throttle: a fresh 32 MiB volume under an 8 MiB/s limit.
    limit = 8 * MiB
    vol2 = await call(client, src, "storage.volume.create", volume="t")
    write_random(Path(vol2["path"]) / "data", 32 * MiB)
    done = (await call(client, src, "storage.replicate", volume="t", target=str(dst.jid.bare), tls=False,
                       rate=limit))["last"]
    rate = done["sent_bytes"] / done["seconds"]
    off = abs(rate - limit) / limit
    report("throttle", f"limit {limit / MiB:.1f} MiB/s, average {rate / MiB:.2f} MiB/s over "
           f"{done['seconds']:.1f} s ({off * 100:.1f}% off; target within 10%)", off <= 0.10, f"{off:.1%} off",
           "within 10%")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-mib", type=int, default=100)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--ingest-rounds", type=int, default=5)
    ap.add_argument("--ingest-only", action="store_true", help="run only the embedded ingest figure")
    ap.add_argument("--clone-only", action="store_true", help="run only the clone time and space figures")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None:
        print("bench/storage.py needs root and btrfs-progs (loop-mounted btrfs images)", file=sys.stderr)
        return 2
    verdicts.begin()
    work = Path(tempfile.mkdtemp(prefix="vertebra-bench-storage-"))
    mounts: list[Path] = []
    mesh = Mesh(work)
    try:
        # Ingest first: it is the phase most sensitive to what the page cache and writeback hold, and the
        # btrfs phases leave gigabytes of loop-image pages behind.
        if not args.clone_only:
            bench_ingest(work, args.data_mib, args.ingest_rounds)
        if not args.ingest_only:
            mounts += bench_clones(work, args.small_mib, args.big_mib)
        if not args.ingest_only and not args.clone_only:
            mesh.server.start()
            for name in ("site-a", "site-b"):
                mounts.append(loop_btrfs(work, name, 3 * args.data_mib * MiB + 512 * MiB))
            await bench_replication(mesh, work, (mounts[-2], mounts[-1]), args.data_mib)
            await bench_incremental_and_throttle(mesh, work, args.data_mib)
    finally:
        await mesh.stop()
        mesh.server.stop()
        overlay.unmount_all_under(work)     # whatever a failed run left mounted, loop images included
        for mnt in mounts:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        verdicts.save()
    missed = [name for name, _, ok in _RESULTS if not ok]
    print(f"\n{len(_RESULTS) - len(missed)}/{len(_RESULTS)} targets met" + (f"; missed: {', '.join(missed)}"
                                                                          if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
