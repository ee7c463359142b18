"""The fencing agent: powers off failed cluster nodes through real fence devices (see the fencing issue).

For now it serves only ``fencing.info``; its ops are declared on this class as they land."""

from __future__ import annotations

from ..agent import Agent, info_op


class FencingAgent(Agent):
    kind = "fencing"

    info = info_op("fencing")
