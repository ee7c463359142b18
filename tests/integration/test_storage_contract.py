"""The storage driver contract, run against every driver: the embedded store in a temporary directory, and
btrfs on loop-mounted image files that the fixture creates, mounts, unmounts and removes."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import EmbeddedDriver

PAGE = 8192
BIG = 4 << 20


def _btrfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the btrfs driver tests need root (loop devices and mount)"
    if shutil.which("mkfs.btrfs") is None:
        return "mkfs.btrfs is missing: apt-get install -y btrfs-progs"
    return None


def _loop_btrfs(base: Path, name: str) -> Path:
    image, mnt = base / f"{name}.img", base / name
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    return mnt


@pytest.fixture
def btrfs_mounts(tmp_path):
    reason = _btrfs_unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the btrfs tests: {reason}")
        pytest.skip(reason)
    mounts = []
    try:
        for name in ("site-a", "site-b"):
            mounts.append(_loop_btrfs(tmp_path, name))
        yield mounts
    finally:
        busy = []
        for mnt in mounts:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                # Never leak a mount; detach lazily, then fail so the leak's cause gets fixed.
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
                busy.append(str(mnt))
        for image in tmp_path.glob("*.img"):
            image.unlink()
        assert not busy, f"btrfs test mounts were still busy at teardown: {busy}"


@pytest.fixture(params=["embedded", "btrfs"])
def pair(request, tmp_path):
    """Two stores of one driver, as on two sites."""
    if request.param == "embedded":
        a, b = EmbeddedDriver(tmp_path / "a"), EmbeddedDriver(tmp_path / "b")
        yield a, b
        a.close()
        b.close()
    else:
        from agents.storage.btrfs import BtrfsDriver
        mounts = request.getfixturevalue("btrfs_mounts")
        a, b = BtrfsDriver(mounts[0] / "vertebra"), BtrfsDriver(mounts[1] / "vertebra")
        yield a, b
        a.close()
        b.close()


def tree(top: Path) -> dict[str, tuple]:
    """What a tree holds: type, mode, content digest or link target, file mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest(),
                            st.st_mtime_ns)
    return out


def populate(root: Path) -> None:
    (root / "base" / "16384").mkdir(parents=True)
    (root / "PG_VERSION").write_text("16\n")
    (root / "base" / "16384" / "1259").write_bytes(os.urandom(BIG))
    (root / "base" / "16384" / "empty").write_bytes(b"")
    (root / "base" / "16384" / "odd").write_bytes(os.urandom(PAGE * 3 + 17))
    (root / "latest").symlink_to("base/16384")
    (root / "postgresql.conf").write_text("shared_buffers = 128MB\n")
    os.chmod(root / "postgresql.conf", 0o600)


def rewrite_page(path: Path, page: int) -> None:
    with open(path, "r+b") as f:
        f.seek(page * PAGE)
        f.write(os.urandom(PAGE))


def stream_bytes(driver, volume, to_snap, from_snap=None) -> bytes:
    return b"".join(driver.send(volume, to_snap, from_snap))


def test_full_then_incremental_replication_gives_identical_trees(pair):
    a, b = pair
    a.create_volume("db")
    live = a.path("db")
    populate(live)
    a.snapshot("db", "s1")
    s1_tree = tree(live)
    rewrite_page(live / "base" / "16384" / "1259", 100)
    a.snapshot("db", "s2")
    s2_tree = tree(live)
    assert s1_tree != s2_tree

    full = stream_bytes(a, "db", "s1")
    assert len(full) > BIG // 2              # random data: the whole file travels
    b.receive("db", "s1", [full])
    incremental = stream_bytes(a, "db", "s2", "s1")
    # One rewritten 8 KiB page in a 4 MiB file: the increment is about one block, not the file.
    assert len(incremental) < 64 * 1024, len(incremental)
    b.receive("db", "s2", [incremental[i:i + 5000] for i in range(0, len(incremental), 5000)])

    assert [s.name for s in b.list_snapshots("db")] == ["s1", "s2"]
    assert b.list_snapshots("db")[1].guid == a.list_snapshots("db")[1].guid
    b.clone("db", "s1", "check1")
    b.clone("db", "s2", "check2")
    assert tree(b.path("check1")) == s1_tree
    assert tree(b.path("check2")) == s2_tree


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_stream_refused_and_leaves_nothing(pair, damage):
    a, b = pair
    a.create_volume("db")
    populate(a.path("db"))
    a.snapshot("db", "s1")
    rewrite_page(a.path("db") / "base" / "16384" / "1259", 7)
    a.snapshot("db", "s2")
    b.receive("db", "s1", [stream_bytes(a, "db", "s1")])
    before = [(v.name, v.snapshots) for v in b.list_volumes()]
    stats_before = b.store_stats() if hasattr(b, "store_stats") else None

    data = bytearray(stream_bytes(a, "db", "s2", "s1"))
    if damage == "truncate":
        data = data[:len(data) - 100]
    else:
        data[len(data) // 2] ^= 0x40
    with pytest.raises(StorageError) as err:
        b.receive("db", "s2", [bytes(data)])
    assert err.value.code == "corrupt", err.value
    assert [(v.name, v.snapshots) for v in b.list_volumes()] == before
    if stats_before is not None:
        assert b.store_stats() == stats_before
    # A damaged full stream into a fresh name creates no volume either.
    with pytest.raises(StorageError):
        b.receive("other", "s1", [stream_bytes(a, "db", "s1")[:-3]])
    assert "other" not in [v.name for v in b.list_volumes()]


def test_clone_is_writable_and_independent(pair):
    a, _ = pair
    a.create_volume("db")
    populate(a.path("db"))
    a.snapshot("db", "s1")
    original = tree(a.path("db"))
    info = a.clone("db", "s1", "dev1")
    assert info.kind == "clone" and info.origin == ("db", "s1")
    assert tree(a.path("dev1")) == original
    (a.path("dev1") / "PG_VERSION").write_text("scribbled\n")
    rewrite_page(a.path("dev1") / "base" / "16384" / "1259", 3)
    assert tree(a.path("db")) == original
    a.clone("db", "s1", "dev2")
    assert tree(a.path("dev2")) == original
    assert {v.name: v.kind for v in a.list_volumes()} == {"db": "volume", "dev1": "clone", "dev2": "clone"}
    assert all(v.used_bytes > 0 for v in a.list_volumes())


def test_refresh_and_rollback(pair):
    a, _ = pair
    a.create_volume("db")
    live = a.path("db")
    populate(live)
    a.snapshot("db", "s1")
    s1_tree = tree(live)
    a.clone("db", "s1", "dev")
    rewrite_page(live / "base" / "16384" / "1259", 0)
    (live / "new-table").write_bytes(b"x" * 100)
    a.snapshot("db", "s2")
    s2_tree = tree(live)

    (a.path("dev") / "junk").write_text("developer's scratch")
    assert a.refresh_clone("dev", "s2").origin == ("db", "s2")
    assert tree(a.path("dev")) == s2_tree

    (live / "PG_VERSION").write_text("broken\n")
    (live / "new-table").unlink()
    a.rollback("db", "s1")
    assert tree(a.path("db")) == s1_tree
    a.rollback("db", "s2")
    assert tree(a.path("db")) == s2_tree


def test_destroy_with_dependants_refused_naming_them(pair):
    a, _ = pair
    a.create_volume("db")
    populate(a.path("db"))
    a.snapshot("db", "s1")
    a.clone("db", "s1", "dev1")

    with pytest.raises(StorageError) as err:
        a.destroy_snapshot("db", "s1")
    assert err.value.code == "has_dependants" and "dev1" in str(err.value)
    with pytest.raises(StorageError) as err:
        a.destroy_volume("db")
    assert err.value.code == "has_dependants" and "db@s1" in str(err.value)
    with pytest.raises(StorageError, match="destroy_clone"):
        a.destroy_volume("dev1")
    with pytest.raises(StorageError, match="not a clone"):
        a.destroy_clone("db")
    assert [s.name for s in a.list_snapshots("db")] == ["s1"]

    a.destroy_clone("dev1")
    a.destroy_snapshot("db", "s1")
    a.destroy_volume("db")
    assert a.list_volumes() == []


def test_bad_names_refused_and_change_nothing(pair):
    a, _ = pair
    a.create_volume("db")
    a.snapshot("db", "s1")
    for bad in ["../escape", "a/b", ".hidden", "nul\0", "", "x" * 200]:
        with pytest.raises(StorageError) as err:
            a.create_volume(bad)
        assert err.value.code == "invalid"
        with pytest.raises(StorageError):
            a.snapshot("db", bad)
        with pytest.raises(StorageError):
            a.clone("db", "s1", bad)
    assert [v.name for v in a.list_volumes()] == ["db"]
    assert [s.name for s in a.list_snapshots("db")] == ["s1"]
    with pytest.raises(StorageError) as err:
        a.snapshot("nosuch", "s1")
    assert err.value.code == "not_found"
    with pytest.raises(StorageError) as err:
        a.create_volume("db")
    assert err.value.code == "exists"


def test_incremental_needs_the_base_snapshot(pair):
    a, b = pair
    a.create_volume("db")
    populate(a.path("db"))
    a.snapshot("db", "s1")
    a.snapshot("db", "s2")
    with pytest.raises(StorageError) as err:
        b.receive("db", "s2", [stream_bytes(a, "db", "s2", "s1")])
    assert err.value.code == "not_found" and "s1" in str(err.value)
    assert b.list_volumes() == []


def test_capabilities_name_the_basics(pair):
    a, _ = pair
    assert {"volumes", "snapshots", "clones", "send", "receive", "incremental"} <= a.capabilities()
