"""How fencing names clusters and nodes: the one resource path segment a name must be, and a node's
resource path. Apart from the settings (and their device registry) so that fence_vertebra, which
needs only these, does not load them."""

#: A cluster or node name must be one resource path segment (see agents/resources.py).
SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,127}"
NODE_RESOURCE = "/cluster/{cluster}/node/{node}"


def node_resource(cluster: str, node: str) -> str:
    return NODE_RESOURCE.format(cluster=cluster, node=node)
