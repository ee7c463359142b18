"""The policy compiled to casbin: the model, the policy lines, and a casbin-backed decision.

casbin holds the same rules the gate's index holds, with matching functions that are the safe
segment matchers of :mod:`rbac.paths` and :mod:`rbac.ops` (never ``keyMatch2`` or ``regexMatch``,
which accept ``..`` and read ``.`` as a wildcard). Every policy load asks casbin to decide the
policy's examples too and rejects the policy if casbin and the index disagree, so the fast path is
held to casbin's reading of the same lines. casbin's ``enforce()`` scans every line per call (far too
slow to sit in front of every op at 10,000 rules), which is why it is the referee and not the path.
"""

from __future__ import annotations

import logging
from typing import Sequence

import casbin

from .ops import check_op_pattern, is_op_name, match_op
from .paths import BadPath, check_path, check_pattern, match_pattern
from .policy import Policy, Verdict

MODEL = """
[request_definition]
r = sub, site, obj, act

[policy_definition]
p = sub, site, obj, act, eft, rule

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && siteMatch(r.site, p.site) && opMatch(r.act, p.act) && pathMatch(r.obj, p.obj, r.sub)
"""

ANY = "*"  # in site and obj columns: every site, every resource (and none)
NONE = ""  # the obj of a request for an op that names no resource
ROLE_PREFIX = "role:"  # keeps a role named like a JID from ever being read as one


def _site_match(requested: str, rule: str) -> bool:
    return rule == ANY or requested == rule


def _op_match(requested: str, rule: str) -> bool:
    return is_op_name(requested) and match_op(check_op_pattern(rule), requested)


def _path_match(requested: str, rule: str, caller: str) -> bool:
    if rule == ANY:
        return True
    return requested != NONE and match_pattern(check_pattern(rule), requested, caller)


def policy_lines(policy: Policy) -> tuple[list[list[str]], list[list[str]]]:
    """casbin ``p`` lines (one per role x op pattern x resource pattern) and ``g`` lines."""
    p: list[list[str]] = []
    for rule in policy.rules:
        objs = [ANY] if rule.on is None else ["/" + "/".join(s) for s in rule.on]
        for words in rule.ops:
            for obj in objs:
                p.append([ROLE_PREFIX + rule.role, rule.site or ANY, obj, ".".join(words), rule.effect,
                          rule.label])
    g = [[ROLE_PREFIX + child, ROLE_PREFIX + parent] for child, parents in policy.roles.items()
         for parent in parents]
    members: dict[str, set[str]] = {}
    for jid, roles in policy.members.items():
        members[jid] = set(roles)
    # Members are linked to every role they hold (closure included) so casbin's hierarchy limit
    # never decides; the direct links above keep the role graph visible to casbin tooling.
    g += [[jid, ROLE_PREFIX + role] for jid, roles in sorted(members.items()) for role in sorted(roles)]
    return p, g


def enforcer(policy: Policy) -> casbin.Enforcer:
    model = casbin.Model()
    model.load_model_from_text(MODEL)
    e = casbin.Enforcer(model)
    e.add_function("siteMatch", _site_match)
    e.add_function("opMatch", _op_match)
    e.add_function("pathMatch", _path_match)
    p, g = policy_lines(policy)
    if p:
        e.add_policies(p)
    if g:
        e.add_grouping_policies(g)
    logging.getLogger("casbin").setLevel(logging.WARNING)  # it logs every request at INFO
    return e


def casbin_decide(e: casbin.Enforcer, caller: str, op: str, resources: Sequence[str],
                  site: str | None = None) -> Verdict:
    """casbin's answer: allowed when every resource is allowed. Bad input is a deny."""
    if not is_op_name(op):
        return Verdict(False, "not an op name")
    try:
        for path in resources:
            check_path(path)
    except BadPath as exc:
        return Verdict(False, str(exc))
    for obj in (resources or [NONE]):
        allowed, explain = e.enforce_ex(caller, site or NONE, obj, op)
        if not allowed:
            return Verdict(False, explain[-1] if explain else "casbin: default deny")
    return Verdict(True, "casbin: allowed")
