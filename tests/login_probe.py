"""Whether an account can log in to a private server (Prosody or ejabberd) as agents do: STARTTLS only,
the server's certificate pinned, SCRAM-SHA-1 unless told another mechanism."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import slixmpp


async def can_log_in(server: Any, user: str, password: str, ctx: ssl.SSLContext | None = None,
                     mech: str = "SCRAM-SHA-1") -> bool:
    """True once a session starts for ``user`` (a local name, or a bare JID) on ``server``, False when the
    login fails or the connection ends first; at most 20 s."""
    jid = user if "@" in user else f"{user}@{server.domain}"
    client = slixmpp.ClientXMPP(f"{jid}/test", password, sasl_mech=mech)
    client.ssl_context = ctx or server.ssl_context()
    client.enable_direct_tls, client.enable_starttls, client.enable_plaintext = False, True, False
    outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settle(value: bool) -> None:
        if not outcome.done():
            outcome.set_result(value)

    client.add_event_handler("session_start", lambda _: settle(True))
    for event in ("failed_all_auth", "disconnected", "connection_failed"):
        client.add_event_handler(event, lambda _: settle(False))
    client.connect(host=server.host, port=server.port)
    try:
        return await asyncio.wait_for(outcome, 20)
    finally:
        await client.disconnect()
