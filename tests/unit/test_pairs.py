"""key=value words, one parser for the CLI, chat, check_vertebra's check arguments and workflow parameters."""

from __future__ import annotations

import pytest

from agents.errors import BadArguments
from agents.pairs import parse_pairs


def test_pairs_become_a_map_and_keys_of_lists_gather_values():
    assert parse_pairs(["a=1", "b=x=y", "c="], "op") == {"a": "1", "b": "x=y", "c": ""}
    assert parse_pairs(["dev=alice", "n=1", "dev=bob"], "op", many={"dev"}) == {"dev": ["alice", "bob"], "n": "1"}


@pytest.mark.parametrize("words, message, argument", [
    (["a"], "op.x: expected key=value, got 'a'", None),
    (["=1"], "op.x: expected key=value, got '=1'", None),
    (["a=1", "a=2"], "op.x: argument 'a' given twice", "a"),
])
def test_malformed_or_repeated_words_are_refused_naming_the_subject(words, message, argument):
    with pytest.raises(BadArguments) as err:
        parse_pairs(words, "op.x")
    assert str(err.value) == message and err.value.details.get("argument") == argument


def test_every_caller_uses_it():
    from agents.monitor.agent import parse_pairs as check_arguments
    from broker.workflow_spec import parse
    from broker.workflows import _pairs

    with pytest.raises(BadArguments, match="monitor.check: check argument 'w' given twice") as err:
        check_arguments(["w=1", "w=2"])
    assert err.value.details["argument"] == "args"
    wf = parse({"name": "wf", "params": {"devs": {"list": True}}, "steps": [{"name": "s", "op": "x.y"}]})
    assert _pairs(wf, ["devs=a", "devs=b"]) == {"devs": ["a", "b"]}
    with pytest.raises(BadArguments, match="workflow wf: expected key=value"):
        _pairs(wf, ["devs"])
