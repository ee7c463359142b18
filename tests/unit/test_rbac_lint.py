"""Policy lint: every mistake casbin would swallow is an error naming its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rbac import PolicyRejected, check_file, compile_policy

ROOT = Path(__file__).resolve().parents[2]

GOOD = """\
roles:
  viewer: {}
  operator: {inherits: [viewer]}
members:
  operator: [alice@vertebra.test]
grants:
  - {role: viewer, ops: ["*.info"]}
  - {role: operator, ops: [sample.echo], on: ["/host/*"]}
denies:
  - {role: operator, ops: [sample.echo], on: [/host/prod]}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyRejected) as exc:
        compile_policy(textwrap.dedent(text))
    return [str(p) for p in exc.value.problems]


def test_good_policy_compiles():
    policy = compile_policy(GOOD)
    assert policy.members["alice@vertebra.test"] == {"operator", "viewer"}
    assert len(policy.rules) == 3


def test_misspelt_effect_section_is_an_error_naming_the_line():
    assert problems(GOOD.replace("denies:", "Deny:")) == [
        "line 9: unknown key 'Deny' in the policy (did you mean 'denies'?)"]


def test_unknown_key_in_a_rule():
    assert problems(GOOD.replace("ops: [sample.echo], on", "op: [sample.echo], on", 1)) == [
        "line 8: rule has no ops (use '**' for every op)",
        "line 8: unknown key 'op' in a rule of grants (did you mean 'ops'?)"]


def test_unknown_role_everywhere_it_can_be_named():
    found = problems(GOOD.replace("role: viewer", "role: veiwer").replace("inherits: [viewer]", "inherits: [admin]")
                     .replace("  operator: [alice", "  operater: [alice"))
    assert "line 3: role 'operator' inherits unknown role 'admin'" in found
    assert "line 5: members of unknown role 'operater' (did you mean 'operator'?)" in found
    assert "line 7: rule names unknown role 'veiwer' (did you mean 'viewer'?)" in found


def test_role_cycle_is_named():
    found = problems("""
        roles:
          a: {inherits: [b]}
          b: {inherits: [c]}
          c: {inherits: [a]}
        """)
    assert found == ["line 3: role cycle: a -> b -> c -> a"]


def test_inheritance_deeper_than_casbin_follows_is_refused():
    chain = "\n".join(f"  r{i}: {{inherits: [r{i + 1}]}}" for i in range(11)) + "\n  r11: {}\n"
    found = problems("roles:\n" + chain)
    assert any("levels deep" in p for p in found)


def test_bad_patterns_and_paths():
    found = problems("""
        roles: {r: {}}
        grants:
          - {role: r, ops: ["storage.[a-z]+"], on: ["/pool/../etc"]}
          - {role: r, ops: ["sample.echo"], on: ["/pool/*x"]}
        """)
    assert found[0].startswith("line 4: op pattern 'storage.[a-z]+'")
    assert found[1].startswith("line 4: resource pattern '/pool/../etc'")
    assert found[2].startswith("line 5: resource pattern '/pool/*x'")


def test_duplicates_are_errors():
    found = problems("""
        roles: {r: {}}
        roles: {s: {}}
        members:
          r: [a@x.test, a@x.test]
        grants:
          - {role: r, ops: [a.b, a.b]}
          - {role: r, ops: [a.b]}
        """)
    assert "line 3: duplicate key 'roles' (first at line 2)" in found
    assert "line 5: a@x.test is listed twice as a member of 'r'" in found
    assert "line 7: 'a.b' is listed twice in ops" in found
    assert "line 8: duplicate rule: same role, ops, resources and site as line 7" in found


def test_members_must_be_bare_lowercase_jids():
    found = problems("""
        roles: {r: {}}
        members:
          r: [Alice@x.test, bob@x.test/laptop, carol]
        """)
    assert len(found) == 3 and all(p.startswith("line 4: member") for p in found)


def test_unknown_site_and_bad_example_expectation():
    found = problems("""
        sites: [dc1]
        roles: {r: {}}
        grants:
          - {role: r, ops: [a.b], site: dc3}
        examples:
          - {as: a@x.test, op: a.b, expect: Allow}
        """)
    assert found == ["line 5: rule names unknown site 'dc3' (did you mean 'dc1'?)",
                     "line 7: example expect 'Allow' must be allow or deny (did you mean 'allow'?)"]


def test_yaml_syntax_error_names_the_line():
    found = problems("roles:\n  a: {inherits: [b}\n")
    assert found[0].startswith("line 2: not valid YAML")


def test_the_on_key_is_not_read_as_a_yaml_boolean():
    policy = compile_policy("roles: {r: {}}\ngrants:\n  - {role: r, ops: [a.b], on: [/x]}\n")
    assert policy.rules[0].on == (("x",),)


def test_check_file_runs_lint_and_examples(tmp_path):
    assert check_file(ROOT / "deploy" / "policy.example.yaml") == []
    bad = tmp_path / "p.yaml"
    bad.write_text(GOOD + "examples:\n  - {as: alice@vertebra.test, op: sample.echo, on: [/host/prod],"
                          " expect: allow}\n")
    (msg,) = check_file(bad)
    assert msg.startswith(f"{bad}: line 12: example expects allow but the policy denies")
    assert check_file(tmp_path / "missing.yaml")[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read")
