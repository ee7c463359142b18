"""How fencing names clusters, nodes and the Fence Agent API's actions, keys and exit codes: the one
resource path segment a name must be, a node's resource path, and the plain constants of the API
(``fence_api`` builds its rules on them). Apart from the settings and from ``fence_api`` so that
fence_vertebra, which needs only these on its lean path, does not load them (``fence_api`` costs a
fence_vertebra start about 15 ms, half of it)."""

from agents.plain_names import is_key as is_key
from rbac.segments import is_segment as is_segment

# A cluster or node name must be one resource path segment: op declarations advertise
# rbac.segments.PATTERN, ``is_segment`` checks it without ``re``.
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


class StdinError(ValueError):
    """A fence agent's stdin the API does not allow; the message names the line and what to write."""


def read_stdin(text: str) -> dict[str, str]:
    """The Fence Agent API's stdin: one `key=value` per line, `#` comments and blank lines skipped.
    Keys are normalised to underscores (`status-file` and `status_file` are one key, as in
    fencing.py) and one pair of surrounding double quotes is removed from a value. A line without
    `=`, spaces around `=`, a bad key, or a key given twice with different values raises StdinError."""
    pairs: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise StdinError(f"stdin line {number}: expected key=value, got {line!r}")
        key, value = line.split("=", 1)
        if key != key.rstrip() or value != value.lstrip():
            raise StdinError(f"stdin line {number}: no spaces are allowed around '=' in the Fence Agent API "
                             f"(write {key.strip()}=...)")
        if not is_key(key):
            raise StdinError(f"stdin line {number}: {key!r} is not a valid parameter name")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        key = key.replace("-", "_")
        if key in pairs and pairs[key] != value:
            raise StdinError(f"stdin line {number}: {key} is given twice with different values "
                             f"({_shown(key, pairs[key])} and {_shown(key, value)}); give it once")
        pairs[key] = value
    return pairs


def _shown(key: str, value: str) -> str:
    # Errors may be logged: never echo what could be a password.
    return "<hidden>" if "passw" in key.lower() or "secret" in key.lower() else repr(value)
