"""Op declarations: the one schema drives validation, key=value parsing and help."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest

from agents.errors import BadArguments
from agents.ops import OP_FEATURE_PREFIX, Arg, Field, Result, op, ops_of


class Kind:
    @op("demo.make", effect="destructive", deadline=12, resources=("/volume/{volume}",))
    async def make(self, call, volume: Annotated[str, Arg("volume name", pattern=r"[a-z]+")],
                   size: Annotated[int, Arg("size in MiB", min=1, max=1024)] = 64,
                   fast: bool = False, tags: list[str] = (), ratio: float | None = None,
                   mode: Literal["thin", "thick"] = "thin") -> None:
        """Make a volume.

        Longer description."""


SPEC = ops_of(Kind)["demo.make"]


def test_declaration_is_read_from_the_signature():
    assert SPEC.summary == "Make a volume." and SPEC.description == "Longer description."
    assert SPEC.destructive and SPEC.deadline == 12.0 and SPEC.feature == OP_FEATURE_PREFIX + "demo.make"
    assert [(p.name, p.kind, p.required) for p in SPEC.params] == [
        ("volume", "string", True), ("size", "integer", False), ("fast", "boolean", False),
        ("tags", "string", False), ("ratio", "number", False), ("mode", "string", False)]
    assert SPEC.param("tags").many and SPEC.param("mode").choices == ("thin", "thick")


def test_validate_converts_fills_defaults_and_names_what_is_wrong():
    assert SPEC.validate({"volume": "db"}) == {"volume": "db", "size": 64, "fast": False, "tags": [],
                                               "ratio": None, "mode": "thin"}
    assert SPEC.validate({"volume": "db", "tags": "x", "fast": "yes"})["tags"] == ["x"]
    for args, message in [({}, "missing required argument 'volume'"),
                          ({"volume": "DB"}, "'volume' must match"),
                          ({"volume": "db", "size": 0}, "'size' must be between 1 and 1024"),
                          ({"volume": "db", "size": 1.5}, "'size' expects integer"),
                          ({"volume": "db", "fast": "maybe"}, "'fast' expects boolean"),
                          ({"volume": "db", "mode": "fat"}, "must be one of thin, thick"),
                          ({"volume": "db", "size": True}, "'size' expects integer"),
                          ({"volume": "db", "color": 1}, "unknown argument 'color'")]:
        with pytest.raises(BadArguments, match=message):
            SPEC.validate(args)


def test_parse_pairs_takes_command_line_words():
    args = SPEC.parse_pairs(["volume=db", "size=128", "tags=a", "tags=b", "ratio=0.5"])
    assert args["size"] == 128 and args["tags"] == ["a", "b"] and args["ratio"] == 0.5
    with pytest.raises(BadArguments, match="expected key=value"):
        SPEC.parse_pairs(["volume"])
    with pytest.raises(BadArguments, match="given twice"):
        SPEC.parse_pairs(["volume=a", "volume=b"])


def test_help_and_description_come_from_the_same_declaration():
    text = SPEC.help_text()
    assert "demo.make - Make a volume." in text and "destructive" in text and "deadline 12s" in text
    assert "size=integer" in text and "size in MiB (default: 64)" in text and "acts on: /volume/{volume}" in text
    described = SPEC.describe()
    assert described["params"][0] == {"name": "volume", "type": "string", "many": False, "required": True,
                                      "default": None, "help": "volume name", "choices": None,
                                      "pattern": "[a-z]+", "min": None, "max": None, "secret": False}
    assert SPEC.resources_for({"volume": "db"}) == ["/volume/db"]


def test_bad_declarations_fail_at_import_time():
    with pytest.raises(ValueError, match="dotted lowercase"):
        op("Bad Name")
    with pytest.raises(TypeError, match="async def"):
        op("demo.sync")(lambda self, call: None)
    with pytest.raises(TypeError, match="unsupported type"):
        async def f(self, call, x: dict): ...
        op("demo.dict")(f)


def test_an_ops_effect_is_declared_once_and_shown_wherever_the_op_is_described():
    class Kinds:
        @op("demo.look", effect="read")
        async def look(self, call) -> None:
            """Look."""

        @op("demo.forgot")
        async def forgot(self, call) -> None:
            """An op whose author said nothing about its effect."""

    specs = ops_of(Kinds)
    look, forgot = specs["demo.look"], specs["demo.forgot"]
    assert (look.effect, look.changes_state, look.destructive) == ("read", False, False)
    # Unmarked fails closed: it counts as changing state, so a fenced node's identities may not run it.
    assert (forgot.effect, forgot.changes_state, forgot.destructive) == ("change", True, False)
    assert (SPEC.effect, SPEC.changes_state, SPEC.destructive) == ("destructive", True, True)
    assert look.describe()["effect"] == "read" and SPEC.describe()["effect"] == "destructive"
    assert "(read-only, deadline 30s)" in look.help_text() and "(changes state," in forgot.help_text()
    with pytest.raises(ValueError, match="effect must be one of read, change, destructive"):
        op("demo.x", effect="harmless")
    with pytest.raises(TypeError, match="effect='destructive'"):
        op("demo.x", destructive=True)


def test_every_installed_op_declares_what_it_does():
    from agents.kinds import catalogue

    ops = catalogue()
    by_effect: dict[str, set[str]] = {}
    for name, spec in ops.items():
        by_effect.setdefault(spec.effect, set()).add(name)
    assert {
        "fence.list", "fence.status", "fencing.info", "mesh.agents", "mesh.alerts", "mesh.discover",
        "mesh.fence.epochs", "mesh.fence.events", "mesh.info", "monitor.check", "monitor.info", "monitor.list",
        "storage.info", "storage.package.list", "storage.replication.list", "storage.snapshot.list",
        "storage.volume.list", "workflow.list", "workflow.status"} <= by_effect["read"]
    assert by_effect["destructive"] == {
        "fence.off", "fence.on", "fence.reboot", "policy.reload", "storage.clone.destroy",
        "storage.clone.refresh", "storage.clone.rollback", "storage.package.destroy",
        "storage.replication.destroy", "storage.snapshot.destroy", "storage.volume.destroy"}
    # What makes or alters something, but destroys nothing.
    assert {"storage.volume.create", "storage.snapshot.create", "storage.clone.create", "storage.replicate",
            "storage.package.commit", "storage.package.receive", "workflow.run", "workflow.approve",
            "fenced.install", "policy.install"} <= by_effect["change"]
    # Ops added later are held to their names: whatever lists or reports is a read, whatever
    # destroys, rolls back or switches power is destructive.
    for name, spec in ops.items():
        last = name.rsplit(".", 1)[1]
        if last in {"list", "status", "info", "epochs", "events", "alerts", "agents", "discover", "anchors"}:
            assert spec.effect == "read", name
        if last in {"destroy", "rollback", "refresh", "off", "on", "reboot"}:
            assert spec.effect == "destructive", name


def test_result_fields_and_the_volume_facts_are_checked_when_declared():
    declared = Result(Field("name", "volume"), Field("state", display="state"), summary="state")
    assert declared.describe() == {"fields": [{"name": "name", "label": "volume", "display": "text"},
                                              {"name": "state", "label": "", "display": "state"}],
                                   "summary": "state"}
    assert Result.from_description(declared.describe()) == declared and Result.from_description(None) is None

    @op("x.show", effect="read", result=declared)
    async def show(self, call):
        "Show things."

    assert "answers: volume, state" in show.__vertebra_op__.help_text().splitlines()
    with pytest.raises(ValueError, match="display must be one of"):
        Field("size", display="megabytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only a display='table' field has columns"):
        Field("rows", columns=(Field("a"),))
    with pytest.raises(ValueError, match="summary 'state' must be one of the declared fields"):
        Result(Field("name"), summary="state")
    with pytest.raises(ValueError, match="makes='/volume/{clone}' must be one of its resources"):
        op("x.make", resources=("/volume/{volume}",), makes="/volume/{clone}")
    with pytest.raises(ValueError, match="rereads is a resource path"):
        op("x.read", rereads="volume")
    with pytest.raises(ValueError, match="announce names an ops room topic"):
        op("x.tell", announce="Fencing!")
