"""The broker's state on an etcd that serves TLS only, wants a client certificate and has authentication
on, reached as the mesh file says (``broker: {state: etcd://..., tls: {ca, cert, key}, user,
password_file}``).

etcd's auth tokens do not last: a simple token lapses after five minutes unused, and a member forgets
every token it gave a user whose password changes, or all of them when it restarts. The broker logs in
again when a member no longer knows its token, reading the password file anew, so its lead and its
workflows go on. The test changes the password (in etcd and in the file) to make the member forget
the token at a moment it chooses, instead of waiting minutes for one to lapse."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from agents import config
from agents.errors import Outcome
from conftest import until
from etcd_cluster import PrivateEtcd
from sample_agent import SampleAgent

aetcd = pytest.importorskip("aetcd", reason="the etcd client is the optional extra 'etcd': make install installs it")

from aetcd import rpc  # noqa: E402

from broker.state_etcd import EtcdClient  # noqa: E402

PREFIX = "/secure"
ONE_STEP = {"name": "one", "steps": [{"name": "count", "op": "sample.count", "on": ["/host/t1"]}]}


class EtcdAdmin:
    """etcd's root user, over the cluster's TLS: sets authentication up and changes passwords."""

    def __init__(self, etcd: PrivateEtcd) -> None:
        creds = grpc.ssl_channel_credentials(etcd.ca.read_bytes(), etcd.client_key.read_bytes(),
                                             etcd.client_cert.read_bytes())
        self.channel = grpc.aio.secure_channel(etcd.endpoints[0], creds)
        self.auth = rpc.AuthStub(self.channel)
        self.token: Any = None

    async def enable(self, user: str, password: str) -> None:
        """Root and ``user`` (read and write under PREFIX only), then authentication on."""
        auth = self.auth
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="root-pw"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="vertebra"))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(
            name="vertebra", perm=rpc.Permission(permType=rpc.Permission.READWRITE, key=f"{PREFIX}/".encode(),
                                                 range_end=f"{PREFIX}0".encode())))
        await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role="vertebra"))
        await auth.AuthEnable(rpc.AuthEnableRequest())
        reply = await auth.Authenticate(rpc.AuthenticateRequest(name="root", password="root-pw"))
        self.token = (("token", reply.token),)

    async def change_password(self, user: str, password: str) -> None:
        await self.auth.UserChangePassword(rpc.AuthUserChangePasswordRequest(name=user, password=password),
                                           metadata=self.token)

    async def close(self) -> None:
        await self.channel.close()


async def _run(client: Any, broker: Any) -> None:
    res = await client.request(str(broker.jid), "workflow.run", {"workflow": "one", "wait": 20}, timeout=30)
    assert res.outcome is Outcome.OK and res.result["state"] == "done", res.error or res.result


async def test_a_broker_on_etcd_with_tls_and_a_password_keeps_leading_when_its_token_is_forgotten(
        mesh: Any, tmp_path: Path) -> None:
    etcd = PrivateEtcd(tmp_path / "etcd", size=1, tls=True)
    await asyncio.to_thread(etcd.start)
    admin = EtcdAdmin(etcd)
    try:
        password_file = tmp_path / "etcd.password"
        password_file.write_text("first-password\n")
        await admin.enable("vertebra", "first-password")
        mesh_file = {"broker": {"state": f"etcd://{etcd.endpoints[0]}{PREFIX}", "user": "vertebra",
                                "password_file": str(password_file),
                                "tls": {"ca": str(etcd.ca), "cert": str(etcd.client_cert),
                                        "key": str(etcd.client_key)}}}
        state = config.parse(mesh_file, tmp_path / "mesh.yaml", tmp_path).broker_state
        assert state is not None and state.prefix == PREFIX

        # Authentication is really on: the client certificate alone is refused.
        anonymous = EtcdClient(replace(state, user=None, password_file=None))
        try:
            with pytest.raises(aetcd.exceptions.ClientError, match="permission denied|user name"):
                await anonymous.put(f"{PREFIX}/probe".encode(), b"x")
        finally:
            await anonymous.close()

        workflows = tmp_path / "workflows"
        workflows.mkdir()
        (workflows / "one.yaml").write_text(yaml.safe_dump(ONE_STEP))
        broker = await mesh.broker(state_dir=tmp_path / "broker", shared_dir=tmp_path / "shared", state=state,
                                   settings={"workflows": str(workflows)})
        agent = await mesh.agent(SampleAgent, broker, ["/host/t1"])
        client = await mesh.client(broker)
        await until(lambda: broker.leadership.leading and len(broker.directory) == 1, timeout=30,
                    what="the broker leading, with the agent listed")
        term = broker.leadership.term
        await _run(client, broker)
        assert agent.runs == 1

        # The password changes, in etcd and in the file: the member forgets the broker's token.
        password_file.write_text("second-password\n")
        await admin.change_password("vertebra", "second-password")
        lease = broker.leadership.lease
        changed = time.monotonic()
        # The lease is renewed with a new token (a renewal sent after the change went through), the lead
        # never lapsed, and the next workflow's writes go through too.
        await until(lambda: lease.valid_until > changed + lease.ttl, timeout=30,
                    what="a renewal of the lead after the token was forgotten")
        assert broker.leadership.leading and broker.leadership.term == term
        await _run(client, broker)
        assert agent.runs == 2
    finally:
        await admin.close()
        await asyncio.to_thread(etcd.stop)
