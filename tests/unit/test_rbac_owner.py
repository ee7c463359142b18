"""The {caller} pattern segment: one rule lets every developer manage their own clones and
nobody else's, identically in the gate's index and in casbin."""

from __future__ import annotations

import pytest

from rbac import compile_policy
from rbac.casbin_model import casbin_decide, enforcer
from rbac.paths import BadPath, check_pattern, match_pattern

D = "@vertebra.test"
POLICY = f"""
roles:
  developer: {{}}
members:
  developer: [alice{D}, bob{D}]
grants:
  - {{role: developer, ops: [storage.clone.destroy, storage.snapshot.create], on: ["/volume/*/owner/{{caller}}"]}}
examples:
  - {{as: alice{D}, op: storage.clone.destroy, on: [/volume/c1/owner/alice{D}], expect: allow}}
  - {{as: bob{D}, op: storage.clone.destroy, on: [/volume/c1/owner/alice{D}], expect: deny}}
"""


@pytest.mark.parametrize("caller,path,expected", [
    ("alice" + D, "/volume/c1/owner/alice" + D, True),
    ("ALICE" + D, "/volume/c1/owner/alice" + D, True),     # bare JIDs compare without case
    ("bob" + D, "/volume/c1/owner/alice" + D, False),
    (None, "/volume/c1/owner/alice" + D, False),          # no caller: never matches
    ("alice" + D, "/volume/c1", False),                   # an unowned volume is not the caller's
])
def test_caller_segment_matches_only_the_caller(caller, path, expected):
    assert match_pattern(check_pattern("/volume/*/owner/{caller}"), path, caller) is expected


@pytest.mark.parametrize("bad", ["/volume/{callers}", "/volume/x{caller}", "/volume/{owner}"])
def test_other_braces_are_refused(bad):
    with pytest.raises(BadPath):
        check_pattern(bad)


def test_owner_rule_in_the_index_and_in_casbin():
    policy = compile_policy(POLICY)    # raises if the policy does not lint, examples included
    e = enforcer(policy)
    cases = [("alice" + D, ["/volume/c1/owner/alice" + D], True), ("bob" + D, ["/volume/c1/owner/alice" + D], False),
             ("bob" + D, ["/volume/prod"], False), ("bob" + D, ["/volume/c2/owner/bob" + D], True)]
    for caller, on, expected in cases:
        assert policy.evaluate(caller, "storage.clone.destroy", on).allowed is expected, (caller, on)
        assert casbin_decide(e, caller, "storage.clone.destroy", on).allowed is expected, (caller, on)
