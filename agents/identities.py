"""Who a call is from: the mesh file's people and services, their password files, and the gateway's
rule for a local caller it knows only by Unix uid.

The mesh file names identities besides its actors (``people:``, ``services:``; agents/config.py
``Identity``). Each has an account ``NAME@domain`` with a random password in a 0600 file, created when
the server starts and managed with ``vertebra account``. A service may name a ``unix_user``: the local
user whose programs call as that identity. The gateway (agents/gateway.py) reads a caller's uid from
its socket (SO_PEERCRED) and asks :class:`Callers` who that is:

- root and the gateway's own user are trusted as today: a frame's JID and password, or ``"as": NAME``
  (any identity or account of the mesh file, whose password file the gateway reads itself), or the
  operator when the frame names nobody;
- a uid the mesh file maps calls as its identity only, with no password of its own;
- any other uid is refused, with a sentence saying how to map it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # the gateway's clients import nothing of this; annotations are strings here
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from .config import MeshConfig


class CallerRefused(Exception):
    """The gateway will not call for this caller; the message says why and what to do."""


def replace_password(path: Path, password: str) -> None:
    """Write ``password`` to ``path`` (mode 0600) at once: a reader sees the old file or the new one."""
    from .server import write_private

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, password)


def user_name(uid: int) -> str:
    """The local user name of ``uid`` (the number itself when the user database has none)."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Callers:
    """The gateway's rule for who a local caller is (see the module's docstring), for one mesh file."""

    def __init__(self, mesh: MeshConfig) -> None:
        self.mesh = mesh
        self.trusted = {0, os.getuid()}

    def credentials(self, uid: int, frame: dict[str, Any]) -> tuple[str, str]:
        """The JID and password to call as for the caller ``uid`` that sent ``frame``; CallerRefused
        with a sentence when it may not call, or not as the identity it named."""
        mesh = self.mesh
        named = frame.get("as")
        if uid in self.trusted:
            if named is not None:
                name = str(named)
                if name not in mesh.accounts:
                    raise CallerRefused(f"the gateway calls only as an account of its mesh file {mesh.path}, and"
                                        f" {name!r} is none; add it under people: or services: there first")
                return mesh.jid(name), self._password(name)
            if frame.get("jid") is not None:
                if frame.get("password") is None:
                    raise CallerRefused(f"a call as {frame['jid']} must present its password, or name a person or"
                                        " service of the mesh file with \"as\" instead")
                return str(frame["jid"]), str(frame["password"])
            return mesh.jid(mesh.operator), self._password(mesh.operator)
        user = user_name(uid)
        identity = mesh.identity_of_user(user)
        if identity is None:
            raise CallerRefused(f"the gateway refuses Unix user {user} (uid {uid}): the mesh file {mesh.path}"
                                f" maps no identity to it; add one under people: or services: with"
                                f" unix_user: {user} (and restart the gateway's agent)")
        jid = mesh.jid(identity.name)
        asked = str(named) if named is not None else str(frame["jid"]).split("/")[0] if frame.get("jid") else None
        if asked is not None and asked not in (identity.name, jid):
            raise CallerRefused(f"Unix user {user} calls through the gateway as {jid} only, not as {asked}:"
                                " leave out the account to call as (or name its own)")
        return jid, self._password(identity.name)

    def _password(self, name: str) -> str:
        from .config import ConfigError

        try:
            return self.mesh.password(name)
        except (ConfigError, OSError) as exc:
            raise CallerRefused(f"the gateway cannot read the password of {self.mesh.jid(name)}: {exc}") from None
