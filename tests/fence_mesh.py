"""Test helper: a fencing mesh as real processes (broker and a fencing agent serving the gateway)
over a state directory made by the `mesh_home` fixture, and a way to run fence_vertebra against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


from conftest import ROOT, running, vertebra  # noqa: F401 (running: the fence tests' mesh)


def dummy_device(status_file: Path, **params: str) -> dict[str, Any]:
    return {"agent": "fence_dummy",
            "params": {"type": "file", "status_file": str(status_file), "power_timeout": "2", **params}}


def fencing_settings(devices: dict[str, Any], levels: dict[str, Any], cluster: str = "c1") -> dict[str, Any]:
    return {"cluster": cluster, "fencing": {"devices": devices, "levels": levels}}


def fence_vertebra(stdin: str = "", *argv: str, env: dict[str, str] | None = None,
                   timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the real fence_vertebra program as Pacemaker would (stdin) or by options (argv)."""
    return subprocess.run(
        [sys.executable, "-m", "agents.fencing.fence_vertebra", *argv],
        input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def wrapper_program(path: Path) -> Path:
    """fence_vertebra as one executable file, for Pacemaker, which runs agents by file name."""
    path.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} "
                    "-m agents.fencing.fence_vertebra \"$@\"\n")
    path.chmod(0o755)
    return path


class FencingWorld:
    """In one process, on the test server: a broker with a state dir and a fencing agent for node1
    and node2 of cluster c1 (fence_dummy with status files), each on an account of its own that
    outlives stopping it, so a test can stop and start either as a restart would."""

    def __init__(self, mesh: Any, tmp_path: Path, identities: dict[str, list[str]] | None = None) -> None:
        self.mesh, self.tmp = mesh, tmp_path
        self.broker_account, self.fencer_account = mesh.account("broker"), mesh.account("fencing")
        self.broker_state, self.fencer_state = tmp_path / "broker-state", tmp_path / "fencer-state"
        self.broker_state.mkdir()
        self.fencer_state.mkdir()
        self.state = {n: tmp_path / f"{n}.state" for n in ("node1", "node2")}
        for f in self.state.values():
            f.write_text("on")
        self.settings = {
            "cluster": "c1",
            "fencing": {"devices": {"pdu1": dummy_device(self.state["node1"]),
                                    "pdu2": dummy_device(self.state["node2"])},
                        "levels": {"node1": [["pdu1"]], "node2": [["pdu2"]]}},
            "identities": identities or {}}
        self.broker: Any = None
        self.fencer: Any = None
        self.client: Any = None  # a test's own caller, when it wants one kept

    async def start_broker(self) -> Any:
        from broker.service import Broker
        jid, pw = self.broker_account
        broker = Broker(jid, pw, self.mesh.endpoint, authorizer=self.mesh.admins, state_dir=self.broker_state)
        # As the mesh file's agents: entry would, before it goes online: the fencing agent, with its settings.
        broker.admit(self.fencer_account[0], "fencing", ["/host/fencer"], self.settings)
        self.broker = await self.mesh.start(broker)
        return self.broker

    async def start_fencer(self) -> Any:
        from agents.fencing.agent import FencingAgent
        jid, pw = self.fencer_account
        self.fencer = await self.mesh.start(FencingAgent(
            jid, pw, self.mesh.endpoint, resources=["/host/fencer"], broker=self.broker_account[0],
            authorizer=self.mesh.admins, settings=self.settings, state_dir=self.fencer_state))
        return self.fencer

    async def stop(self, actor: Any) -> None:
        """Stop one of them (a crash or a restart, as far as the others can tell)."""
        await actor.stop()
        self.mesh.actors.remove(actor)

    def listed(self) -> bool:
        """Whether the broker lists the fencing agent."""
        return any(e.jid.startswith(self.fencer_account[0] + "/") for e in self.broker.directory.entries())
