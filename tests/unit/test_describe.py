"""Op descriptions on the wire (agents.describe): every op's form reads back as its declaration."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import slixmpp
from sample_agent import SampleAgent
from slixmpp.plugins.xep_0004 import Form

from agents.describe import description_of, form_of, spec_of
from agents.kinds import catalogue
from agents.ops import ops_of

ROOT = Path(__file__).resolve().parents[2]
OPS = {**catalogue(), **ops_of(SampleAgent)}


@pytest.fixture(scope="module")
def xmpp() -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP("describer@vertebra.test/agent", "unused")
    for plugin in ("xep_0030", "xep_0004", "xep_0122"):
        client.register_plugin(plugin)
    return client


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_reads_back_from_its_form_as_declared(xmpp, name):
    spec = OPS[name]
    sent = Form(xml=ET.fromstring(str(form_of(xmpp, spec))))  # as it crosses the wire: text, parsed again
    described = description_of(sent)
    assert described == spec.describe()
    again = spec_of(described)
    assert again.help_text() == spec.help_text()
    assert again.feature == spec.feature and again.destructive == spec.destructive


def test_a_described_op_checks_arguments_as_the_declaration_does(xmpp):
    echo = spec_of(description_of(Form(xml=ET.fromstring(str(form_of(xmpp, OPS["sample.echo"]))))))
    assert echo.parse_pairs(["text=hi", "mode=upper"]) == OPS["sample.echo"].parse_pairs(["text=hi", "mode=upper"])
    with pytest.raises(Exception, match="must be one of plain, upper"):
        echo.parse_pairs(["text=hi", "mode=loud"])


def test_agents_never_import_the_broker():
    """`agents/` is the runtime every kind stands on; the broker is a kind registered by an entry point."""
    offenders = []
    for path in sorted((ROOT / "agents").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n == "broker" or n.startswith("broker.")]
    assert not offenders, "\n".join(offenders)


def test_result_fields_travel_with_the_description(xmpp):
    """What an op answers (its fields, their display, a table's columns, the summary field) is read back
    as declared, so the CLI and the chat bot render results without the kind's code."""
    spec = OPS["monitor.check"]
    again = spec_of(description_of(Form(xml=ET.fromstring(str(form_of(xmpp, spec))))))
    assert again.result == spec.result and again.result.summary == "state"
    metrics = next(f for f in again.result.fields if f.name == "metrics")
    assert metrics.display == "table" and [c.name for c in metrics.columns][:3] == ["label", "value", "uom"]
    assert spec_of(description_of(Form(xml=ET.fromstring(str(form_of(xmpp, OPS["sample.echo"])))))).result is None
