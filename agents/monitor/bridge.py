"""The passive bridge: scheduled results published over XMPP, written into Nagios.

A monitor agent publishes each scheduled result as a ``<result xmlns="urn:vertebra:monitor:1"/>``
message (msgpack in base64, like op payloads) to the accounts in its ``publish_to``. A monitor
agent whose settings have a ``nagios:`` section runs a :class:`NagiosBridge`: it accepts results
only from the agents its ``hosts`` map names (the server stamps who sent a message), maps them to
Nagios host and service names, and hands them to Nagios one of two ways, as its settings say:

- ``command_file``: appends ``[epoch] PROCESS_SERVICE_CHECK_RESULT;host;service;code;output`` to
  the external command file, one writer at a time, newlines written as ``\\n``;
- ``check_result_path``: writes a check result file into Nagios' spool directory, as Nagios 4
  reads it (``### Passive Check Result File ###``, ``file_time=``, then the result's fields),
  named ``cXXXXXX`` and complete before Nagios may see it: written under a name Nagios ignores,
  renamed onto a name reserved with O_EXCL, and only then marked ready by ``cXXXXXX.ok``.

Results from agents or checks it was not told about are dropped, as Nagios would drop them.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import stat
import time
from typing import Any, ClassVar

from slixmpp import Message
from slixmpp.xmlstream import ElementBase, StanzaBase, register_stanza_plugin
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from agents import protocol
from agents.monitor.ranges import State
from agents.monitor.settings import BridgeSettings

__all__ = ["NS", "ResultElement", "publish_result", "command_line", "CommandFile", "check_result_file",
           "CheckResultSpool", "NagiosBridge"]

log = logging.getLogger(__name__)

NS = "urn:vertebra:monitor:1"
# Writes up to PIPE_BUF bytes to a FIFO are atomic; Nagios reads commands in lines of at most 8 KiB.
MAX_COMMAND = 4096
MAX_OUTPUT = 8192  # Nagios 4 keeps at most this much of a plugin's output (MAX_PLUGIN_OUTPUT_LENGTH)


class ResultElement(ElementBase):
    name = "result"
    namespace = NS
    plugin_attrib = "vertebra_monitor_result"
    interfaces: ClassVar[set[str]] = set()


register_stanza_plugin(Message, ResultElement)


def publish_result(actor: Any, to: str, payload: dict[str, Any]) -> None:
    """Send one scheduled result to ``to`` (a full JID) as a message; fire and forget."""
    msg = actor.xmpp.make_message(mto=to, mtype="normal")
    msg["vertebra_monitor_result"].xml.text = protocol.encode(payload)
    msg.send()


def command_line(host: str, service: str, state: State | int, output: str, when: float | None = None) -> str:
    """One ``PROCESS_SERVICE_CHECK_RESULT`` external command, newline-terminated, at most MAX_COMMAND
    bytes. Line ends in ``output`` become the two characters ``\\n``, as Nagios expects."""
    _check_names(host, service)
    stamp = int(when if when is not None else time.time())
    head = f"[{stamp}] PROCESS_SERVICE_CHECK_RESULT;{host};{service};{int(State(state))};"
    return head + _escaped(output, MAX_COMMAND - len(head.encode()) - 1) + "\n"


def _check_names(host: str, service: str) -> None:
    for name, value in (("host", host), ("service", service)):
        if not value or any(c in value for c in ";\n\r"):
            raise ValueError(f"Nagios {name} name {value!r} must be non-empty, without ';' or line ends")


def _escaped(output: str, room: int) -> str:
    """``output`` on one line as Nagios reads it back (``\\`` and ``\n`` escaped), at most ``room``
    bytes of UTF-8, never ending in half a character or half an escape."""
    text = output.replace("\\", "\\\\").replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    data = text.encode()
    if len(data) > room:
        text = data[:room].decode("utf-8", errors="ignore")
        if (len(text) - len(text.rstrip("\\"))) % 2:
            text = text[:-1]  # never leave half an escape
    return text


def _timestamp(t: float) -> str:
    # Nagios writes and reads these as "%ld.%ld": seconds, then microseconds as a plain integer.
    seconds = int(t)
    return f"{seconds}.{min(999999, int(round((t - seconds) * 1e6)))}"


def check_result_file(host: str, service: str, state: State | int, output: str, *, start: float, finish: float,
                      latency: float = 0.0, when: float | None = None) -> str:
    """The text of a Nagios 4 check result file holding one passive service result, as Nagios'
    own ``write_check_result`` writes it and ``process_check_result_file`` reads it."""
    _check_names(host, service)
    return (f"### Passive Check Result File ###\n"
            f"file_time={int(when if when is not None else time.time())}\n\n"
            f"### Nagios Service Check Result ###\n"
            f"host_name={host}\n"
            f"service_description={service}\n"
            "check_type=1\ncheck_options=0\nscheduled_check=0\nreschedule_check=0\n"
            f"latency={max(0.0, latency):f}\n"
            f"start_time={_timestamp(start)}\n"
            f"finish_time={_timestamp(max(start, finish))}\n"
            "early_timeout=0\nexited_ok=1\n"
            f"return_code={int(State(state))}\n"
            f"output={_escaped(output, MAX_OUTPUT)}\n")


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


class CheckResultSpool:
    """Nagios' check result directory (``check_result_path``): one file per result, each complete
    before Nagios can see it. Nagios reads only files named ``c`` plus six characters that have an
    ``.ok`` file beside them, so the result is written under a longer name it ignores, renamed
    onto a ``cXXXXXX`` name this writer reserved with O_EXCL (never over anyone else's file), and
    then the ``.ok`` file is made. Nagios deletes both once it has read them."""

    NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    MODE = 0o644  # Nagios, often another user, must read it

    def __init__(self, path: str) -> None:
        self.path = path
        self._random = random.Random()

    async def write(self, text: str) -> str:
        return await asyncio.to_thread(self._write, text)

    def _write(self, text: str) -> str:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        tmp = os.path.join(self.path, f".vertebra-{os.getpid()}-{self._name(12)}.tmp")
        try:
            fd = os.open(tmp, flags, self.MODE)
        except OSError as exc:
            raise OSError(f"cannot write into Nagios' check result directory {self.path}: {exc.strerror}"
                          " (is it check_result_path in nagios.cfg, and writable by this agent?)") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            final = self._reserve(flags)
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(os.open(final + ".ok", flags, self.MODE))
        return final

    def _reserve(self, flags: int) -> str:
        for _ in range(100):
            final = os.path.join(self.path, "c" + self._name(6))
            try:
                os.close(os.open(final, flags, self.MODE))
            except FileExistsError:
                continue
            return final
        raise OSError(f"no free check result file name in {self.path}")

    def _name(self, size: int) -> str:
        return "".join(self._random.choice(self.NAME_CHARS) for _ in range(size))


class NagiosBridge:
    """Receives published results on ``actor``'s connection and writes them into Nagios."""

    def __init__(self, actor: Any, settings: BridgeSettings, domain: str) -> None:
        self.settings = settings
        self.command_file = CommandFile(settings.command_file) if settings.command_file else None
        self.spool = CheckResultSpool(settings.check_result_path) if settings.check_result_path else None
        # Accept both account names and bare JIDs in the map; compare on bare JIDs.
        self.hosts = {(k if "@" in k else f"{k}@{domain}").lower(): v for k, v in settings.hosts.items()}
        self.written = 0
        self.dropped = 0
        actor.xmpp.register_handler(Callback("vertebra monitor result", StanzaPath("message/vertebra_monitor_result"),
                                             self._on_result))

    def _on_result(self, msg: StanzaBase) -> None:  # a message: the handler's path matches no other stanza
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
            state, output = State.parse(payload["code"]), str(payload["output"])
            now = time.time()
            at = float(payload.get("at") or now)  # when the plugin finished
            if self.spool is not None:
                started = at - max(0.0, float(payload.get("duration") or 0.0))
                # Latency as Nagios counts it for a passive result: from the check to its arrival.
                text = check_result_file(host, service, state, output, start=started, finish=at, latency=now - at,
                                         when=now)
            else:
                text = command_line(host, service, state, output, at)
        except Exception as exc:  # a malformed message is the sender's problem, never ours
            return self._drop(f"unreadable result from {sender}: {exc}")
        try:
            if self.spool is not None:
                await self.spool.write(text)
            else:
                assert self.command_file is not None
                await self.command_file.write(text)
        except OSError as exc:
            return self._drop(str(exc))
        self.written += 1
        return True

    def _drop(self, why: str) -> bool:
        self.dropped += 1
        log.warning("nagios bridge: dropped %s", why)
        return False
