"""agents.db: every SQLite file opened one way (private, WAL, busy timeout, schema versions), and
statements run on the store's own thread, never the event loop's."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import threading

import pytest

from agents import db as dbmod
from agents.db import SchemaTooNew, Store, open_db, private_file

V1 = """
CREATE TABLE IF NOT EXISTS items (name TEXT PRIMARY KEY, note TEXT NOT NULL DEFAULT 'a;b');
CREATE TRIGGER IF NOT EXISTS items_no_delete BEFORE DELETE ON items
    BEGIN SELECT RAISE(ABORT, 'items are kept; forever'); END;
"""
V2 = "ALTER TABLE items ADD COLUMN size INTEGER NOT NULL DEFAULT 0;"


def test_a_new_file_is_private_in_wal_and_at_the_last_version(tmp_path):
    path = tmp_path / "state" / "store.sqlite"
    db = open_db(path, [V1, V2], synchronous="FULL")
    try:
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == int(dbmod.BUSY_TIMEOUT * 1000)
        db.execute("INSERT INTO items (name, size) VALUES ('x', 3)")
        assert db.execute("SELECT note, size FROM items").fetchone() == ("a;b", 3)
        with pytest.raises(sqlite3.DatabaseError, match="items are kept; forever"):
            db.execute("DELETE FROM items")
    finally:
        db.close()


def test_memory_databases_are_never_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (None, ":memory:"):
        db = open_db(path, [V1])
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        db.close()
    assert list(tmp_path.iterdir()) == []


def test_migrations_run_once_and_only_those_missing(tmp_path):
    path = tmp_path / "store.sqlite"
    open_db(path, [V1]).close()
    db = open_db(path, [V1, V2])  # V2's ALTER TABLE would fail if run twice
    db.close()
    db = open_db(path, [V1, V2])
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_a_file_from_before_versions_takes_the_first_migration_as_its_schema(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(V1 + "INSERT INTO items (name) VALUES ('kept');")
    old.close()
    db = open_db(path, [V1, V2])
    assert db.execute("SELECT name, size FROM items").fetchall() == [("kept", 0)]
    db.close()


def test_a_file_from_a_newer_vertebra_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "new.sqlite"
    open_db(path, [V1, V2]).close()
    with pytest.raises(SchemaTooNew, match="schema version 2, but this Vertebra knows only up to 1"):
        open_db(path, [V1])


def test_a_failed_migration_leaves_the_file_at_its_last_good_version(tmp_path):
    path = tmp_path / "store.sqlite"
    open_db(path, [V1]).close()
    with pytest.raises(sqlite3.OperationalError):
        open_db(path, [V1, "ALTER TABLE items ADD COLUMN size INTEGER; ALTER TABLE nosuch ADD COLUMN x;"])
    db = open_db(path, [V1])
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [r[1] for r in db.execute("PRAGMA table_info(items)")] == ["name", "note"]
    db.close()


async def test_a_store_runs_statements_on_its_own_thread_in_order(tmp_path):
    store = Store(tmp_path / "store.sqlite", [V1], name="test")
    try:
        loop_thread = threading.get_ident()
        writes = [store.submit(lambda db, i=i: db.execute("INSERT INTO items (name) VALUES (?)", (f"n{i}",)))
                  for i in range(20)]
        names, thread = await store.run(lambda db: ([r[0] for r in db.execute("SELECT name FROM items ORDER BY"
                                                                             " rowid")], threading.get_ident()))
        assert all(w.done() for w in writes)
        assert names == [f"n{i}" for i in range(20)]
        assert thread != loop_thread
    finally:
        await store.aclose()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.submit(lambda db: None)


async def test_a_write_queued_behind_a_slow_one_is_made_even_if_its_caller_is_cancelled(tmp_path):
    store = Store(tmp_path / "store.sqlite", [V1], name="test")
    release = threading.Event()
    try:
        slow = store.submit(lambda db: release.wait(10))
        writing = asyncio.ensure_future(store.run(lambda db: db.execute("INSERT INTO items (name) VALUES ('kept')")))
        await asyncio.sleep(0)                     # the write is queued behind the slow one
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
        release.set()
        slow.result(10)
        names = await store.run(lambda db: [r[0] for r in db.execute("SELECT name FROM items")])
        assert names == ["kept"]
    finally:
        release.set()
        await store.aclose()


def _open_and_close(path):
    try:
        open_db(path, ["CREATE TABLE IF NOT EXISTS t (x)"], synchronous="FULL").close()
        return "ok"
    except Exception as error:  # the test reports what each process met
        return f"{type(error).__name__}: {error}"


def test_processes_opening_a_new_file_at_once_all_get_it(tmp_path):
    # Two broker instances start together and open the same new shared file: switching it to WAL
    # takes a lock SQLite's busy handler does not wait for; without a retry some got "locked".
    with multiprocessing.get_context("fork").Pool(6) as pool:
        for round_ in range(15):
            path = tmp_path / f"shared{round_}.sqlite"
            assert pool.map(_open_and_close, [path] * 6) == ["ok"] * 6


def test_a_shared_sticky_directory_is_never_tightened(tmp_path):
    """A database or log put straight into /tmp must not make /tmp 0700: every other user (nagios
    running plugins there) would be locked out."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    private_file(shared / "audit.db")
    assert shared.stat().st_mode & 0o7777 == 0o1777
    assert (shared / "audit.db").stat().st_mode & 0o777 == 0o600
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    private_file(own / "audit.db")
    assert own.stat().st_mode & 0o777 == 0o700
