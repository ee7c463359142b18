"""The fast path of short programs: who to call the local gateway as, without parsing the mesh file.

Nagios starts ``check_vertebra`` for every check and Pacemaker starts ``fence_vertebra`` for every
fencing action, so their start is most of what they cost. When a gateway runs, they skip argparse,
asyncio and the YAML parser: they call ``agents.gateway.call_via_gateway_blocking`` over the Unix
socket, and take what that call needs from the mesh file (domain, operator, password files, policy)
from a small cache, ``HOME/run/PROGRAM.cache``. This module is that cache, shared by both programs.

The cache is keyed by the mesh file's exact bytes, its path, the state directory and the mesh-file
parser's own file (``agents/config.py``), so an edited mesh file or parser is always parsed again.
It is used only when it is the caller's own file and nobody else may write it; it is
written (atomically, mode 0600) only into a run directory that is the caller's and nobody else may
write into. The password
itself is never cached: it is read every time. Each program has its own cache file (the name is the
caller's): they may be run by different users or with different mesh files, and neither should
keep replacing the other's entry.

This module must stay cheap to import: os and, only when the cache is read or written,
agents.lean_msgpack (the msgpack library's import would cost the start ~5 ms).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing itself costs a short program milliseconds; annotations are strings here
if TYPE_CHECKING:
    from typing import Any

CACHE_VERSION = 1
MAX_CACHED_MESH = 256 * 1024


def identity(mesh_path: str, home: str, account: str | None,
             cache_name: str) -> tuple[str, str] | tuple[None, None] | None:
    """The caller's JID and password for ``account`` (default: the mesh file's operator), from the
    cache ``HOME/run/cache_name`` or, when it does not match, the mesh file. ``(None, None)`` when this
    user may not read the mesh file or the password (a service's Unix user, such as nagios): the gateway
    then knows the caller by its uid, and the request carries no password; so also, without reading
    anything, for a user who is neither root nor the gateway's own (the socket's owner), whom the gateway
    knows only by uid whatever the request says (agents/identities.py). None when the mesh file
    does not load, a policy file it names is missing or the password is missing: the caller's
    full path then says what is wrong, as loading the mesh does."""
    uid = os.getuid()
    if uid != 0:
        try:
            if os.stat(os.path.join(home, "run", "gateway.sock")).st_uid != uid:
                return None, None
        except OSError:
            pass
    if not os.path.isabs(mesh_path):
        mesh_path = os.path.join(os.getcwd(), mesh_path)
    try:
        with open(mesh_path, "rb") as f:
            data = f.read(MAX_CACHED_MESH + 1)
    except PermissionError:
        return None, None
    except OSError:
        return None
    cache = os.path.join(home, "run", cache_name)
    key = {"v": CACHE_VERSION, "parser": parser_stamp(), "mesh": mesh_path, "home": home, "bytes": data}
    entry = read_cache(cache, key)
    if entry is None:
        from agents import config as meshconf

        try:
            mesh = meshconf.load(mesh_path, home)
        except (meshconf.ConfigError, OSError):
            return None
        entry = {"domain": mesh.server.domain, "operator": mesh.operator,
                 "passwords": {name: str(path) for name, path in mesh.password_files.items()},
                 "policy": str(mesh.policy) if mesh.policy is not None else None}
        if len(data) <= MAX_CACHED_MESH:
            write_cache(cache, {**key, "entry": entry})
    if entry["policy"] is not None and not os.path.isfile(entry["policy"]):
        return None
    account = account or entry["operator"]
    password_file = entry["passwords"].get(account) or os.path.join(home, "secrets", f"{account}.password")
    try:
        with open(password_file) as f:
            password = f.read().strip()
    except PermissionError:
        return None, None
    except OSError:
        return None
    return f"{account}@{entry['domain']}", password


def parser_stamp() -> list[int]:
    """Which mesh-file parser filled the cache: a changed agents/config.py parses anew."""
    try:
        st = os.stat(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py"))
    except OSError:
        return [0, 0]
    return [st.st_mtime_ns, st.st_size]


def read_cache(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached entry if the cache at ``path`` is ours, untouched by others and keyed by ``key``."""
    from .lean_msgpack import unpackb

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o022 or st.st_size > 2 * MAX_CACHED_MESH:
            return None  # only a cache of our own that nobody else could have written
        with os.fdopen(fd, "rb") as f:
            fd = -1
            cached = unpackb(f.read())
    except (OSError, ValueError):  # a malformed file is a ValueError
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    if not isinstance(cached, dict) or any(cached.get(k) != v for k, v in key.items()):
        return None
    entry = cached.get("entry")
    ok = (isinstance(entry, dict) and isinstance(entry.get("domain"), str) and isinstance(entry.get("operator"), str)
          and isinstance(entry.get("passwords"), dict) and isinstance(entry.get("policy"), (str, type(None))))
    return entry if ok else None


def write_cache(path: str, content: dict[str, Any]) -> None:
    """Replace the cache atomically; quietly nothing when the run directory is not ours, or others may
    write into it (the gateway's group may enter it: the cache is 0600 and names no secret)."""
    from .lean_msgpack import packb

    folder = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        st = os.stat(folder)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(packb(content))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
