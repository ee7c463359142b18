"""How every SQLite file of Vertebra is opened, versioned and written without blocking the event loop.

:func:`open_db` is the one way to open one: the file is private to this user (0600 in a 0700
directory: the audit log, the request log and the fencing outbox name who asked for what), in WAL
mode with the synchronous level the store asks for, with a short busy timeout, and its schema is
brought to the current version by the store's list of migrations, each applied once in its own
transaction and counted in ``PRAGMA user_version``. A file written by a newer Vertebra (a higher
version than the store knows) is refused with a sentence saying so, instead of being misread.

:class:`Store` puts one such connection behind one thread of its own: every statement on it runs on
that thread, in the order submitted, so async code awaits :meth:`Store.run` (or hands a write over with
:meth:`Store.submit`) and never waits for the disk on the event loop. One writer per store also keeps
a store's transactions from interleaving within the process; the busy timeout covers the other
processes that share a file (a broker's instances share their state directory).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

#: Seconds a statement waits for another process's write lock before failing. Short: a store's writer
#: thread is the only one waiting (never the event loop), and a lock held longer than this means
#: something is wrong with the other process, which an error says sooner than a hang.
BUSY_TIMEOUT = 5.0
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def private_file(path: str | Path) -> Path:
    """Make ``path`` private to this user before anything writes into it: create it 0600 if it is
    missing, tighten it (and its directory, to 0700) if it is not. For the audit log, its key, the
    request log, the fencing outbox and log files: each names who asked for what."""
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        _tighten(path, 0o600)
    # SQLite's -wal and -shm files take the database's mode when it makes them; ones left by an
    # earlier run keep theirs.
    for extra in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if extra.exists():
            _tighten(extra, 0o600)
    return path


def private_dir(path: str | Path) -> Path:
    """A directory only this user may enter (0700): made so, or tightened if it is not."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o1000:  # sticky: shared by everyone, as /tmp; 0700 would lock them all out
        return path
    _tighten(path, 0o700)
    return path


def _tighten(path: Path, mode: int) -> None:
    try:
        if path.stat().st_mode & 0o777 & ~mode:
            os.chmod(path, mode)
    except PermissionError:  # not ours (a shared directory): the files in it still are private
        pass
    except FileNotFoundError:  # a -wal file the last other connection removed as it closed
        pass


class SchemaTooNew(sqlite3.DatabaseError):
    """The file was written by a newer Vertebra than this one."""


def open_db(path: str | Path | None, migrations: Sequence[str], *, synchronous: str = "NORMAL",
            busy_timeout: float = BUSY_TIMEOUT, private: bool = True,
            isolation_level: Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"] | None = None,
            row_factory: Callable[[sqlite3.Cursor, tuple[Any, ...]], Any] | None = None) -> sqlite3.Connection:
    """Open the SQLite file at ``path`` (None: a database in memory) in autocommit mode, WAL, with
    ``synchronous`` (``FULL`` where a commit must survive a power cut, not only a crash), and bring
    its schema up to ``len(migrations)``: migration *i* (0-based) takes the file from version *i* to
    *i + 1*. The connection may be used from another thread than the opening one (a :class:`Store`'s).
    ``isolation_level`` other than None gives Python's implicit transactions (committed by the caller)."""
    if path is not None and str(path) == ":memory:":
        path = None
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
    target = ":memory:" if path is None else str(private_file(path) if private else path)
    db = sqlite3.connect(target, isolation_level=None, timeout=busy_timeout, check_same_thread=False)
    try:
        if row_factory is not None:
            db.row_factory = row_factory
        if path is not None:
            _enter_wal(db, busy_timeout)
            db.execute(f"PRAGMA synchronous={synchronous}")
        migrate(db, migrations, str(path or ":memory:"))
        db.isolation_level = isolation_level
    except BaseException:
        db.close()
        raise
    return db


def _enter_wal(db: sqlite3.Connection, busy_timeout: float) -> None:
    """Put the file in WAL mode. Switching the journal mode takes a lock for which SQLite does not
    call the busy handler, so two processes opening a new file at once (a second broker instance)
    can get "database is locked" at once; retry until the busy timeout, as the handler would."""
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def open_read_only(path: str | Path) -> sqlite3.Connection:
    """Open an existing SQLite file for reading only (``vertebra audit verify`` and the like), leaving
    its mode, journal and schema as they are; raises FileNotFoundError naming it when it is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no database at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on ``db`` (opened by :func:`open_db`, so in autocommit mode): ``BEGIN
    IMMEDIATE`` takes the write lock at once (a reader upgrading later could fail with busy), then
    ``COMMIT``, or ``ROLLBACK`` on any error, which propagates."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection, migrations: Sequence[str], what: str = "the database") -> int:
    """Apply the migrations ``db`` has not had yet, each in one transaction with its version number;
    returns the version it is at. Another process migrating the same file at once waits for the lock
    and then finds the work done."""
    for target in range(1, len(migrations) + 1):
        with transaction(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise SchemaTooNew(f"{what} has schema version {version}, but this Vertebra knows only up to"
                                   f" {len(migrations)}: it was written by a newer Vertebra; run that one, or"
                                   " restore the file from before the upgrade")
            if version < target:
                for statement in _statements(migrations[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise SchemaTooNew(f"{what} has schema version {version}, but this Vertebra knows only up to"
                           f" {len(migrations)}: it was written by a newer Vertebra; run that one, or restore"
                           " the file from before the upgrade")
    return int(version)


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one (``executescript`` would commit the transaction
    a migration runs in). A semicolon inside a string or a trigger's body does not end one."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending.strip()[:80]!r}")


class Store:
    """One SQLite file behind one thread: every statement on ``db`` runs there, in submission order.

    ``run`` is for async code (it awaits the thread), ``submit`` hands work over without waiting (its
    future says how it went), ``call`` waits in the calling thread and is for code that has no event
    loop to give back to (start-up, shutdown, the command line, tests). Each function given is called
    with the connection first."""

    def __init__(self, path: str | Path | None, migrations: Sequence[str], *, name: str,
                 synchronous: str = "NORMAL", busy_timeout: float = BUSY_TIMEOUT, private: bool = True,
                 row_factory: Callable[[sqlite3.Cursor, tuple[Any, ...]], Any] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite {name}")
        try:
            self.db = self._thread.submit(open_db, path, migrations, synchronous=synchronous,
                                          busy_timeout=busy_timeout, private=private,
                                          row_factory=row_factory).result()
        except BaseException:
            self._thread.shutdown(wait=False)
            raise
        self._closed = False

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(db, *args)`` on the store's thread after everything submitted before it."""
        if self._closed:
            raise sqlite3.ProgrammingError(f"the store {self.path or ':memory:'} is closed")
        return self._thread.submit(fn, self.db, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(db, *args)`` on the store's thread, awaited: the event loop goes on meanwhile. A caller
        cancelled while it waits (a request whose deadline passed, a paused update) does not take the
        work back: it runs all the same, as a change is either made or refused, never lost because
        its caller stopped listening. Its error, if any, is still retrieved so nothing is logged as
        never seen."""
        done = asyncio.wrap_future(self.submit(fn, *args))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(done)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(db, *args)`` on the store's thread, waited for here (not from a running event loop)."""
        return self.submit(fn, *args).result()

    async def aclose(self) -> None:
        """:meth:`close`, awaited: the event loop goes on while the last writes finish."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Finish what was submitted, close the connection and end the thread."""
        if self._closed:
            return
        try:
            self.call(lambda db: db.close())
        finally:
            self._closed = True
            self._thread.shutdown(wait=True)
