"""A replication update reads the source's catalog (which snapshot to send against) in a worker thread:
the driver's lock may be held by a long clone or snapshot, which the event loop must never wait for. Nor
does either side's replication state (actions, packages, transfers) commit on the event loop."""

from __future__ import annotations

import threading
from pathlib import Path

from agents.errors import Outcome
from test_replication import fill, sites


async def test_an_update_runs_no_catalog_statement_on_the_event_loop(mesh, tmp_path):
    s = await sites(mesh, tmp_path)
    live = (await s.a.ok("storage.volume.create", volume="db"))["path"]
    fill(Path(live))
    loop_thread, on_loop, state_statements = threading.get_ident(), [], []

    def trace(sql: str) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(sql)

    def trace_state(sql: str) -> None:
        state_statements.append(sql)
        trace(sql)

    s.src.driver.db.set_trace_callback(trace)
    for agent in (s.src, s.dst):
        agent.replication_state.store.call(lambda db: db.set_trace_callback(trace_state))
    for _ in range(2):  # a full update, then an incremental one (a base to choose among held snapshots)
        report = await s.a.client.call("storage.replicate", {"volume": "db", "target": str(s.dst.jid.bare)},
                                       to=[s.a.target], timeout=60)
        (res,) = report.results
        assert res.outcome is Outcome.OK, res.error
    assert on_loop == []
    # Both sides wrote their state (the source its action, the target its package and transfers).
    assert any(sql.startswith("UPDATE actions") for sql in state_statements)
    assert any("INTO transfers" in sql for sql in state_statements)
