"""A fencing agent's settings (the mesh file's `settings:` for a fencing agent): its devices, and
which cluster each node it can fence belongs to.

    settings:
      cluster: c1                        # every node below belongs to cluster c1, or:
      clusters: {c1: [node1, node2], c2: [db1]}
      fencing:                           # the device registry (see devices.py)
        devices: {...}
        levels: {node1: [[pdu1]], ...}
      identities:                        # who belongs to each node (fencing epochs: agents/fenced.py)
        node1: [db1@vertebra.test]
      approval:                          # clusters whose manual fences need a second person
        c1: {fencers: [fence-c1@vertebra.test]}   # its own fencing identities fence at once

``identities`` are the bare JIDs that run on a node: while the node is fenced, every agent refuses
their destructive ops. ``approval`` lists the clusters where a person's fence.off, fence.on or
fence.reboot sent straight to this agent is refused: it must come through the broker's workflow
engine, which runs it only after approvals by people other than the requester (see guard.py). The
cluster's own fencing identities (Pacemaker's, through fence_vertebra) are exempt: a cluster must be
able to fence a dead node at once, and the policy limits them to their own nodes.

The cluster is part of each node's resource path, ``/cluster/{cluster}/node/{node}``: that is what
the authorization hook sees for a fencing op and what the agent advertises, so a policy can limit a
cluster's own fencing identity to its own nodes. A node belongs to exactly one cluster; the agent
refuses an op that names a node with another cluster than the one configured here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agents.fencing.devices import DeviceRegistry, FencingConfigError
from agents.fencing.names import NODE_RESOURCE, is_segment, node_resource
from agents.schema import Fields

log = logging.getLogger(__name__)

__all__ = ["NODE_RESOURCE", "FencingSettings", "node_resource", "parse_settings"]

_KEYS = frozenset({"cluster", "clusters", "fencing", "identities", "approval"})
_JID = re.compile(r"[^@/\s]{1,1023}@[^@/\s]{1,1023}")


@dataclass(frozen=True)
class FencingSettings:
    """The registry (None when the agent has no devices yet) and each node's cluster."""

    registry: DeviceRegistry | None
    clusters: Mapping[str, str]  # node -> cluster
    identities: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # node -> bare JIDs on it
    approval: Mapping[str, frozenset[str]] = field(default_factory=dict)  # cluster -> its fencers

    def needs_approval(self, cluster: str) -> bool:
        return cluster in self.approval

    def is_fencer(self, cluster: str, caller: str) -> bool:
        """Whether ``caller`` is one of ``cluster``'s own fencing identities."""
        return caller.lower() in self.approval.get(cluster, frozenset())

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> FencingSettings:
        """Build and validate; FencingConfigError lists every problem at once."""
        problems: list[str] = []
        if not isinstance(settings, Mapping):
            raise FencingConfigError(["settings: expected a mapping"])
        for key in sorted(set(map(str, settings)) - _KEYS):
            problems.append(f"settings.{key}: unknown key (expected {', '.join(sorted(_KEYS))})")
        if "fencing" not in settings:
            if set(settings) & {"cluster", "clusters", "identities", "approval"}:
                problems.append("settings: a cluster is named but settings.fencing (devices and levels)"
                                " is missing")
            if problems:
                raise FencingConfigError(problems)
            return cls(registry=None, clusters={})
        try:
            registry = DeviceRegistry.from_config(settings["fencing"])
        except FencingConfigError as error:
            problems += error.problems
            registry = None
        nodes = registry.nodes() if registry else []
        for node in nodes:
            if not is_segment(node):
                problems.append(f"levels.{node}: a node name must be letters, digits and _ . : @ + -"
                                " (it becomes part of the resource path /cluster/CLUSTER/node/NODE)")
        clusters = _clusters(settings, nodes, problems)
        identities = _identities(settings.get("identities"), nodes, problems)
        approval = _approval(settings.get("approval"), set(clusters.values()), problems)
        if problems:
            raise FencingConfigError(problems)
        return cls(registry=registry, clusters=clusters, identities=identities, approval=approval)

    def resources(self) -> list[str]:
        """One resource path per node this agent can fence."""
        return [node_resource(cluster, node) for node, cluster in sorted(self.clusters.items())]

    def by_cluster(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node, cluster in sorted(self.clusters.items()):
            out.setdefault(cluster, []).append(node)
        return out


def parse_settings(raw: Any, where: Fields | None = None) -> FencingSettings:
    """Check a fencing agent's settings (its fence agent programs and secret files must be there); every
    problem is listed, at the line of the first when ``where`` places them in the mesh file."""
    try:
        return FencingSettings.from_settings({} if raw is None else raw)
    except FencingConfigError as exc:
        if where is None:
            raise
        raise where.error("", "; ".join(exc.problems), at=_problem_field(exc.problems[0])) from None


def _problem_field(problem: str) -> str:
    """Where in the settings a problem's text says it is: ``settings.cluster: ...`` is at ``cluster``,
    ``device pdu1: params.ip: ...`` at ``fencing.devices.pdu1.params.ip``, ``levels.n1 ...`` at
    ``fencing.levels.n1``."""
    head, _, rest = problem.partition(": ")
    if head.startswith("device "):
        sub = rest.partition(": ")[0] if ":" in rest else ""
        sub = sub if re.fullmatch(r"[A-Za-z0-9_.-]+", sub) else ""
        return ".".join(p for p in ("fencing.devices", head.removeprefix("device "), sub) if p)
    head = head.split(" ")[0]
    if head.startswith("levels"):
        return "fencing." + head
    return head.removeprefix("settings").removeprefix(".")


def configured_nodes(settings: Any) -> dict[str, tuple[str, ...]]:
    """The nodes a fencing agent's configured settings give it to fence, as resource paths, each with
    the bare JIDs that belong to it (``identities:``). Read from the settings alone, with the
    agent's own rules (below): the device checks (secret files readable) are the
    agent's machine's to make, not the broker's. Settings that do not validate cover no node."""
    if not isinstance(settings, Mapping):
        return {}
    fencing = settings.get("fencing")
    levels = fencing.get("levels") if isinstance(fencing, Mapping) else None
    nodes = sorted(map(str, levels)) if isinstance(levels, Mapping) else []
    problems: list[str] = []
    clusters = _clusters(settings, nodes, problems)
    identities = _identities(settings.get("identities"), nodes, problems)
    if problems:
        log.warning("fencing agent settings in the mesh file do not validate, so they cover no node: %s",
                    "; ".join(problems))
        return {}
    return {node_resource(cluster, node): identities.get(node, ()) for node, cluster in clusters.items()}


def _clusters(settings: Mapping[str, Any], nodes: list[str], problems: list[str]) -> dict[str, str]:
    single, many = settings.get("cluster"), settings.get("clusters")
    if single is not None and many is not None:
        problems.append("settings: give either cluster (one cluster for every node) or clusters"
                        " (cluster -> nodes), not both")
        return {}
    if single is not None:
        if not isinstance(single, str) or not is_segment(single):
            problems.append(f"settings.cluster: expected a cluster name (letters, digits and _ . : @ + -),"
                            f" got {single!r}")
            return {}
        return {node: single for node in nodes}
    if many is None:
        if nodes:
            problems.append("settings: name the cluster the nodes belong to: cluster: NAME, or"
                            " clusters: {NAME: [node, ...]}")
        return {}
    if not isinstance(many, Mapping) or not many:
        problems.append("settings.clusters: expected a mapping of cluster name to a list of nodes")
        return {}
    out: dict[str, str] = {}
    for cluster, members in many.items():
        where = f"settings.clusters.{cluster}"
        if not isinstance(cluster, str) or not is_segment(cluster):
            problems.append(f"{where}: a cluster name must be letters, digits and _ . : @ + -")
            continue
        if not isinstance(members, list) or not members:
            problems.append(f"{where}: expected a list of node names")
            continue
        for node in map(str, members):
            if node not in nodes:
                problems.append(f"{where}: node {node!r} has no fencing levels (configured: "
                                f"{', '.join(nodes) or 'none'})")
            elif node in out and out[node] != cluster:
                problems.append(f"{where}: node {node!r} is also in cluster {out[node]!r}; a node belongs"
                                " to one cluster")
            else:
                out[node] = cluster
    for node in nodes:
        if node not in out:
            problems.append(f"settings.clusters: node {node!r} is in no cluster; add it to one")
    return out


def _jids(value: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(j, str) and _JID.fullmatch(j) for j in value):
        problems.append(f"{where}: expected a list of bare JIDs such as db1@vertebra.test")
        return ()
    return tuple(j.lower() for j in value)


def _identities(raw: Any, nodes: list[str], problems: list[str]) -> dict[str, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append("settings.identities: expected a mapping of node to the bare JIDs running on it")
        return {}
    out = {}
    for node, jids in raw.items():
        where = f"settings.identities.{node}"
        if str(node) not in nodes:
            problems.append(f"{where}: no such node (this agent fences {', '.join(nodes) or 'none'})")
            continue
        out[str(node)] = _jids(jids, where, problems)
    return out


def _approval(raw: Any, clusters: set[str], problems: list[str]) -> dict[str, frozenset[str]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append("settings.approval: expected a mapping of cluster to {fencers: [JID, ...]}")
        return {}
    out = {}
    for cluster, spec in raw.items():
        where = f"settings.approval.{cluster}"
        if str(cluster) not in clusters:
            problems.append(f"{where}: no such cluster (this agent fences {', '.join(sorted(clusters)) or 'none'})")
            continue
        spec = {} if spec is None else spec
        if not isinstance(spec, Mapping) or set(map(str, spec)) - {"fencers"}:
            problems.append(f"{where}: expected {{fencers: [JID, ...]}} (the cluster's own fencing identities)")
            continue
        out[str(cluster)] = frozenset(_jids(spec.get("fencers", []), f"{where}.fencers", problems))
    return out
