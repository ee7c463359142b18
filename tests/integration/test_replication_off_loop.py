"""A replication update reads the source's catalog (which snapshot to send against) in a worker thread:
the driver's lock may be held by a long clone or snapshot, which the event loop must never wait for."""

from __future__ import annotations

import threading
from pathlib import Path

from agents.errors import Outcome
from test_replication import fill, sites


async def test_an_update_runs_no_catalog_statement_on_the_event_loop(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = (await s.a.ok("storage.volume.create", volume="db"))["path"]
    fill(Path(live))
    loop_thread, on_loop = threading.get_ident(), []
    s.src.driver.db.set_trace_callback(
        lambda sql: on_loop.append(sql) if threading.get_ident() == loop_thread else None)
    for _ in range(2):  # a full update, then an incremental one (a base to choose among held snapshots)
        report = await s.a.client.call("storage.replicate", {"volume": "db", "target": str(s.dst.jid.bare)},
                                       to=[s.a.target], timeout=60)
        (res,) = report.results
        assert res.outcome is Outcome.OK, res.error
    assert on_loop == []
