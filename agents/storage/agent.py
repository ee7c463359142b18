"""The storage agent: provisions volumes, snapshots and clones and replicates them (see the storage issue).

For now it serves only ``storage.info``; its ops are declared on this class as they land."""

from __future__ import annotations

from ..agent import Agent, info_op


class StorageAgent(Agent):
    kind = "storage"

    info = info_op("storage")
