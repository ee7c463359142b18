"""Which relayed calls the ops room tells of: the ops whose declaration names the topic (announce)."""

from __future__ import annotations

from types import SimpleNamespace

from agents.describe import spec_of
from agents.errors import Outcome
from agents.kinds import catalogue
from agents.report import CallReport, TargetResult
from broker.room import OpsRoom

OPS = catalogue()


def told(name: str, outcome: Outcome) -> list[tuple[str, str]]:
    posted: list[tuple[str, str]] = []
    room = SimpleNamespace(coalescer=SimpleNamespace(post=lambda _key, line, topic="": posted.append((topic, line))))
    spec = spec_of(OPS[name].describe())  # as the bot knows it: from the op's description
    report = CallReport(name, [TargetResult("fence1@vertebra.test/agent", outcome, error=None if outcome is
                                            Outcome.OK else "it broke")])
    OpsRoom.relayed(room, "alice@vertebra.test", spec, report)  # type: ignore[arg-type]
    return posted


def test_fencing_power_ops_are_told_whatever_their_outcome():
    for name in ("fence.off", "fence.on", "fence.reboot", "fence.status"):
        assert OPS[name].announce == "fencing"
        posted = told(name, Outcome.OK)
        assert [t for t, _ in posted] == ["fencing"] and posted[0][1].startswith(f"fencing: {name} by alice@")
    assert told("fence.list", Outcome.FAILED) == [] and told("fencing.info", Outcome.OK) == []


def test_replication_ops_are_told_when_they_fail():
    posted = told("storage.replication.pause", Outcome.FAILED)
    assert posted == [("replication", "replication failed: storage.replication.pause by alice@vertebra.test:"
                                      " fence1: it broke")]
    assert told("storage.replication.pause", Outcome.OK) == []
    assert told("storage.replicate", Outcome.FAILED) == [] and told("storage.volume.create", Outcome.FAILED) == []
