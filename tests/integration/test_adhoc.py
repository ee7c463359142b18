"""Ad-hoc commands (XEP-0050) of the ops bot, driven by aioxmpp, an XMPP implementation other than
slixmpp, from a separate client account on the real Prosody: the list differs by role, the form is
typed from the declaration, a bad submission comes back marked, a long op carries progress and can
be cancelled."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from agents.authz import PolicyAuthorizer
from agents.kinds import catalogue
from agents.ops import ops_of
from broker.adhoc import AdHoc
from broker.chat import ChatBot, RateLimit
from conftest import until
from sample_agent import SampleAgent
from test_chat import policy

pytest.importorskip("aioxmpp")

# The client side, in aioxmpp, as its own process (aioxmpp runs its own event loop and stack).
DRIVER = textwrap.dedent('''
    import asyncio, json, sys
    import OpenSSL.crypto, OpenSSL.SSL, aioxmpp, aioxmpp.adhoc, aioxmpp.forms, aioxmpp.security_layer as sl

    cfg = json.loads(sys.argv[1])

    PINNED = OpenSSL.crypto.load_certificate(OpenSSL.crypto.FILETYPE_PEM, open(cfg["cert"], "rb").read())

    class ExactCertificate(sl.CertificateVerifier):
        """Trust exactly the private server's certificate (aioxmpp's PKIX verifier needs an older
        pyOpenSSL than the one installed: X509.get_extension is gone)."""

        def verify_callback(self, conn, x509, errno, errdepth, returncode):
            der = OpenSSL.crypto.FILETYPE_ASN1
            return OpenSSL.crypto.dump_certificate(der, x509) == OpenSSL.crypto.dump_certificate(der, PINNED)

        async def pre_handshake(self, metadata, domain, host, port):
            pass

        async def post_handshake(self, transport):
            pass  # the callback above already refused any other certificate

    def fields(form):
        return {f.var: {"type": f.type_.value, "label": f.label, "desc": f.desc, "required": f.required,
                        "values": list(f.values), "options": sorted(f.options)} for f in form.fields if f.var}

    def show(session):
        resp = session.response
        forms = [p for p in (resp.payload or []) if isinstance(p, aioxmpp.forms.Data)]
        return {"status": resp.status.value, "notes": [[n.type_.value, n.body] for n in resp.notes],
                "actions": sorted(a.value for a in (session.allowed_actions or ())),
                "form": fields(forms[0]) if forms else {}, "form_type": forms[0].type_.value if forms else None}

    def fill(form, values):
        for f in form.fields:
            if f.var in values:
                v = values[f.var]
                f.values[:] = v if isinstance(v, list) else [v]
        form.type_ = aioxmpp.forms.DataType.SUBMIT
        return form

    async def main():
        layer = aioxmpp.make_security_layer(cfg["password"])._replace(certificate_verifier_factory=ExactCertificate)
        client = aioxmpp.PresenceManagedClient(
            aioxmpp.JID.fromstr(cfg["jid"]), layer,
            override_peer=[(cfg["host"], cfg["port"], aioxmpp.connector.STARTTLSConnector())])
        out = {}
        async with client.connected():
            adhoc = client.summon(aioxmpp.adhoc.AdHocClient)
            bot = aioxmpp.JID.fromstr(cfg["bot"])
            out["list"] = sorted(item.node for item in await adhoc.get_commands(bot))
            for name, (node, submissions) in cfg.get("run", {}).items():
                steps = []
                try:
                    session = await adhoc.execute(bot, node)
                except aioxmpp.errors.XMPPError as exc:
                    out[name] = {"error": exc.condition.value[1]}
                    continue
                steps.append(show(session))
                for values in submissions:
                    if values == "cancel":
                        await session.proceed(action=aioxmpp.adhoc.ActionType.CANCEL)
                    elif values == "next":
                        await session.proceed(action=aioxmpp.adhoc.ActionType.NEXT)
                    else:
                        form = [p for p in session.response.payload if isinstance(p, aioxmpp.forms.Data)][0]
                        await session.proceed(action=aioxmpp.adhoc.ActionType.COMPLETE, payload=fill(form, values))
                    steps.append(show(session))
                    if session.response.status != aioxmpp.adhoc.CommandStatus.EXECUTING:
                        break
                await session.close()
                out[name] = steps
        print(json.dumps(out))

    asyncio.run(main())
''')


async def drive(mesh, account, bot, run=None) -> dict:
    cfg = {"jid": account[0], "password": account[1], "host": mesh.server.host, "port": mesh.server.port,
           "cert": str(mesh.server.cert_path), "bot": str(bot.jid), "run": run or {}}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", DRIVER, json.dumps(cfg),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-3000:]
    return json.loads(out)


@pytest.fixture
async def adhoc(mesh, tmp_path):
    helper = mesh.account("helper")
    bot_jid, bot_pw = mesh.account("bot")
    authz = PolicyAuthorizer()
    assert authz.load(policy(mesh.operator[0], helper[0], bot_jid)).ok
    broker = await mesh.broker(delegates=[bot_jid])
    broker.authorizer = authz
    agent = await mesh.agent(SampleAgent, broker, ["/host/a"], authorizer=authz, delegates=[bot_jid])
    bot = ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid), authorizer=authz,
                  ops={**catalogue(), **ops_of(SampleAgent)}, rate=RateLimit(burst=50, rate=50))
    AdHoc(bot)
    await mesh.start(bot)
    await until(lambda: broker.directory.discover("sample.echo", []), what="the agent in the directory")
    return bot, agent, helper


async def test_the_list_differs_by_role_and_a_hidden_command_cannot_be_run(adhoc, mesh):
    bot, agent, helper = adhoc
    mine = await drive(mesh, mesh.operator, bot)
    theirs = await drive(mesh, helper, bot, run={"count": ["sample.count", []]})
    assert {"sample.count", "sample.steps", "sample.echo", "workflow.run"} <= set(mine["list"])
    assert "sample.echo" in theirs["list"] and "sample.count" not in theirs["list"]
    assert "workflow.run" not in theirs["list"] and "storage.volume.create" not in theirs["list"]
    assert theirs["count"] == {"error": "item-not-found"} and agent.runs == 0


async def test_a_typed_form_then_a_valid_submission_returns_the_result(adhoc, mesh):
    bot, _, _ = adhoc
    out = await drive(mesh, mesh.operator, bot, run={"echo": ["sample.echo", [{"text": "hi", "mode": "upper",
                                                                               "times": "2"}]]})
    first, done = out["echo"]
    form = first["form"]
    assert first["status"] == "executing" and first["form_type"] == "form"
    assert form["text"]["required"] and form["text"]["type"] == "text-single"
    assert "what to send back" in form["text"]["desc"]
    assert form["mode"]["type"] == "list-single" and form["mode"]["options"] == ["plain", "upper"]
    assert form["mode"]["values"] == ["plain"] and form["times"]["values"] == ["1"] and not form["times"]["required"]
    assert done["status"] == "completed" and done["notes"] == [["info", "sample.echo: 1 ok"]]
    assert any("HIHI" in line for line in done["form"]["results"]["values"])
    assert any(line.split() == ["caller:", mesh.operator[0]] for line in done["form"]["results"]["values"])


async def test_an_invalid_submission_returns_the_form_with_the_error_marked(adhoc, mesh):
    bot, agent, _ = adhoc
    out = await drive(mesh, mesh.operator, bot, run={"bad": ["sample.echo", [{"text": "hi", "times": "lots"}]]})
    _, again = out["bad"]
    assert again["status"] == "executing" and again["notes"][0][0] == "error" and "times" in again["notes"][0][1]
    assert again["form"]["times"]["label"] == "times (error)" and again["form"]["times"]["desc"].startswith("error:")
    assert again["form"]["text"]["values"] == ["hi"]  # what was typed is kept


async def test_a_long_op_carries_progress_across_stages_and_completes(adhoc, mesh):
    bot, _, _ = adhoc
    out = await drive(mesh, mesh.operator, bot,
                      run={"steps": ["sample.steps", [{"steps": "3"}] + ["next"] * 6]})
    stages = out["steps"]
    assert stages[1]["status"] == "executing" and "next" in stages[1]["actions"]
    assert "job" in stages[1]["form"]
    assert stages[-1]["status"] == "completed" and stages[-1]["notes"] == [["info", "sample.steps: 1 ok"]]


async def test_a_long_op_can_be_cancelled(adhoc, mesh):
    bot, _, _ = adhoc
    out = await drive(mesh, mesh.operator, bot, run={"c": ["sample.steps", [{"steps": "300"}, "cancel"]]})
    assert [s["status"] for s in out["c"]] == ["executing", "executing", "canceled"]
    job = next(j for j in bot.jobs.values() if j.op == "sample.steps")
    assert job.state == "cancelled" and job.report is None
