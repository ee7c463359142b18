"""How a short-lived program (the CLI, check_vertebra, fence_vertebra) reaches the mesh.

Through the local gateway when one runs (no XMPP login: milliseconds), else by logging in directly
as the given account for the length of one call. Either way the call goes out under that account's
own JID, and every wait is bounded by the call's timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .gateway import GatewayUnavailable, call_via_gateway

if TYPE_CHECKING:
    from .config import MeshConfig
    from .report import AnsweredFn, CallReport, JobEventFn, ProgressFn

LOGIN_TIMEOUT = 10.0


async def mesh_call(mesh: MeshConfig, op: str, args: dict[str, Any], *, on: Sequence[str] = (),
                    scope: str = "all", to: Sequence[str] = (), timeout: float = 30.0,
                    progress: ProgressFn | None = None, account: str | None = None,
                    rid: str | None = None, answered: AnsweredFn | None = None,
                    job_events: JobEventFn | None = None) -> CallReport:
    """Call ``op`` as ``account`` (default: the mesh file's operator); ``rid`` retries an earlier call.
    A caller that may not read that account's password (a service's Unix user) calls through the
    gateway without one: the gateway knows it by its uid and calls as the identity the mesh file maps
    it to."""
    named, account = account, account or mesh.operator
    jid = mesh.jid(account)
    unreadable: PermissionError | None = None
    try:
        password: str | None = mesh.password(account)
    except PermissionError as exc:
        password, unreadable = None, exc
    call = {"op": op, "args": args, "on": list(on), "scope": scope, "to": list(to), "timeout": timeout, "rid": rid}
    try:
        return await call_via_gateway(mesh.gateway_socket, jid if password is not None else None, password, call,
                                      progress, as_identity=named if password is None else None, answered=answered,
                                      job_events=job_events)
    except GatewayUnavailable:
        if unreadable is not None:
            from .config import ConfigError

            raise ConfigError(f"cannot read the password of {jid} ({unreadable.strerror}: {unreadable.filename})"
                              f" and no gateway answers at {mesh.gateway_socket}: run this as a user who may read"
                              " it, or as a Unix user the mesh file maps to an identity while the gateway runs"
                              ) from None
    assert password is not None  # unreadable, it was raised above
    from .client import Client  # the XMPP stack loads only when there is no gateway to use

    client = Client(jid, password, mesh.endpoint(), broker=mesh.broker_jids)
    await client.start(timeout=min(LOGIN_TIMEOUT, timeout), once=True)
    try:
        return await client.call(op, args, on=on, scope=scope, to=to, timeout=timeout, progress=progress, rid=rid,
                                 answered=answered, job_events=job_events)
    finally:
        await client.stop()
