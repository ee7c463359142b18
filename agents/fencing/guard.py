"""The fencing agent's own rule on top of the policy: a person's manual fence needs a second person.

For a cluster listed under ``approval:`` in the agent's settings, the ops that change a node's
power (declared with ``approval=`` naming the workflow that asks for them with approval:
fence.off, fence.on and fence.reboot; status and list are reads) are accepted from two kinds of
caller only:

- the cluster's own fencing identities (``approval.CLUSTER.fencers``), which is how Pacemaker asks
  through fence_vertebra: a cluster must fence a dead node at once, without waiting for people;
- a person for whom this agent's broker sends the request (``for=``): the broker sends a fence only
  as a step of a workflow (deploy/workflows/fence-node*.yaml), and runs a destructive step only
  after two approvers other than the requester (broker/constraints.py: separation of duty and the
  two-person rule). Another delegate (the operators' chat bot) relays a person's own command, which
  still needs approval.

Everyone else, mesh admins included, is refused with the command that asks for approval instead.
This is a decision like any other (one of the rules the agent walks, before the fenced-identity
guard and the policy), so the refusal is in the agent's audit log as a ``decided ... deny`` record
and nothing runs. Whether the caller may fence the node at all is still the policy's question: a
fencer of c1 passes this rule for c1's nodes only, and the policy (fencer-c1 on /cluster/c1/node/*)
limits it to them too.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from ..authz import Decision, Request
from ..ops import OpSpec
from .settings import FencingSettings

_NODE_PATH = re.compile(r"/cluster/([^/]+)/node/([^/]+)")


def clusters_of(resources: Sequence[str]) -> list[tuple[str, str]]:
    """The (cluster, node) pairs named by node paths among ``resources``."""
    return [(m.group(1), m.group(2)) for r in resources if (m := _NODE_PATH.fullmatch(r))]


class ApprovalGuard:
    """The rule that refuses a person's direct power op on a node of a cluster that requires approval
    (a rule of ``Agent.rules``: called with the request and the op, None when it has no objection)."""

    def __init__(self, settings: FencingSettings, broker: Callable[[], str | None]) -> None:
        self.settings = settings
        self.broker = broker

    def __call__(self, request: Request, spec: OpSpec) -> Decision | None:
        if not spec.approval:
            return None
        broker = self.broker()
        if broker and request.via.lower() == broker.lower():
            return None  # a workflow step: the broker's engine has had it approved
        caller = request.caller
        for cluster, node in clusters_of(request.resources):
            if self.settings.needs_approval(cluster) and not self.settings.is_fencer(cluster, caller):
                return Decision(
                    False,
                    f"{spec.name} of {node} in cluster {cluster} needs a second person's approval: ask for it"
                    f" with `vertebra call workflow.run --to broker workflow={spec.approval}"
                    f" param=cluster={cluster} param=node={node}`; two others approve it with workflow.approve",
                    f"cluster {cluster}: manual fences need approval")
        return None
