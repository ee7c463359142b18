"""A burst of stanzas from a session on one ejabberd node to a session on the other arrives whole.

ejabberd hands a stanza to a session on another node with ``erlang:send(..., [nosuspend])``, which
drops it when the distribution buffer between the nodes is busy (Erlang's default limit: 1 MiB).
A call to 20,000 agents lost hundreds of requests that way, silently: the caller's node had
acknowledged every one (bench/README.md). The nodes are started with a larger buffer
(``agents/ejabberd.py``: ``+zdbbl``); here one raw client on the first node writes 20,000 messages
of 1 KiB to a raw client on the second, and every one must arrive.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.ejabberd import ejabberd_installed
from conftest import DOMAIN, ejabberd_cluster, until
from rawxmpp import RawXMPP

MESSAGES = 20_000
BODY = "x" * 1024


async def test_a_burst_to_the_other_node_arrives_whole(tmp_path: Path) -> None:
    if not ejabberd_installed():
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail("CI must run the ejabberd tests, but ejabberd is not installed", pytrace=False)
        pytest.skip("ejabberd is not installed: run `apt-get install -y ejabberd`")
    cluster = ejabberd_cluster(tmp_path, prefix="burst")
    first, second = next(cluster)
    try:
        first.register("sender", "pw-sender")
        second.register("reader", "pw-reader")
        ctx = first.ssl_context()
        reader = await RawXMPP.login(second.host, second.port, DOMAIN, "reader", "pw-reader", ssl_context=ctx,
                                     resource="r")
        sender = await RawXMPP.login(first.host, first.port, DOMAIN, "sender", "pw-sender", ssl_context=ctx,
                                     resource="s")
        try:
            for start in range(0, MESSAGES, 5_000):
                await sender.send("".join(f"<message to='{reader.jid}' id='m{i}'><body>{BODY}</body></message>"
                                          for i in range(start, start + 5_000)))

            def arrived() -> int:
                return sum(1 for el in reader.inbox if el.tag == "{jabber:client}message")

            try:
                await until(lambda: arrived() == MESSAGES, timeout=90, what=f"{MESSAGES} messages")
            except AssertionError:
                pytest.fail(f"{arrived()} of {MESSAGES} messages arrived at the other node's session", pytrace=False)
            assert await sender.alive() and await reader.alive()
        finally:
            await sender.close()
            await reader.close()
    finally:
        cluster.close()  # stops both nodes
