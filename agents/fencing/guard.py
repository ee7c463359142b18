"""The fencing agent's own rule on top of the policy: a person's manual fence needs a second person.

For a cluster listed under ``approval:`` in the agent's settings, fence.off, fence.on and
fence.reboot are accepted from two kinds of caller only:

- the cluster's own fencing identities (``approval.CLUSTER.fencers``), which is how Pacemaker asks
  through fence_vertebra: a cluster must fence a dead node at once, without waiting for people;
- a person for whom this agent's broker sends the request (``for=``): the broker sends a fence only
  as a step of a workflow (deploy/workflows/fence-node*.yaml), and runs a destructive step only
  after two approvers other than the requester (broker/constraints.py: separation of duty and the
  two-person rule). Another delegate (the operators' chat bot) relays a person's own command, which
  still needs approval.

Everyone else, mesh admins included, is refused with the command that asks for approval instead.
This is a decision like any other (it is wrapped around the agent's authorizer), so the refusal is
in the agent's audit log as a ``decided ... deny`` record and nothing runs. Whether the caller may
fence the node at all is still the policy's question: a fencer of c1 passes this rule for c1's
nodes only, and the policy (fencer-c1 on /cluster/c1/node/*) limits it to them too.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from ..authz import Authorizer, Decision, decide
from ..ops import OpSpec
from .settings import FencingSettings

#: The ops that change a node's power: what "a manual fence" means here (status and list are reads).
POWER_OPS = frozenset({"fence.off", "fence.on", "fence.reboot"})
#: The workflow (deploy/workflows/) that asks for each op with approval.
WORKFLOWS = {"fence.off": "fence-node", "fence.on": "fence-node-on", "fence.reboot": "fence-node-reboot"}
_NODE_PATH = re.compile(r"/cluster/([^/]+)/node/([^/]+)")


def clusters_of(resources: Sequence[str]) -> list[tuple[str, str]]:
    """The (cluster, node) pairs named by node paths among ``resources``."""
    return [(m.group(1), m.group(2)) for r in resources if (m := _NODE_PATH.fullmatch(r))]


class ApprovalGuard:
    """Refuses a person's direct power op on a node of a cluster that requires approval."""

    def __init__(self, inner: Authorizer, settings: FencingSettings, via: Callable[[], str],
                 broker: Callable[[], str | None]) -> None:
        self.inner = inner
        self.settings = settings
        self.via = via  # the delegate that sent the request being decided ("" when sent directly)
        self.broker = broker

    def refusal(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision | None:
        via = self.via()  # the runtime sets it for the request being decided (authz.current_via)
        if spec.name not in POWER_OPS:
            return None
        broker = self.broker()
        if broker and via.lower() == broker.lower():
            return None  # a workflow step: the broker's engine has had it approved
        for cluster, node in clusters_of(resources):
            if self.settings.needs_approval(cluster) and not self.settings.is_fencer(cluster, caller):
                return Decision(
                    False,
                    f"{spec.name} of {node} in cluster {cluster} needs a second person's approval: ask for it"
                    f" with `vertebra call workflow.run --to broker workflow={WORKFLOWS[spec.name]}"
                    f" param=cluster={cluster} param=node={node}`; two others approve it with workflow.approve",
                    f"cluster {cluster}: manual fences need approval")
        return None

    def decide(self, caller: str, spec: OpSpec, resources: Sequence[str]) -> Decision:
        return self.refusal(caller, spec, resources) or decide(self.inner, caller, spec, resources)
