"""The private server reads accounts the mesh file does not name slowly, and the mesh's own at full speed.

A flood from any account of the server would otherwise queue ahead of everyone else's requests in an
agent's one connection (bench/flood.py measures what it costs another sender). The server is started
the way `vertebra server start` starts it, from a mesh file, on Prosody and on ejabberd; a raw client
(tests/rawxmpp.py) of a named and of an unnamed account each sends itself 100 KB at once. The named
account's messages all come back while the unnamed account's are still being read; the unnamed
account's arrive in the end (slowed, not dropped), on the same session.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from agents import cli
from agents.config import ConfigError, parse
from agents.ejabberd import ejabberd_installed
from conftest import free_port
from rawxmpp import RawXMPP

DOMAIN = "vertebra.test"
MESSAGES = 100  # of about 1 KB each: ten seconds at the default read limit of 10,000 B/s


def _mesh(home: Path, engine: str, **server: object) -> object:
    port = free_port()
    doc = {"server": {"domain": DOMAIN, "port": port, "engine": engine, **server}, "admins": [f"operator@{DOMAIN}"]}
    if engine == "ejabberd":
        doc["server"].update(node_name=f"limit{port}@127.0.0.1", dist_port=free_port(), epmd_port=free_port())
    path = home / "mesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return parse(doc, path, home)


async def _flood_self(client: RawXMPP) -> None:
    pad = "x" * 1000
    await client.send("".join(f"<message to='{client.jid}' id='m{i}'><body>{pad}</body></message>"
                              for i in range(MESSAGES)))


@pytest.mark.parametrize("engine", ["prosody", "ejabberd"])
async def test_unnamed_accounts_are_read_slowly(tmp_path: Path, engine: str) -> None:
    if engine == "ejabberd" and not ejabberd_installed():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must run the ejabberd tests, but ejabberd is not installed", pytrace=False)
        pytest.skip("ejabberd is not installed: run `apt-get install -y ejabberd`")
    mesh = _mesh(tmp_path, engine)
    server = cli.start_server(mesh)
    try:
        server.register("stranger", "stranger-password-1")
        ctx = server.ssl_context()
        named = await RawXMPP.login(server.host, server.port, DOMAIN, "operator", mesh.password("operator"),
                                    ssl_context=ctx)
        stranger = await RawXMPP.login(server.host, server.port, DOMAIN, "stranger", "stranger-password-1",
                                       ssl_context=ctx)
        last = f"m{MESSAGES - 1}"
        stranger_done = asyncio.ensure_future(stranger.next(lambda el: el.get("id") == last, timeout=120))
        await asyncio.gather(_flood_self(stranger), _flood_self(named))
        await named.next(lambda el: el.get("id") == last, timeout=60)
        assert not stranger_done.done(), "the unnamed account's 100 KB were read as fast as the operator's"
        await stranger_done  # slowed, not dropped: every message arrives, on the same session
        assert await stranger.alive()
        await named.close()
        await stranger.close()
    finally:
        server.stop()


def test_read_limit_settings_are_checked(tmp_path: Path) -> None:
    assert _mesh(tmp_path, "prosody", read_limit=0).read_limit() is None
    limit = _mesh(tmp_path, "prosody", read_limit=20000, full_speed=[f"carol@{DOMAIN}"]).read_limit()
    assert limit.bytes_per_second == 20000
    assert f"carol@{DOMAIN}" in limit.unlimited and f"operator@{DOMAIN}" in limit.unlimited
    with pytest.raises(ConfigError, match="server.read_limit"):
        _mesh(tmp_path, "prosody", read_limit=500)
    with pytest.raises(ConfigError, match="full_speed"):
        _mesh(tmp_path, "prosody", full_speed=["carol@elsewhere.test"])
