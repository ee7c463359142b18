"""The monitor agent: runs Nagios check plugins and serves their results (see the monitor issue).

For now it serves only ``monitor.info``; its ops are declared on this class as they land."""

from __future__ import annotations

from ..agent import Agent, info_op


class MonitorAgent(Agent):
    kind = "monitor"

    info = info_op("monitor")
