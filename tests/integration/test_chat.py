"""The ops bot's text commands end to end: a separate client account chats with the bot on the real
Prosody; the bot relays to a real broker and sample agent under the operator's own identity."""

from __future__ import annotations

import asyncio

import pytest
import yaml

from agents import audit
from agents.authz import PolicyAuthorizer
from agents.kinds import catalogue
from agents.ops import ops_of
from broker.chat import ChatBot, RateLimit, RemoteDescriptions, help_for
from conftest import until
from sample_agent import SampleAgent


def policy(operator: str, helper: str, bot: str, others: tuple[str, ...] = ()) -> str:
    return f"""
roles:
  viewer: {{}}
  operator: {{inherits: [viewer]}}
members:
  operator: [{", ".join((operator, *others))}]
  viewer: [{helper}]
grants:
  - {{role: viewer, ops: ["*.info", "sample.echo", "mesh.agents", "mesh.discover", "mesh.describe", "workflow.list"]}}
  - {{role: operator, ops: ["sample.**", "workflow.**"]}}
"""


class Chatter:
    """An operator's chat client: sends plain messages, keeps what the bot answers."""

    def __init__(self, client, bot: str) -> None:
        self.client, self.bot, self.got = client, bot, []
        client.on_event("message", lambda m: self.got.append(m["body"]) if m["body"] else None)

    def send(self, text: str, mtype: str = "chat", to: str | None = None) -> None:
        self.client.xmpp.send_message(mto=to or self.bot, mbody=text, mtype=mtype)

    async def ask(self, text: str, expect: str, timeout: float = 10.0) -> str:
        start = len(self.got)
        self.send(text)
        return await until(lambda: next((b for b in self.got[start:] if expect in b), None), timeout,
                           f"a reply containing {expect!r} to {text!r}; got {self.got[start:]}")


@pytest.fixture
async def chat(mesh, tmp_path):
    helper, requester = mesh.account("helper"), mesh.account("requester")
    bot_jid, bot_pw = mesh.account("bot")
    authz = PolicyAuthorizer()
    assert authz.load(policy(mesh.operator[0], helper[0], bot_jid, others=(requester[0],))).ok
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "guarded.yaml").write_text(yaml.safe_dump({"name": "guarded", "steps": [
        {"name": "toggle", "op": "sample.toggle", "args": {"target": str(tmp_path / "toggled")},
         "destructive": True}]}))
    # The bot holds no role: its identity grants nothing. Agents and the broker take its `for`.
    broker = await mesh.broker(delegates=[bot_jid], settings={"workflows": str(tmp_path / "workflows")})
    broker.authorizer = authz
    agent = await mesh.agent(SampleAgent, broker, ["/host/a"], authorizer=authz, delegates=[bot_jid])
    ops = {**catalogue(), **ops_of(SampleAgent)}
    (tmp_path / "bot").mkdir()
    bot = await mesh.start(ChatBot(bot_jid, bot_pw, mesh.endpoint, broker=str(broker.jid), authorizer=authz,
                                   ops=ops, state_dir=tmp_path / "bot", rate=RateLimit(burst=20, rate=20)))
    await until(lambda: broker.directory.discover("sample.echo", []), what="the agent in the directory")
    me = Chatter(await mesh.client(), str(bot.jid))
    helper_chat = Chatter(await mesh.client(account=helper), str(bot.jid))
    me.requester = await mesh.client(broker, account=requester)
    return bot, broker, agent, me, helper_chat


async def test_help_lists_commands_and_ops_from_the_declarations(chat):
    bot, _, _, me, _ = chat
    text = await me.ask("help", "commands:")
    assert "sample.echo" in text and "storage.snapshot.create" in text and "approve ID" in text
    one = await me.ask("help sample.echo", "sample.echo - Send the text back.")
    assert "mode=plain|upper" in one and "usage: call sample.echo [on RESOURCE ...] text=..." in one


async def test_without_ops_given_the_bot_offers_what_the_broker_and_live_agents_describe(chat):
    bot, _, agent, me, _ = chat
    bot.ops, bot.broker_ops, bot.describer = {}, frozenset(), RemoteDescriptions(bot)  # no ops given
    one = await me.ask("help sample.echo", "sample.echo - Send the text back.")
    assert one == help_for(ops_of(SampleAgent)["sample.echo"])  # from the agent's disco node, as declared
    listing = await me.ask("help", "commands:")
    assert "sample.echo" in listing and "mesh.agents" in listing and "storage.snapshot.create" not in listing
    assert "HELLO" in await me.ask("call sample.echo text=hello mode=upper", "sample.echo: 1 of 1 ok")
    assert "live agents" in await me.ask("agents", "live agents")  # a broker op, sent to the broker
    assert "did you mean sample.echo" in await me.ask("call sample.ecko text=hi", "no op")


async def test_typos_get_suggestions_and_bad_arguments_are_named(chat):
    _, _, agent, me, _ = chat
    assert "did you mean help" in await me.ask("hlep", "unknown command")
    assert "did you mean sample.echo" in await me.ask("call sample.ecko text=hi", "no op")
    bad = await me.ask("call sample.echo text=hi times=lots", "times")
    assert "expects integer" in bad and "usage: call sample.echo" in bad
    assert "did you mean text" in await me.ask("call sample.echo txt=hi", "unknown argument")
    assert "type: call sample.count" in await me.ask("sample.count", "to run sample.count")
    assert agent.runs == 0


async def test_call_answers_a_line_per_target_and_a_summary(chat):
    bot, _, agent, me, _ = chat
    text = await me.ask('call sample.echo on /host/a text="hello there" mode=upper', "sample.echo: 1 of 1 ok")
    lines = text.splitlines()  # the target, its result as labelled lines, the summary
    assert lines[0].startswith("sample") and lines[0].endswith(":") and "  text:      HELLO THERE" in lines
    assert lines[-1].startswith("sample.echo: 1 of 1 ok in ")
    # The agent ran it for the operator, not for the bot, and its audit log says both.
    assert f"  caller:    {me.client.jid.bare}" in lines
    record = [r for r in audit.show(agent.state_dir / "audit.sqlite", op="sample.echo") if r["kind"] == "decided"][-1]
    assert record["caller"] == me.client.jid.bare and f"sent by {bot.jid.bare}" in record["rule"]
    assert "not-discovered" in await me.ask("call sample.echo on /host/zzz text=x", "not-discovered")


async def test_results_are_never_cut_and_long_ones_are_paged(chat):
    _, _, _, me, _ = chat
    word = "abcdefghij" * 40  # 400 characters: more than results used to be cut at
    text = await me.ask(f"call sample.echo text={word}", "sample.echo: 1 of 1 ok")
    assert f"  text:      {word}" in text.splitlines() and "..." not in text
    start = len(me.got)
    me.send(f"call sample.echo text={word * 4}{word[:300]} times=10")  # 19,000 characters: more than a page
    await until(lambda: any("sample.echo: 1 of 1 ok" in b for b in me.got[start:]), 10, "the last page")
    got = me.got[start:]
    assert len(got) >= 2 and [b.split("\n", 1)[0] for b in got] == [f"[page {n}/{len(got)}]"
                                                                   for n in range(1, len(got) + 1)]
    assert (word * 4 + word[:300]) * 10 in "".join(b.split("\n", 1)[1] for b in got)


async def test_agents_and_workflows(chat):
    _, _, _, me, _ = chat
    text = await me.ask("agents", "live agents")
    assert "(sample): /host/a" in text and "1 live agents" in text
    assert "workflow guarded" in await me.ask("workflows", "workflow")


async def test_long_op_answers_with_a_job_then_progress_then_the_result(chat):
    bot, _, _, me, _ = chat
    started = await me.ask("call sample.steps steps=3", "job ")
    job = started.split()[1]
    done = await until(lambda: next((b for b in me.got if b.startswith(f"job {job} finished")), None), 10,
                       "the result")
    assert "sample.steps: 1 of 1 ok" in done and "  done: 3" in done.splitlines()
    assert any(b.startswith(f"job {job}: ") and "#1" in b for b in me.got), me.got  # progress came first
    listed = await me.ask("jobs", f"job {job}: sample.steps")
    assert "done, 1 ok" in listed
    detail = await me.ask(f"job {job}", "progress:")
    assert "step=3 of=3" in detail and "sample.steps: 1 of 1 ok" in detail  # as the command line writes it


async def test_cancel_a_job_and_jobs_are_private(chat):
    bot, _, _, me, helper = chat
    me.send("call sample.sleep seconds=3")
    job = await until(lambda: next((j for j in bot.jobs.values() if j.op == "sample.sleep"), None), 5, "the job")
    assert "you have no job" in await helper.ask(f"cancel {job.id}", "no job")  # not theirs
    assert "cancelled" in await me.ask(f"cancel {job.id}", f"job {job.id} cancelled")
    assert job.state == "cancelled"
    assert "already cancelled" in await me.ask(f"cancel {job.id}", "already")


async def test_an_unauthorized_op_is_denied_for_the_operator_and_audited(chat, tmp_path):
    bot, _, agent, _, helper = chat
    text = await helper.ask("call sample.count", "denied")
    assert "helper" in text and "sample.count" in text and "sample.count: 1 of 1 denied" in text
    assert agent.runs == 0  # nothing was sent: the bot's own (broad) rights granted nothing
    records = audit.show(tmp_path / "bot" / "audit.sqlite", op="sample.count")
    assert [(r["caller"], r["decision"]) for r in records] == [(helper_jid(helper), "deny")]
    assert "via chat bot" in records[0]["rule"]
    # What the helper may do still works, and is audited under the helper too.
    await helper.ask("call sample.echo text=hi", "sample.echo: 1 of 1 ok")
    allowed = audit.show(tmp_path / "bot" / "audit.sqlite", op="sample.echo")
    assert {r["caller"] for r in allowed} == {helper_jid(helper)}
    assert audit.verify(tmp_path / "bot" / "audit.sqlite").ok


def helper_jid(chatter: Chatter) -> str:
    return chatter.client.jid.bare


async def test_group_chat_messages_are_never_commands(chat, mesh):
    bot, _, agent, me, _ = chat
    me.send("call sample.count", mtype="groupchat")
    # A later direct command is answered; the group-chat one before it never ran.
    await me.ask("call sample.echo text=after", "sample.echo: 1 of 1 ok")
    assert agent.runs == 0
    assert not any("sample.count" in b for b in me.got)


async def test_rate_limit_per_sender(chat):
    bot, _, _, me, helper = chat
    bot.rate = RateLimit(burst=2, rate=0.001)
    for _ in range(5):
        me.send("jobs")
    await until(lambda: any(b.startswith("slow down") for b in me.got), 5, "a slow-down answer")
    await helper.ask("jobs", "you have no jobs")  # another sender is not held back
    await asyncio.sleep(0.3)
    assert sum(b.startswith("slow down") for b in me.got) == 1
    assert sum(b == "you have no jobs" for b in me.got) == 2


async def test_an_agent_that_does_not_delegate_to_the_bot_denies_instead_of_trusting_it(chat, mesh):
    bot, broker, agent, me, _ = chat
    other = await mesh.agent(SampleAgent, broker, ["/host/b"], authorizer=agent.authorizer)
    await until(lambda: len(broker.directory.discover("sample.count", [])) == 2, what="two agents")
    text = await me.ask("call sample.count on /host/b", "sample.count: 1 of 1 denied")
    assert "may not act on behalf of" in text and other.runs == 0


async def test_approve_and_deny_from_chat_record_the_operator_not_the_bot(chat, tmp_path):
    bot, broker, agent, me, _ = chat
    runs = []
    for _ in range(2):  # the requester starts two runs; two-person rule: someone else must approve
        res = await me.requester.request(str(broker.jid), "workflow.run", {"workflow": "guarded", "wait": 5},
                                         timeout=10)
        assert res.result["state"] == "waiting", res
        runs.append(res.result["instance"])
    listed = await me.ask("workflows", "workflow guarded")
    assert f"instance {runs[0]}: guarded waiting" in listed
    text = await me.ask(f"approve {runs[0]}", "approved toggle")
    assert f"it has 1 ({me.client.jid.bare})" in text  # two-person rule: one more approver needed
    status = await broker.workflows._status(runs[0])
    assert status["steps"][0]["approved_by"] == [me.client.jid.bare]  # the operator, never the bot
    assert not (tmp_path / "toggled").exists()
    assert "is cancelled" in await me.ask(f"deny {runs[1]}", "denied: workflow instance")
    assert (await broker.workflows._status(runs[1]))["state"] == "cancelled"
