"""The replication data plane between two local endpoints: a real embedded driver's send stream crosses a
real TCP connection into an inbox and is received by a second store; a cut connection resumes without
sending anything twice; tokens admit one connection; the throttle's rate can change mid-transfer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from agents.storage.driver import StorageError
from agents.storage.embedded import EmbeddedDriver
from agents.storage.transfer import Inbox, Throttle, send


def digests(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


def file_pieces(path: Path):
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


@pytest.fixture
async def sites(tmp_path):
    source, target = EmbeddedDriver(tmp_path / "a"), EmbeddedDriver(tmp_path / "b")
    source.create_volume("db")
    (source.path("db") / "table").write_bytes(os.urandom(3 << 20))
    (source.path("db") / "conf").write_text("max_connections = 10\n")
    source.snapshot("db", "s1")
    inbox = Inbox(tmp_path / "spool")
    await inbox.start()
    yield source, target, inbox
    await inbox.stop()
    source.close()
    target.close()


async def receive_and_compare(inbox, target, source, transfer, snap):
    spool = await inbox.completed(transfer)
    target.receive("db", snap, file_pieces(spool))
    inbox.discard(transfer)
    target.clone("db", snap, f"check-{snap}")
    assert digests(target.path(f"check-{snap}")) == digests(source.path("db"))


async def test_a_snapshot_crosses_the_connection_and_arrives_identical(sites):
    source, target, inbox = sites
    token = inbox.offer("t1")
    result = await send(inbox.host, inbox.port, "t1", token, lambda: source.send("db", "s1"))
    assert result.resumed_from == 0 and result.sent_bytes == result.total_bytes > 3 << 20
    await receive_and_compare(inbox, target, source, "t1", "s1")


async def test_a_cut_connection_resumes_and_sends_nothing_twice(sites):
    source, target, inbox = sites
    carried = 0

    async def cut_after_a_megabyte(n: int) -> None:
        nonlocal carried
        carried += n
        if carried >= 1 << 20:
            raise ConnectionResetError("cable pulled")

    with pytest.raises(ConnectionResetError):
        await send(inbox.host, inbox.port, "t2", inbox.offer("t2"), lambda: source.send("db", "s1"),
                   on_bytes=cut_after_a_megabyte)
    # A second attempt needs a new token; the inbox says what it holds and only the rest travels.
    again = await send(inbox.host, inbox.port, "t2", inbox.offer("t2"), lambda: source.send("db", "s1"))
    assert 0 < again.resumed_from <= carried < again.total_bytes
    assert again.sent_bytes == again.total_bytes - again.resumed_from
    await receive_and_compare(inbox, target, source, "t2", "s1")


async def test_a_stream_that_changed_since_the_cut_starts_over(sites):
    source, target, inbox = sites

    async def cut(n: int) -> None:
        raise ConnectionResetError("cut")

    with pytest.raises(ConnectionResetError):
        await send(inbox.host, inbox.port, "t3", inbox.offer("t3"), lambda: source.send("db", "s1"), on_bytes=cut)
    (source.path("db") / "conf").write_text("max_connections = 20\n")
    source.snapshot("db", "s2")
    # Same transfer id, different stream: the held prefix does not match, so the inbox starts over.
    again = await send(inbox.host, inbox.port, "t3", inbox.offer("t3"), lambda: source.send("db", "s2"))
    assert again.resumed_from == 0 and again.sent_bytes == again.total_bytes
    await receive_and_compare(inbox, target, source, "t3", "s2")


async def test_a_token_admits_one_connection_only(sites):
    source, target, inbox = sites
    token = inbox.offer("t4")
    await send(inbox.host, inbox.port, "t4", token, lambda: source.send("db", "s1"))
    with pytest.raises(StorageError, match="already used"):
        await send(inbox.host, inbox.port, "t4", token, lambda: source.send("db", "s1"))
    with pytest.raises(StorageError, match="token"):
        await send(inbox.host, inbox.port, "t4", "guessed", lambda: source.send("db", "s1"))


def test_the_throttle_paces_to_its_rate_and_a_new_rate_applies_at_once():
    now = [100.0]
    throttle = Throttle(1000, clock=lambda: now[0])
    assert throttle.delay_for(500) == 0.0                  # the first piece goes at once
    assert throttle.delay_for(500) == pytest.approx(0.5)   # the next waits for the first to drain
    throttle.set_rate(10_000)                               # raised mid-transfer: what is owed is forgiven
    assert throttle.delay_for(1000) == 0.0
    assert throttle.delay_for(1000) == pytest.approx(0.1)
    now[0] += 10
    throttle.set_rate(None)
    assert throttle.delay_for(10 << 20) == 0.0
    with pytest.raises(StorageError, match="positive"):
        throttle.set_rate(0)
