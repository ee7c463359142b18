"""How fencing names clusters, nodes and the Fence Agent API's actions, keys and exit codes: the one
resource path segment a name must be, a node's resource path, and the plain constants of the API
(``fence_api`` builds its rules on them). Apart from the settings and from ``fence_api`` so that
fence_vertebra, which needs only these on its lean path, does not load them (``fence_api`` costs a
fence_vertebra start about 15 ms, half of it)."""

#: A cluster or node name must be one resource path segment (see agents/resources.py).
SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}"
NODE_RESOURCE = "/cluster/{cluster}/node/{node}"


#: The Fence Agent API's actions, and those that act on one target, so need a node named.
ACTIONS: tuple[str, ...] = ("off", "on", "reboot", "status", "list", "monitor", "metadata", "validate-all")
TARGET_ACTIONS: frozenset[str] = frozenset({"off", "on", "reboot", "status"})

# The target may be named by any of these keys; Pacemaker 2.1.5 sends `port`, newer ones `plug`,
# and always `nodename` (the cluster's name for the node, which a host map may translate into a
# different plug). Order is precedence: an explicit plug beats the cluster node name.
NODE_KEYS: tuple[str, ...] = ("plug", "port", "nodename")

# Exit codes as callers of a fence agent read them (``fence_api.ExitCode`` names them): 0 done (status:
# on), 1 failed (status: unreachable or unknown), 2 status: off.
EXIT_SUCCESS, EXIT_FAILURE, EXIT_STATUS_OFF = 0, 1, 2
STATUS_EXIT = {"on": EXIT_SUCCESS, "off": EXIT_STATUS_OFF}  # what status exits with; anything else 1


def node_resource(cluster: str, node: str) -> str:
    return NODE_RESOURCE.format(cluster=cluster, node=node)
