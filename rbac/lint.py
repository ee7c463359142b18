"""Read a YAML policy, find everything wrong with it (each problem naming its line), and compile it.

The file::

    sites: [dc1, dc2]                     # optional; rules may then say `site: dc1`
    roles:
      viewer: {}
      operator: {inherits: [viewer]}
    members:
      operator: [alice@example.org]       # bare JIDs, lowercase
    grants:
      - {role: viewer, ops: ["*.info"]}
      - {role: operator, ops: ["storage.**"], on: ["/pool/*"], site: dc1}
    denies:
      - {role: operator, ops: [storage.pool.destroy]}
    examples:                             # checked after every load; a failure rejects the load
      - {as: alice@example.org, op: storage.info, on: [/pool/tank], site: dc1, expect: allow}

Anything casbin would silently drop or misread is an error here: unknown keys (a misspelt
``Denies:`` would otherwise be a deny that never applies), unknown roles and sites, role cycles,
inheritance deeper than casbin's role manager follows, bad op and resource patterns, duplicates.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from . import source
from .ops import BadOpPattern, check_op_pattern, is_op_name
from .paths import BadPath, check_path, check_pattern
from .policy import ALLOW, DENY, Example, Policy, Rule, members_closure
from .source import LList, LMap, Problem

TOP_KEYS = {"sites", "roles", "members", "grants", "denies", "examples", "description"}
ROLE_KEYS = {"inherits", "description"}
RULE_KEYS = {"role", "ops", "on", "site", "name", "description"}
EXAMPLE_KEYS = {"as", "op", "on", "site", "expect", "description"}
EXPECT = {"allow": True, "deny": False}
MAX_INHERITANCE = 10  # casbin's default role manager stops following links after 10 levels

_ROLE = re.compile(r"[a-z][a-z0-9_-]{0,63}\Z", re.ASCII)
_SITE = _ROLE
# A bare JID as the server stamps it: lowercase local part, a domain, no resource.
_JID = re.compile(r"[a-z0-9._+-]{1,64}@[a-z0-9.-]{1,253}\Z", re.ASCII)


class PolicyRejected(ValueError):
    """A policy that may not be used; ``problems`` says every reason, each with its line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("policy rejected:\n" + "\n".join(f"  {p}" for p in self.problems))


def compile_policy(text: str) -> Policy:
    """Lint and compile policy text; raise PolicyRejected listing every problem with its line."""
    doc, problems = source.load(text)
    if doc is None and not problems:
        problems.append(Problem(0, "the policy is empty"))
    if problems and doc is None:
        raise PolicyRejected(problems)
    if not isinstance(doc, LMap):
        raise PolicyRejected(problems + [Problem(1, "a policy is a mapping with roles, members, grants, ...")])
    lint = _Lint(doc, problems)
    policy = lint.run(hashlib.sha256(text.encode()).hexdigest())
    if lint.problems:
        raise PolicyRejected(lint.problems)
    return policy


def check_file(path: str | Path) -> list[str]:
    """``vertebra policy check FILE``: every problem of a policy file (lint and examples), or []."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        return [f"{path}: cannot read: {exc}"]
    try:
        policy = compile_policy(text)
    except PolicyRejected as exc:
        return [f"{path}: {p}" for p in exc.problems]
    return [f"{path}: {p}" for p in failed_examples(policy)]


def failed_examples(policy: Policy) -> list[Problem]:
    """The policy's own examples that it does not decide as they expect."""
    out = []
    for ex in policy.examples:
        verdict = policy.evaluate(ex.caller, ex.op, ex.on, ex.site)
        if verdict.allowed != ex.expect:
            got = "allows" if verdict.allowed else "denies"
            out.append(Problem(ex.line, f"example expects {'allow' if ex.expect else 'deny'} but the policy"
                                        f" {got} {ex.caller} {ex.op} {' '.join(ex.on)} ({verdict.rule})"))
    return out


class _Lint:
    def __init__(self, doc: LMap, problems: list[Problem]) -> None:
        self.doc = doc
        self.problems = problems

    def err(self, line: int, message: str) -> None:
        self.problems.append(Problem(line, message))

    def keys(self, m: LMap, allowed: set[str], what: str) -> None:
        for key in m:
            if key not in allowed:
                hint = _closest(str(key), allowed)
                advice = f" (did you mean {hint!r}?)" if hint else f"; expected one of {', '.join(sorted(allowed))}"
                self.err(m.at(key), f"unknown key {key!r} in {what}{advice}")

    def words(self, value: Any, line: int, what: str) -> list[tuple[Any, int]]:
        """A scalar or a list of scalars, each with its line."""
        if isinstance(value, LList):
            return [(v, value.at(i)) for i, v in enumerate(value)]
        if value is None or isinstance(value, LMap):
            self.err(line, f"{what} must be a word or a list of words")
            return []
        return [(value, line)]

    def run(self, digest: str) -> Policy:
        doc = self.doc
        self.keys(doc, TOP_KEYS, "the policy")
        sites = self.sites()
        inherits = self.roles()
        direct = self.members(set(inherits))
        rules = self.rules(GRANTS, set(inherits), sites) + self.rules(DENIES, set(inherits), sites)
        self.cycles(inherits)
        members = {} if self.problems else members_closure(direct, inherits)
        policy = Policy(roles=inherits, members=members, rules=tuple(rules), sites=frozenset(sites),
                        examples=tuple(self.examples(sites)), digest=digest)
        return policy

    def sites(self) -> set[str]:
        raw = self.doc.get("sites")
        if raw is None:
            return set()
        out: set[str] = set()
        for name, line in self.words(raw, self.doc.at("sites"), "sites"):
            if not isinstance(name, str) or not _SITE.match(name):
                self.err(line, f"site {name!r} must be a lowercase word")
            elif name in out:
                self.err(line, f"site {name!r} is listed twice")
            out.add(name)
        return out

    def roles(self) -> dict[str, tuple[str, ...]]:
        raw = self.doc.get("roles")
        if not isinstance(raw, LMap):
            self.err(self.doc.at("roles") if "roles" in self.doc else 1, "the policy needs a `roles:` mapping")
            return {}
        out: dict[str, tuple[str, ...]] = {}
        self._role_lines = dict(raw.lines)
        for name, body in raw.items():
            line = raw.at(name)
            if not isinstance(name, str) or not _ROLE.match(name):
                self.err(line, f"role name {name!r} must be a lowercase word")
                continue
            parents: list[str] = []
            if body is not None:
                if not isinstance(body, LMap):
                    self.err(line, f"role {name!r} must be a mapping (e.g. `{{inherits: [viewer]}}`) or empty")
                else:
                    self.keys(body, ROLE_KEYS, f"role {name!r}")
                    if "inherits" in body:
                        for parent, pline in self.words(body["inherits"], body.at("inherits"), "inherits"):
                            if parent in parents:
                                self.err(pline, f"role {name!r} inherits {parent!r} twice")
                            parents.append(parent)
            out[name] = tuple(parents)
        for name, inherited in out.items():
            for parent in inherited:
                if parent not in out:
                    self.err(raw.at(name), f"role {name!r} inherits unknown role {parent!r}"
                                           + _did_you_mean(parent, out))
        return out

    def cycles(self, inherits: dict[str, tuple[str, ...]]) -> None:
        depth: dict[str, int] = {}
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(role: str, trail: list[str]) -> int:
            if state.get(role) == 1:
                cycle = trail[trail.index(role):] + [role]
                self.err(self._role_lines.get(role, 0), "role cycle: " + " -> ".join(cycle))
                return 0
            if state.get(role) == 2:
                return depth[role]
            state[role] = 1
            d = 1 + max((visit(p, trail + [role]) for p in inherits.get(role, ()) if p in inherits), default=0)
            state[role], depth[role] = 2, d
            if d > MAX_INHERITANCE:
                self.err(self._role_lines.get(role, 0), f"role {role!r} inherits {d - 1} levels deep; at most"
                                                        f" {MAX_INHERITANCE - 1} are followed")
            return d

        for role in inherits:
            visit(role, [])

    def members(self, roles: set[str]) -> dict[str, list[str]]:
        raw = self.doc.get("members")
        if raw is None:
            return {}
        if not isinstance(raw, LMap):
            self.err(self.doc.at("members"), "members must map each role to a list of bare JIDs")
            return {}
        out: dict[str, list[str]] = {}
        for role, jids in raw.items():
            if role not in roles:
                self.err(raw.at(role), f"members of unknown role {role!r}" + _did_you_mean(str(role), roles))
                continue
            seen: list[str] = []
            for jid, line in self.words(jids, raw.at(role), f"members of {role!r}"):
                if not isinstance(jid, str) or not _JID.match(jid):
                    self.err(line, f"member {jid!r} of {role!r} must be a bare JID in lowercase, such as"
                                   " nagios@example.org (no /resource)")
                elif jid in seen:
                    self.err(line, f"{jid} is listed twice as a member of {role!r}")
                else:
                    seen.append(jid)
            out[role] = seen
        return out

    def rules(self, section: str, roles: set[str], sites: set[str]) -> list[Rule]:
        raw = self.doc.get(section)
        if raw is None:
            return []
        if not isinstance(raw, LList):
            self.err(self.doc.at(section), f"{section} must be a list of rules")
            return []
        effect = ALLOW if section == GRANTS else DENY
        out: list[Rule] = []
        seen: dict[tuple[Any, ...], int] = {}
        for i, entry in enumerate(raw):
            line = raw.at(i)
            if not isinstance(entry, LMap):
                self.err(line, f"each of {section} is a mapping with role, ops and optionally on, site")
                continue
            line = entry.line
            self.keys(entry, RULE_KEYS, f"a rule of {section}")
            role = entry.get("role")
            if role not in roles:
                self.err(entry.at("role"), f"rule names unknown role {role!r}" + _did_you_mean(str(role), roles)
                         if "role" in entry else "rule has no role")
            if "ops" not in entry:
                self.err(line, "rule has no ops (use '**' for every op)")
            ops = self._patterns(entry, "ops", check_op_pattern, BadOpPattern)
            on = self._patterns(entry, "on", check_pattern, BadPath) if "on" in entry else None
            site = entry.get("site")
            if site is not None and site not in sites:
                self.err(entry.at("site"), f"rule names unknown site {site!r}"
                                           + (_did_you_mean(str(site), sites) if sites else "; declare it in sites:"))
            key = (role, tuple(sorted(set(ops))), tuple(sorted(set(on))) if on is not None else None, site)
            if key in seen:
                self.err(line, f"duplicate rule: same role, ops, resources and site as line {seen[key]}")
            seen[key] = line
            name = entry.get("name")
            desc = f"{role}: {' '.join('.'.join(o) for o in ops)}"
            if on is not None:
                desc += " on " + " ".join("/" + "/".join(s) for s in on)
            if site is not None:
                desc += f" at {site}"
            label = f"{'deny' if effect == DENY else 'grant'} line {line}" + (f" {name!r}" if name else "") \
                + f" ({desc})"
            out.append(Rule(effect, str(role), tuple(ops), tuple(on) if on is not None else None, site, line,
                            label))
        return out

    def _patterns(self, entry: LMap, key: str, check: Callable[[str], tuple[str, ...]],
                  bad: type[Exception]) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        if key not in entry:
            return out
        for value, line in self.words(entry.get(key), entry.at(key), key):
            try:
                words = check(value)
            except bad as exc:
                self.err(line, str(exc))
                continue
            if words in out:
                self.err(line, f"{value!r} is listed twice in {key}")
            out.append(words)
        if not out and isinstance(entry[key], LList) and not entry[key]:
            self.err(entry.at(key), f"{key} is empty")
        return out

    def examples(self, sites: set[str]) -> list[Example]:
        raw = self.doc.get("examples")
        if raw is None:
            return []
        if not isinstance(raw, LList):
            self.err(self.doc.at("examples"), "examples must be a list")
            return []
        out = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, LMap):
                self.err(raw.at(i), "each example is a mapping with as, op, on, expect")
                continue
            self.keys(entry, EXAMPLE_KEYS, "an example")
            caller, op, expect = entry.get("as"), entry.get("op"), entry.get("expect")
            if not isinstance(caller, str):
                self.err(entry.line, "example has no `as:` (the caller's bare JID)")
            if not is_op_name(op):
                self.err(entry.at("op"), f"example op {op!r} is not an op name")
            if expect not in EXPECT:
                self.err(entry.at("expect"), f"example expect {expect!r} must be allow or deny"
                                             + _did_you_mean(str(expect), set(EXPECT)))
            paths: list[str] = []
            if "on" in entry:
                for path, line in self.words(entry["on"], entry.at("on"), "on"):
                    try:
                        paths.append(check_path(path))
                    except BadPath as exc:
                        self.err(line, str(exc))
            site = entry.get("site")
            if site is not None and site not in sites:
                self.err(entry.at("site"), f"example names unknown site {site!r}")
            if isinstance(caller, str) and expect in EXPECT:
                out.append(Example(caller, str(op), tuple(paths), site, EXPECT[expect], entry.line))
        return out


GRANTS, DENIES = "grants", "denies"


def _closest(word: str, choices: Iterable[str]) -> str | None:
    import difflib
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    found = difflib.get_close_matches(word.lower(), sorted(lowered), n=1, cutoff=0.6)
    return lowered[found[0]] if found else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    hint = _closest(word, choices)
    return f" (did you mean {hint!r}?)" if hint else ""
