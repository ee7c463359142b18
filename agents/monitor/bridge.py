"""The passive bridge: scheduled results published over XMPP, written into Nagios' command file.

A monitor agent publishes each scheduled result as a ``<result xmlns="urn:vertebra:monitor:1"/>``
message (msgpack in base64, like op payloads) to the accounts in its ``publish_to``. A monitor
agent whose settings have a ``nagios:`` section runs a :class:`NagiosBridge`: it accepts results
only from the agents its ``hosts`` map names (the server stamps who sent a message), maps them to
Nagios host and service names, and appends ``[epoch] PROCESS_SERVICE_CHECK_RESULT;host;service;
code;output`` to the external command file, one writer at a time, newlines written as ``\\n``.
Results from agents or checks it was not told about are dropped, as Nagios would drop them.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import stat
import time
from typing import Any

from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from agents import protocol
from agents.monitor.ranges import State
from agents.monitor.settings import BridgeSettings

__all__ = ["NS", "ResultElement", "publish_result", "command_line", "CommandFile", "NagiosBridge"]

log = logging.getLogger(__name__)

NS = "urn:vertebra:monitor:1"
# Writes up to PIPE_BUF bytes to a FIFO are atomic; Nagios reads commands in lines of at most 8 KiB.
MAX_COMMAND = 4096


class ResultElement(ElementBase):
    name = "result"
    namespace = NS
    plugin_attrib = "vertebra_monitor_result"
    interfaces: set[str] = set()


register_stanza_plugin(Message, ResultElement)


def publish_result(actor: Any, to: str, payload: dict[str, Any]) -> None:
    """Send one scheduled result to ``to`` (a full JID) as a message; fire and forget."""
    msg = actor.xmpp.make_message(mto=to, mtype="normal")
    msg["vertebra_monitor_result"].xml.text = protocol.encode(payload)
    msg.send()


def command_line(host: str, service: str, state: State | int, output: str, when: float | None = None) -> str:
    """One ``PROCESS_SERVICE_CHECK_RESULT`` external command, newline-terminated, at most MAX_COMMAND
    bytes. Line ends in ``output`` become the two characters ``\\n``, as Nagios expects."""
    for name, value in (("host", host), ("service", service)):
        if not value or any(c in value for c in ";\n\r"):
            raise ValueError(f"Nagios {name} name {value!r} must be non-empty, without ';' or line ends")
    text = output.replace("\\", "\\\\").replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    head = f"[{int(when if when is not None else time.time())}] PROCESS_SERVICE_CHECK_RESULT;{host};{service};{int(State(state))};"
    room = MAX_COMMAND - len(head.encode()) - 1
    data = text.encode()
    if len(data) > room:
        data = data[:room].decode("utf-8", errors="ignore").encode()
        text = data.decode()
        if text.endswith("\\") and not text.endswith("\\\\"):
            text = text[:-1]  # never leave half an escape
    return head + text + "\n"


class CommandFile:
    """Nagios' external command file (a FIFO). One writer at a time: an in-process lock, and
    ``flock`` on the file so other programs that honour it do not interleave with us."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    async def write(self, line: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._write, line)

    def _write(self, line: str) -> None:
        # O_NONBLOCK: a FIFO nobody reads (Nagios down) fails at once instead of hanging the agent.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_APPEND)
        except OSError as exc:
            raise OSError(f"cannot open Nagios command file {self.path}: {exc.strerror}"
                          " (is Nagios running with check_external_commands=1?)") from None
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode) and not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.path} is neither a FIFO nor a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class NagiosBridge:
    """Receives published results on ``actor``'s connection and writes them into Nagios."""

    def __init__(self, actor: Any, settings: BridgeSettings, domain: str) -> None:
        self.settings = settings
        self.command_file = CommandFile(settings.command_file)
        # Accept both account names and bare JIDs in the map; compare on bare JIDs.
        self.hosts = {(k if "@" in k else f"{k}@{domain}").lower(): v for k, v in settings.hosts.items()}
        self.written = 0
        self.dropped = 0
        actor.xmpp.register_handler(Callback("vertebra monitor result", StanzaPath("message/vertebra_monitor_result"),
                                             self._on_result))

    def _on_result(self, msg: Message) -> None:
        asyncio.get_running_loop().create_task(self.receive(msg["from"].bare, msg["vertebra_monitor_result"].xml.text))

    async def receive(self, sender: str, text: str | None) -> bool:
        """Write one published result; False (and logged) when it is dropped."""
        host = self.hosts.get(sender.lower())
        if host is None:
            return self._drop(f"result from {sender}, which nagios.hosts does not name")
        try:
            payload = protocol.decode(text)
            check = str(payload["check"])
            service = self.settings.services.get(check, check)
            line = command_line(host, service, State.parse(payload["code"]), str(payload["output"]),
                                float(payload.get("at") or time.time()))
        except Exception as exc:  # a malformed message is the sender's problem, never ours
            return self._drop(f"unreadable result from {sender}: {exc}")
        try:
            await self.command_file.write(line)
        except OSError as exc:
            return self._drop(str(exc))
        self.written += 1
        return True

    def _drop(self, why: str) -> bool:
        self.dropped += 1
        log.warning("nagios bridge: dropped %s", why)
        return False
