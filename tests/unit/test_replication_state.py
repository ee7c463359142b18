"""The storage agent's replication state (agents/storage/replication_state.py): its statements run on the
file's own thread, never the event loop's; a change is committed before it is read back; changes made at
once to one action each keep the other's; and files written by earlier versions still open."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from agents.storage.driver import StorageError
from agents.storage.replication_state import Action, Package, ReplicationState

# The schema as the first replication state wrote it: no schema version, no transfers table.
UNVERSIONED = """
CREATE TABLE IF NOT EXISTS actions(
    id TEXT PRIMARY KEY, volume TEXT NOT NULL, target TEXT NOT NULL, package TEXT NOT NULL,
    interval REAL NOT NULL, continuous INTEGER NOT NULL, tls INTEGER NOT NULL, rate REAL,
    paused INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0, last_snap TEXT, last_end REAL,
    pending TEXT, state TEXT NOT NULL DEFAULT 'idle', error TEXT, last TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS packages(
    name TEXT PRIMARY KEY, action TEXT NOT NULL, source TEXT NOT NULL, source_volume TEXT NOT NULL,
    created REAL NOT NULL);
"""
TRANSFERS = """
CREATE TABLE IF NOT EXISTS transfers(
    id TEXT PRIMARY KEY, package TEXT NOT NULL, snapshot TEXT NOT NULL, opened REAL NOT NULL);
"""


def action(action_id: str = "r0000abcd", package: str = "db.r0000abcd") -> Action:
    return Action(id=action_id, volume="db", target="storage2@example.test/agent", package=package, interval=0.0,
                  continuous=False, tls=True, rate=None, created=1000.0)


async def test_every_statement_runs_on_the_store_thread_and_reads_see_what_was_committed(tmp_path):
    path = tmp_path / "replication" / "replication.sqlite"
    state = ReplicationState(path)
    loop_thread, threads, statements = threading.get_ident(), set(), []

    def trace(sql: str) -> None:
        threads.add(threading.get_ident())
        statements.append(sql)

    state.store.call(lambda db: db.set_trace_callback(trace))
    try:
        await state.add_action(action())
        with pytest.raises(StorageError, match="already replicates into package"):
            await state.add_action(action("r0000ffff"))
        changed = await state.change_action("r0000abcd", seq=1, pending={"snap": "r0000abcd-000001", "base": None})
        assert changed.pending == {"snap": "r0000abcd-000001", "base": None}
        assert state.action("r0000abcd").seq == 1
        await state.add_package(Package("pkg", "r0000abcd", "storage1@example.test", "db", 1000.0))
        await state.add_transfer("t1", "pkg", "s1", 1000.0)
        await state.add_transfer("t2", "pkg", "s2", 1000.0)
        await state.drop_transfer("t1")
        assert state.transfers() == {"t2": ("pkg", "s2")}
        with pytest.raises(StorageError, match="no replication action"):
            await state.change_action("r9999abcd", paused=True)
        # Nothing the caller holds changes the state behind its back: reads are copies.
        state.action("r0000abcd").pending["snap"] = "elsewhere"  # type: ignore[index]
        assert state.action("r0000abcd").pending == {"snap": "r0000abcd-000001", "base": None}
    finally:
        await state.aclose()
    assert any(s.startswith("UPDATE actions") for s in statements)
    assert threads and loop_thread not in threads

    # All of it was committed: the file opened again holds the same.
    again = ReplicationState(path)
    try:
        assert again.action("r0000abcd").seq == 1
        assert again.action("r0000abcd").pending == {"snap": "r0000abcd-000001", "base": None}
        assert again.package("pkg") == Package("pkg", "r0000abcd", "storage1@example.test", "db", 1000.0)
        assert again.transfers() == {"t2": ("pkg", "s2")}
    finally:
        again.close()


async def test_changes_at_once_to_one_action_each_keep_the_other_and_a_cancelled_one_is_made(tmp_path):
    state = ReplicationState(tmp_path / "replication.sqlite")
    try:
        await state.add_action(action())
        # A throttle while the update records its progress: both changes stay.
        await asyncio.gather(state.change_action("r0000abcd", rate=5.0),
                             state.change_action("r0000abcd", state="running"),
                             state.change_action("r0000abcd", seq=3))
        a = state.action("r0000abcd")
        assert (a.rate, a.state, a.seq) == (5.0, "running", 3)
        # An update paused while its change waits for the store's thread: the change is made all the same.
        busy = threading.Event()
        state.store.submit(lambda db: busy.wait(10))
        writing = asyncio.ensure_future(state.change_action("r0000abcd", seq=4, pending={"snap": "s4"}))
        await asyncio.sleep(0)
        writing.cancel()
        busy.set()
        with pytest.raises(asyncio.CancelledError):
            await writing
        await state.change_action("r0000abcd", paused=True)     # after it in the store's order
        a = state.action("r0000abcd")
        assert (a.seq, a.pending, a.paused) == (4, {"snap": "s4"}, True)
    finally:
        state.close()


@pytest.mark.parametrize("version, tables", [(0, UNVERSIONED), (1, UNVERSIONED), (1, UNVERSIONED + TRANSFERS)],
                         ids=["unversioned", "version-1-without-transfers", "version-1"])
async def test_a_file_written_by_an_earlier_version_opens_with_what_it_held(tmp_path, version, tables):
    path = tmp_path / "replication.sqlite"
    old = sqlite3.connect(path)
    old.executescript(tables)
    old.execute("PRAGMA journal_mode = WAL")
    old.execute(f"PRAGMA user_version = {version}")
    old.execute("INSERT INTO actions(id, volume, target, package, interval, continuous, tls, rate, paused, seq,"
                " last_snap, pending, created) VALUES ('r0000abcd', 'db', 'storage2@example.test/agent', 'pkg',"
                " 60, 0, 1, NULL, 1, 7, 'r0000abcd-000006', '{\"snap\": \"r0000abcd-000007\"}', 1000)")
    old.execute("INSERT INTO packages VALUES ('pkg2', 'r0000eeee', 'storage3@example.test', 'www', 2000)")
    old.commit()
    old.close()

    state = ReplicationState(path)
    try:
        a = state.action("r0000abcd")
        assert (a.paused, a.seq, a.last_snap, a.pending, a.interval) == (
            True, 7, "r0000abcd-000006", {"snap": "r0000abcd-000007"}, 60.0)
        assert state.packages() == [Package("pkg2", "r0000eeee", "storage3@example.test", "www", 2000.0)]
        await state.add_transfer("t1", "pkg2", "s1", 3000.0)
        assert state.transfers() == {"t1": ("pkg2", "s1")}
        assert state.store.call(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == 2
    finally:
        await state.aclose()
